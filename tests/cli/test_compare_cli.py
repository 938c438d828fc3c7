"""``onnxq compare`` and ``onnxq inspect`` through click."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from support import small_cnn

from onnxq.cli import main
from onnxq.pipeline import quantize

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _invoke(*args: str | os.PathLike[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compare_cli")
    images = np.random.default_rng(1).normal(size=(12, 3, 8, 8)).astype(np.float32)
    model = small_cnn(classes=5)
    paths = {
        "fp32": folder / "cnn.onnx",
        "int8": folder / "cnn_int8.onnx",
        "data": folder / "data.npz",
        "labels": folder / "labels.npy",
    }
    onnx.save(model, paths["fp32"])
    onnx.save(quantize(model, {"x": images}), paths["int8"])
    np.savez(paths["data"], x=images)
    logits = ort.InferenceSession(paths["fp32"]).run(None, {"x": images})[0]
    np.save(paths["labels"], logits.argmax(axis=1))  # fp32 top-1 is 100% by construction
    return paths


FAST = ("--runs", "3", "--warmup", "1", "--throughput-batch", "4", "--no-memory")


def test_compare_table_json_and_plot(files: dict[str, Path], tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    result = _invoke(
        "compare", files["fp32"], files["int8"], "--data", files["data"],
        "--labels", files["labels"], "--json", out_json, "--plot", out_png,
        "--batch-size", "5", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("cnn_int8 ") for line in lines)
    assert any(line.startswith("cnn ") and "100.00%" in line for line in lines)
    assert f"wrote {out_json}" in result.output and f"wrote {out_png}" in result.output
    data = json.loads(out_json.read_text())
    assert data["fp32"]["accuracy"]["top1"] == 1.0
    (row,) = data["quantized"]
    assert row["name"] == "cnn_int8"
    assert row["accuracy"]["samples"] == 12
    assert row["accuracy"]["sqnr_db"] > 25
    assert row["latency"]["runs"] == 3 and row["throughput_batch"] == 4
    assert data["settings"]["batch_size"] == 5
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_samples(files: dict[str, Path]) -> None:
    result = _invoke(
        "compare", files["fp32"], files["int8"], "--data", files["data"],
        "--max-samples", "5", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "accuracy on 5 samples" in result.output


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal where CUDA is absent")
def test_cuda_missing_fails_cleanly_and_writes_nothing(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    result = _invoke(
        "compare", files["fp32"], files["int8"], "--data", files["data"],
        "--provider", "cuda", "--json", out_json, "--plot", out_png, *FAST,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error: CUDA execution provider is not available (onnxruntime" in result.output
    assert "install the onnxruntime-gpu build" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_exit_2(files: dict[str, Path], tmp_path: Path) -> None:
    missing = _invoke("compare", files["fp32"], tmp_path / "nope.onnx", "--data", files["data"])
    assert missing.exit_code == 2 and "no such file" in missing.output
    same = _invoke(
        "compare", files["fp32"], files["int8"], "--data", files["data"], "--json", files["int8"]
    )
    assert same.exit_code == 2 and "refusing to overwrite" in same.output
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(3, dtype=np.int64))
    labels = _invoke(
        "compare", files["fp32"], files["int8"], "--data", files["data"], "--labels", short, *FAST
    )
    assert labels.exit_code == 2 and "labels" in labels.output


def test_inspect(files: dict[str, Path], tmp_path: Path) -> None:
    out_json = tmp_path / "i.json"
    result = _invoke("inspect", files["int8"], "--json", out_json)
    assert result.exit_code == 0, result.output
    assert "Conv: 2 of 2 run as QLinearConv" in result.output
    data = json.loads(out_json.read_text())
    assert data["categories"]["int8"]["QLinearConv"] == 2
    assert data["optimization_level"] == "extended"
    assert _invoke("inspect", tmp_path / "missing.onnx").exit_code == 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDAExecutionProvider")
def test_compare_on_cuda(files: dict[str, Path]) -> None:
    result = _invoke(
        "compare", files["fp32"], files["int8"], "--data", files["data"], "--provider", "cuda",
        *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "CUDAExecutionProvider" in result.output
    assert "no int8 QLinearConv/QLinearMatMul kernels" in result.output
