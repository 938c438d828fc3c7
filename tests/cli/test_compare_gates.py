"""``onnxq compare`` gates (exit 1 with the failing rows), metrics chosen by output shape, the
time budget, and ``onnxq.testing.assert_quantized_close``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from click.testing import CliRunner
from support import small_cnn

from onnxq.cli import main
from onnxq.evaluate import compare
from onnxq.pipeline import quantize
from onnxq.testing import assert_quantized_close

FAST = ("--runs", "3", "--warmup", "1", "--throughput-batch", "4", "--no-memory")


def _invoke(*args: str | os.PathLike[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def saliency_net() -> onnx.ModelProto:
    """Conv-Relu-Conv to a one-channel map ``[N, 1, 8, 8]``: no classes, no top-1."""
    rng = np.random.default_rng(3)
    w1 = (0.3 * rng.normal(size=(8, 3, 3, 3))).astype(np.float32)
    w2 = (0.3 * rng.normal(size=(1, 8, 3, 3))).astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["a"], ["r"]),
        oh.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = oh.make_graph(
        nodes, "saliency", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")],
    )  # fmt: skip
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gates")
    images = np.random.default_rng(1).normal(size=(12, 3, 8, 8)).astype(np.float32)
    paths = {name: folder / f"{name}.onnx" for name in ("cnn", "cnn_int8", "sal", "sal_int8")}
    for name, model in (("cnn", small_cnn(classes=5)), ("sal", saliency_net())):
        onnx.save(model, paths[name])
        onnx.save(quantize(model, {"x": images}), paths[f"{name}_int8"])
    paths["data"] = folder / "data.npz"
    np.savez(paths["data"], x=images)
    return paths


def _compare(files, model: str, *args: str):
    return _invoke(
        "compare", files[model], files[f"{model}_int8"], "--data", files["data"], *FAST, *args
    )


def test_gates_pass(files):
    result = _compare(files, "cnn", "--min-cosine", "0.99", "--min-sqnr", "20", "--max-drop", "10")
    assert result.exit_code == 0, result.output
    assert "all gates passed for 1 model(s)" in result.output and "FAIL" not in result.output


def test_gates_fail_with_the_failing_rows(files):
    result = _compare(files, "cnn", "--min-cosine", "0.99999999", "--min-sqnr", "20")
    assert result.exit_code == 1, result.output
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL cnn_int8: cosine mean 0.99")
    assert float(fails[0].split()[4].rstrip(",")) < 0.99999999
    assert "required >= 0.99999999" in fails[0]
    assert any(line.startswith("cnn_int8 ") for line in result.output.splitlines())  # the table
    slow = _compare(files, "cnn", "--max-latency-ratio", "0.0001")
    assert slow.exit_code == 1 and "FAIL cnn_int8: p50 latency / fp32" in slow.output


def test_bad_gate_is_a_one_line_error(files):
    result = _compare(files, "cnn", "--min-cosine", "2")
    assert result.exit_code == 2 and "error: min_cosine must be in [-1, 1]" in result.output


def test_no_top1_for_a_saliency_map(files, tmp_path):
    out = tmp_path / "r.json"
    result = _compare(files, "sal", "--json", str(out), "--min-cosine", "0.99")
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["quantized"][0]["accuracy"]
    assert row["agreement"] is None and row["top1"] is None and row["cosine_mean"] > 0.99
    gated = _compare(files, "sal", "--max-drop", "1")
    assert gated.exit_code == 1
    assert "top-1 drop (points) not measured (the first output is not classifier" in gated.output


def test_time_budget_and_progress(files):
    seen: list[tuple[str, int, int]] = []
    result = compare(
        files["cnn"], [files["cnn_int8"]], files["data"], latency_runs=100_000, warmup=1,
        throughput_batch=4, measure_memory=False, max_seconds=0.2,
        on_run=lambda name, done, total: seen.append((name, done, total)),
    )  # fmt: skip
    assert 1 <= result.quantized[0].latency.runs < 100_000  # 100k runs cannot fit in 0.16 s
    assert result.settings["max_seconds"] == 0.2
    total = 2 * (100_000 + 10_000)
    assert seen[-1][1:] == (total, total)  # skipped runs count as done: the bar completes
    assert {name for name, _, _ in seen} == {"cnn", "cnn_int8"}


def test_assert_quantized_close(files):
    data = {"x": np.random.default_rng(5).normal(size=(8, 3, 8, 8)).astype(np.float32)}
    assert_quantized_close(files["cnn"], files["cnn_int8"], data, min_cosine=0.99, max_drop=25)
    with pytest.raises(AssertionError, match=r"quantized: SQNR dB \d+.*required >= 200"):
        assert_quantized_close(files["cnn"], onnx.load(files["cnn_int8"]), data, min_sqnr=200)
    with pytest.raises(AssertionError, match="not classifier-shaped"):
        assert_quantized_close(files["sal"], files["sal_int8"], data, max_drop=1)
    with pytest.raises(ValueError, match="at least one limit"):
        assert_quantized_close(files["cnn"], files["cnn_int8"], data)
