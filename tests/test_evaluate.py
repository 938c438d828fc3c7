"""Metrics on constructed cases, labels, speed/memory rows, JSON, table and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from support import small_cnn

from onnxq.errors import CalibrationDataError, InvalidModelError
from onnxq.evaluate import (
    CUDA_NOTE,
    compare,
    cosine_per_sample,
    load_labels,
    sqnr_db,
    top1,
)
from onnxq.pipeline import quantize
from onnxq.report import format_table, plot

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
FAST = {"latency_runs": 3, "warmup": 1, "throughput_runs": 2, "measure_memory": False}

IDENTITY = """
<ir_version: 8, opset_import: ["" : 17]>
ident (float[N, 5] x) => (float[N, 5] y) {
    y = Identity(x)
}
"""
SCALED = """
<ir_version: 8, opset_import: ["" : 17]>
scaled (float[N, 5] x) => (float[N, 5] y) {
    s = Constant<value = float {1.1}>()
    y = Mul(x, s)
}
"""


def _save(text: str, path: Path) -> Path:
    onnx.save(onnx.parser.parse_model(text), path)
    return path


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(size=(12, 5)).astype(np.float32)}


# --- pure metrics ------------------------------------------------------------------------------


def test_sqnr_known_values() -> None:
    x = np.random.default_rng(0).normal(size=(4, 7))
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, 1.1 * x) == pytest.approx(20.0, abs=1e-9)  # ||0.1 x|| = ||x|| / 10
    assert sqnr_db(x, 1.01 * x) == pytest.approx(40.0, abs=1e-9)
    # over several arrays concatenated: energies add, not dB
    a, b = np.ones(3), np.ones(1)
    expected = 10 * math.log10(4 / (0.5**2 * 3 + 0))
    assert sqnr_db([a, b], [a * 1.5, b]) == pytest.approx(expected, abs=1e-9)
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="shape"):
        sqnr_db(np.ones(3), np.ones(4))


def test_cosine_per_sample() -> None:
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    out = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(cosine_per_sample(ref, out), [0.0, 1.0, 1.0, 0.0, -1.0])


def test_top1_and_labels(tmp_path: Path) -> None:
    np.testing.assert_array_equal(top1(np.array([[0.1, 0.9], [3.0, -1.0]])), [1, 0])
    np.save(tmp_path / "l.npy", np.array([1, 2]))
    np.testing.assert_array_equal(load_labels(tmp_path / "l.npy"), [1, 2])
    np.savez(tmp_path / "one.npz", whatever=np.array([3]))
    np.testing.assert_array_equal(load_labels(tmp_path / "one.npz"), [3])
    np.savez(tmp_path / "named.npz", labels=np.array([4]), extra=np.array([5]))
    np.testing.assert_array_equal(load_labels(tmp_path / "named.npz"), [4])
    np.testing.assert_array_equal(load_labels(np.array([1.0, 2.0])), [1, 2])
    np.savez(tmp_path / "two.npz", a=np.array([1]), b=np.array([2]))
    for bad in (tmp_path / "two.npz", tmp_path / "missing.npy", np.array([0.5]), np.array([])):
        with pytest.raises(CalibrationDataError):
            load_labels(bad)


# --- compare -----------------------------------------------------------------------------------


def test_identical_models(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = _save(IDENTITY, tmp_path / "ident.onnx")
    result = compare(path, [path], data, batch_size=5, **FAST)
    (row,) = result.quantized
    acc = row.accuracy
    assert acc.samples == 12
    assert acc.sqnr_db == math.inf
    assert acc.cosine_mean == pytest.approx(1.0) and acc.cosine_min == pytest.approx(1.0)
    assert acc.agreement == 1.0
    assert acc.max_abs_error == 0.0
    assert acc.top1 is None  # no labels
    assert row.name == "ident#2" and result.fp32.name == "ident"
    assert result.ratios(row)["size"] == 1.0


def test_known_difference(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    ref = _save(IDENTITY, tmp_path / "ident.onnx")
    scaled = _save(SCALED, tmp_path / "scaled.onnx")
    result = compare(ref, [scaled], data, batch_size=4, **FAST)
    acc = result.quantized[0].accuracy
    assert acc.sqnr_db == pytest.approx(20.0, abs=0.01)
    assert acc.cosine_min == pytest.approx(1.0, abs=1e-6)
    assert acc.agreement == 1.0  # scaling keeps the argmax
    assert acc.max_abs_error == pytest.approx(0.1 * np.abs(data["x"]).max(), rel=1e-5)


def test_labels_top1(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    ref = _save(IDENTITY, tmp_path / "ident.onnx")
    scaled = _save(SCALED, tmp_path / "scaled.onnx")
    labels = data["x"].argmax(axis=1)
    labels[:3] = (labels[:3] + 1) % 5  # 3 of 12 wrong
    result = compare(ref, [scaled], data, labels=labels, batch_size=5, **FAST)
    assert result.fp32.accuracy.top1 == pytest.approx(0.75)
    assert result.quantized[0].accuracy.top1 == pytest.approx(0.75)
    np.save(tmp_path / "onehot.npy", np.eye(5)[labels])
    again = compare(ref, [scaled], data, labels=tmp_path / "onehot.npy", **FAST)
    assert again.quantized[0].accuracy.top1 == pytest.approx(0.75)
    with pytest.raises(CalibrationDataError, match="labels"):
        compare(ref, [scaled], data, labels=labels[:10], **FAST)
    with pytest.raises(CalibrationDataError, match="13 labels for 12"):
        compare(ref, [scaled], data, labels=np.append(labels, 0), **FAST)
    limited = compare(ref, [scaled], data, labels=labels, max_samples=4, **FAST)
    assert limited.quantized[0].accuracy.samples == 4
    assert limited.fp32.accuracy.top1 == pytest.approx(0.25)  # samples 0-2 wrong, 3 right


def _cnn_and_int8(
    tmp_path: Path, *, seed: int, samples: int
) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A small CNN, its int8 quantization (calibrated on the images), and the images."""
    rng = np.random.default_rng(seed)
    images = {"x": rng.normal(size=(samples, 3, 8, 8)).astype(np.float32)}
    fp32, int8 = tmp_path / "cnn.onnx", tmp_path / "cnn_int8.onnx"
    onnx.save(small_cnn(classes=6), fp32)
    onnx.save(quantize(fp32, images), int8)
    return fp32, int8, images


def test_quantized_cnn_rows_json_table_plot(tmp_path: Path) -> None:
    fp32, int8, images = _cnn_and_int8(tmp_path, seed=2, samples=10)
    result = compare(
        fp32,
        [int8],
        images,
        batch_size=4,
        latency_runs=4,
        warmup=1,
        throughput_batch=16,
        throughput_runs=2,
        measure_memory=True,
    )
    q = result.quantized[0]
    assert q.accuracy.sqnr_db > 25
    assert q.accuracy.agreement > 0.8
    assert q.latency.batch == 1 and q.latency.runs == 4
    assert q.throughput_batch == 16 and q.throughput > 0  # 10 samples tiled to 16
    assert result.fp32.peak_memory_bytes and result.fp32.peak_memory_bytes > 0
    assert q.peak_memory_bytes and q.peak_memory_bytes > 0
    assert q.size_bytes == int8.stat().st_size

    data = result.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert set(data) == {"fp32", "quantized", "environment", "settings", "notes"}
    row = data["quantized"][0]
    assert {"name", "size_bytes", "latency", "throughput", "peak_memory_bytes", "accuracy"} <= set(
        row
    )
    assert {"p50_ms", "p90_ms"} <= set(row["latency"])
    assert {"top1", "agreement", "sqnr_db", "cosine_mean", "cosine_min", "max_abs_error"} <= set(
        row["accuracy"]
    )
    assert {"size", "p50", "throughput"} <= set(row["ratios"])
    assert data["environment"]["provider"] == "cpu"
    assert "cpu_features" in text

    table = format_table(result)
    assert "cnn_int8" in table and "SQNR dB" in table and "CPUExecutionProvider" in table

    png = plot(result, tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_identical_json_has_inf_as_string(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = _save(IDENTITY, tmp_path / "ident.onnx")
    out = compare(path, [path], data, **FAST).to_dict()
    assert out["quantized"][0]["accuracy"]["sqnr_db"] == "inf"
    json.dumps(out, allow_nan=False)


def test_mismatched_models_are_refused(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    ref = _save(IDENTITY, tmp_path / "ident.onnx")
    renamed = IDENTITY.replace("float[N, 5] y", "float[N, 5] z").replace("y =", "z =")
    other = _save(renamed, tmp_path / "other.onnx")
    with pytest.raises(InvalidModelError, match="lacks output y"):
        compare(ref, [other], data, **FAST)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDAExecutionProvider")
def test_compare_on_cuda(tmp_path: Path) -> None:
    fp32, int8, images = _cnn_and_int8(tmp_path, seed=3, samples=8)
    result = compare(fp32, [int8], images, provider="cuda", **FAST)
    assert result.environment["ort_provider"] == "CUDAExecutionProvider"
    assert CUDA_NOTE in result.notes
    assert result.quantized[0].accuracy.sqnr_db > 25
