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
from onnxq.config import QuantConfig
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


def test_target_without_its_runtime_here_is_measured_in_ort_and_checked(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out_json = tmp_path / "trt.json"
    result = _invoke(
        "compare", files["fp32"], files["int8"], "--data", files["data"], "--target", "tensorrt",
        "--json", out_json, *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    notes = json.loads(out_json.read_text())["notes"]
    assert any("tensorrt does not run here; measured in ONNX Runtime CPU" in n for n in notes)
    (checked,) = [n for n in notes if n.startswith("cnn_int8 (written for ort-cpu)")]
    assert "violation(s) of target tensorrt's rules" in checked  # u8 activations, zero point 128


def test_ort_mobile_target_runs_the_ort_files(files: dict[str, Path], tmp_path: Path) -> None:
    from onnxq.targets.ort_format import write_ort

    model = tmp_path / "cnn_int8.onnx"
    model.write_bytes(files["int8"].read_bytes())
    write_ort(model)
    rows = {}
    for target in ("ort-cpu", "ort-mobile"):
        out_json = tmp_path / f"{target}.json"
        result = _invoke(
            "compare", files["fp32"], model, "--data", files["data"], "--target", target,
            "--json", out_json, *FAST,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        data = json.loads(out_json.read_text())
        rows[target] = data
    assert any("run from their .ort files" in n for n in rows["ort-mobile"]["notes"])
    assert any("meets target ort-mobile's rules" in n for n in rows["ort-mobile"]["notes"])
    sqnr = [rows[t]["quantized"][0]["accuracy"]["sqnr_db"] for t in rows]
    assert sqnr[0] > 25 and abs(sqnr[0] - sqnr[1]) < 1e-3  # the .ort computes the same outputs


def test_openvino_target_runs_in_openvino(files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    images = np.load(files["data"])["x"]
    model = tmp_path / "cnn_ov.onnx"
    onnx.save(quantize(files["fp32"], {"x": images}, QuantConfig(target="openvino")), model)
    out_json = tmp_path / "ov.json"
    result = _invoke(
        "compare", files["fp32"], model, "--data", files["data"], "--target", "openvino",
        "--json", out_json, *FAST[:-1],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert any("measured in OpenVINO's CPU plugin" in n for n in data["notes"])
    assert data["environment"]["runtime"].startswith("OpenVINO ")
    assert any("peak memory not measured in openvino" in n for n in data["notes"])
    assert any("cnn_ov: meets target openvino's rules" in n for n in data["notes"])
    assert data["quantized"][0]["accuracy"]["sqnr_db"] > 25
