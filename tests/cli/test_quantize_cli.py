"""``onnxq quantize`` end to end through click, and every bad input it must refuse cleanly."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from support import run, sqnr_db

from onnxq.cli import main


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _invoke(*args: str | os.PathLike[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def calib_npz(tmp_path: Path, cnn_calib) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **cnn_calib)
    return path


def test_quantize_writes_model_summary_and_json(cnn_path, calib_npz, tmp_path, rng):
    out, summary = tmp_path / "q.onnx", tmp_path / "summary.json"
    before = _digest(cnn_path)
    result = _invoke(
        "quantize",
        cnn_path,
        "-o",
        out,
        "--calib",
        calib_npz,
        "--method",
        "percentile",
        "--batch-size",
        "5",
        "--summary-json",
        summary,
    )
    assert result.exit_code == 0, result.output
    assert "quantized" in result.output and "size:" in result.output
    assert "calibration: 24 samples, percentile" in result.output
    assert _digest(cnn_path) == before
    report = json.loads(summary.read_text())
    assert report["samples"] == 24
    assert {d["name"] for d in report["decisions"] if d["quantized"]} >= {"conv1", "conv2", "fc"}
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run(cnn_path, {"x": x})[0], run(out, {"x": x})[0]) > 25


def test_max_samples_and_exclusions(cnn_path, calib_npz, tmp_path):
    out = tmp_path / "q.onnx"
    result = _invoke(
        "quantize",
        cnn_path,
        "-o",
        out,
        "--calib",
        calib_npz,
        "--max-samples",
        "10",
        "--exclude-nodes",
        "conv[12]",
        "--exclude-op-types",
        "Gemm,Add",
    )
    assert result.exit_code == 0, result.output
    assert "calibration: 10 samples" in result.output
    assert "excluded by name pattern" in result.output
    assert "excluded by op type" in result.output


def _expect_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: "), message
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


def _bad_calib(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


BAD_CALIB = {
    "wrong name": ({"image": np.zeros((4, 3, 16, 16), np.float32)}, ("'x'",)),
    "wrong rank": ({"x": np.zeros((4, 3, 16), np.float32)}, ("'x'", "rank")),
    "wrong dtype": ({"x": np.zeros((4, 3, 16, 16), np.float64)}, ("'x'", "float64")),
    "wrong dim": ({"x": np.zeros((4, 3, 8, 8), np.float32)}, ("'x'",)),
    "nan": ({"x": np.full((4, 3, 16, 16), np.nan, np.float32)}, ("'x'", "NaN")),
    "inf": ({"x": np.full((4, 3, 16, 16), np.inf, np.float32)}, ("'x'", "Inf")),
    "empty": ({"x": np.zeros((0, 3, 16, 16), np.float32)}, ("empty",)),
}


@pytest.mark.parametrize("case", sorted(BAD_CALIB))
def test_bad_calibration_data(case, cnn_path, tmp_path):
    arrays, fragments = BAD_CALIB[case]
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", cnn_path, "-o", out, "--calib", _bad_calib(tmp_path, **arrays))
    _expect_error(result, *fragments)
    assert not out.exists()


def test_not_onnx_and_truncated_and_missing(cnn_path, calib_npz, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(cnn_path.read_bytes()[: cnn_path.stat().st_size // 2])
    out = tmp_path / "q.onnx"
    for bad, fragment in (
        (text, "notes.onnx"),
        (truncated, "truncated.onnx"),
        (tmp_path / "missing.onnx", "no such file"),
    ):
        _expect_error(_invoke("quantize", bad, "-o", out, "--calib", calib_npz), fragment)
        assert not out.exists()


def test_output_equal_to_input_is_refused(cnn_path, calib_npz):
    before = _digest(cnn_path)
    _expect_error(
        _invoke("quantize", cnn_path, "-o", cnn_path, "--calib", calib_npz), "input model"
    )
    assert _digest(cnn_path) == before


def test_unwritable_or_missing_output_folder(cnn_path, calib_npz, tmp_path):
    _expect_error(
        _invoke("quantize", cnn_path, "-o", tmp_path / "nope" / "q.onnx", "--calib", calib_npz),
        "does not exist",
    )
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root may write into a 0o500 folder; /proc refuses everyone
        target = locked if not os.access(locked, os.W_OK) else Path("/proc")
        out = target / "q.onnx"
        _expect_error(_invoke("quantize", cnn_path, "-o", out, "--calib", calib_npz), "write")
        assert not out.exists()
    finally:
        locked.chmod(0o700)


def test_unknown_domain_is_refused(tmp_path, calib_npz):
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "acme.ops" : 1]>
    g (float[N, 3, 16, 16] x) => (float[N, 3, 16, 16] y) { y = acme.ops.Warp(x) }
    """)
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    out = tmp_path / "q.onnx"
    _expect_error(_invoke("quantize", path, "-o", out, "--calib", calib_npz), "acme.ops")
    assert not out.exists()


def test_already_quantized_model_is_refused(cnn_path, calib_npz, tmp_path):
    first = tmp_path / "q.onnx"
    assert _invoke("quantize", cnn_path, "-o", first, "--calib", calib_npz).exit_code == 0
    out = tmp_path / "qq.onnx"
    _expect_error(_invoke("quantize", first, "-o", out, "--calib", calib_npz), "already quantized")
    assert not out.exists()


def test_bad_option_values(cnn_path, calib_npz, tmp_path):
    out = tmp_path / "q.onnx"
    _expect_error(
        _invoke(
            "quantize",
            cnn_path,
            "-o",
            out,
            "--calib",
            calib_npz,
            "--percentile",
            "10",
            "--method",
            "percentile",
        ),
        "percentile",
    )
    _expect_error(
        _invoke("quantize", cnn_path, "-o", out, "--calib", calib_npz, "--exclude-nodes", "conv[("),
        "regex",
    )
    assert not out.exists()


def test_dynamic_mode_needs_no_data(cnn_path, tmp_path):
    out, summary = tmp_path / "dyn.onnx", tmp_path / "dyn.json"
    result = _invoke(
        "quantize",
        cnn_path,
        "-o",
        out,
        "--mode",
        "dynamic",
        "--summary-json",
        summary,
        "--smooth-fold-only",
    )
    assert result.exit_code == 0, result.output
    assert "dynamic: reduce_range" in result.output and out.exists()
    report = json.loads(summary.read_text())
    assert report["config"]["mode"] == "dynamic" and report["samples"] == 0
    assert report["config"]["smooth_fold_only"] is True
    assert any(d["op_type"] == "Gemm" and d["quantized"] for d in report["decisions"])


def test_target_options_need_static_calibration(cnn_path, calib_npz, tmp_path):
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", cnn_path, "-o", out, "--calib", calib_npz, "--eval", calib_npz)
    _expect_error(result, "--eval")
    dynamic = _invoke("quantize", cnn_path, "-o", out, "--mode", "dynamic", "--min-sqnr", "20")
    _expect_error(dynamic, "--calib")
    assert not out.exists()
