"""No silent collapse: a model built to collapse is flagged, its culprit named, and
``--min-cosine`` / ``--min-sqnr`` repair it; a healthy model stays silent."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from click.testing import CliRunner
from support import run, sqnr_db

from onnxq.cli import main
from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.pipeline import quantize_with_report
from onnxq.quality import OutputQuality, QualityFloor

C = 8


def collapsing_cnn() -> onnx.ModelProto:
    """conv1's channel 0 is ~3000x larger than the others and conv2 barely reads it: one
    per-tensor activation scale for conv1's output rounds every other channel to zero."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((C, 3, 3, 3)).astype(np.float32) * 0.3
    w1[0] *= 3000
    w2 = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.2
    w2[:, 0] *= 1e-4
    w3 = rng.standard_normal((4, C, 1, 1)).astype(np.float32) * 0.3
    nodes = [
        oh.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Conv", ["a", "w2"], ["b"], pads=[1, 1, 1, 1], name="conv2"),
        oh.make_node("Relu", ["b"], ["r"], name="relu"),
        oh.make_node("Conv", ["r", "w3"], ["y"], name="conv3"),
    ]
    graph = oh.make_graph(
        nodes, "collapse", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [nh.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )  # fmt: skip
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def collapse(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collapse")
    path = folder / "collapse.onnx"
    onnx.save(collapsing_cnn(), path)
    calib = folder / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    return path, calib


def test_collapse_is_reported_with_its_culprit(collapse):
    path, calib = collapse
    result = quantize_with_report(path, calib)
    quality = result.report.quality
    assert quality["collapsed"] and quality["sqnr_db"] < 5
    assert quality["suspects"][0] == "conv2"  # where the error starts, not where it ends
    (warning,) = result.report.warnings
    assert "\n" not in warning and "conv2" in warning and "--min-cosine" in warning


def test_cli_warns_in_one_line_and_min_cosine_fixes_it(collapse, tmp_path):
    path, calib = collapse
    out = tmp_path / "q.onnx"
    first = CliRunner().invoke(main, ["quantize", str(path), "-o", str(out), "--calib", str(calib)])
    assert first.exit_code == 0, first.output
    warnings = [line for line in first.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "collapsed" in warnings[0]
    summary = tmp_path / "s.json"
    args = ["-o", str(out), "--calib", str(calib), "--summary-json", str(summary)]
    fixed = CliRunner().invoke(main, ["quantize", str(path), *args, "--min-cosine", "0.99"])
    assert fixed.exit_code == 0, fixed.output
    assert "warning:" not in fixed.output
    report = json.loads(summary.read_text())
    assert report["quality"]["cosine"] >= 0.99 and not report["quality"]["collapsed"]
    assert any("left float to meet cosine" in d["reason"] for d in report["decisions"])
    feed = {"x": np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    assert sqnr_db(run(path, feed)[0], run(out, feed)[0]) > 15  # holds on unseen data


def test_min_sqnr_fixes_it(collapse, tmp_path):
    path, calib = collapse
    out, summary = tmp_path / "q.onnx", tmp_path / "s.json"
    args = ["-o", str(out), "--calib", str(calib), "--summary-json", str(summary)]
    fixed = CliRunner().invoke(main, ["quantize", str(path), *args, "--min-sqnr", "25"])
    assert fixed.exit_code == 0, fixed.output
    assert float(json.loads(summary.read_text())["quality"]["sqnr_db"]) >= 25


def test_healthy_models_stay_silent(cnn, cnn_calib):
    static = quantize_with_report(cnn, cnn_calib)
    dynamic = quantize_dynamic_with_report(cnn, calibration_data=cnn_calib)
    for result in (static, dynamic):
        assert result.report.quality["sqnr_db"] > 25 and not result.report.warnings
    assert quantize_dynamic_with_report(cnn).report.quality is None  # no data: not measured


@pytest.mark.parametrize(
    ("sqnr", "cosine", "collapsed"),
    [(15.0, 0.98, False), (14.9, 0.999, True), (40.0, 0.979, True), (float("inf"), 1.0, False)],
)
def test_floor_boundaries(sqnr, cosine, collapsed):
    quality = OutputQuality(sqnr, cosine, 1, QualityFloor())
    assert quality.collapsed is collapsed
    assert (quality.warning() is not None) is collapsed
