"""What ORT runs: every Conv of a quantized CNN as QLinearConv, float models stay float."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from support import small_cnn

from onnxq.errors import InvalidModelError, ProviderError
from onnxq.inspect import category, count_int8_kernels, family, format_inspect, inspect_model
from onnxq.pipeline import quantize


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inspect")
    fp32, int8 = folder / "cnn.onnx", folder / "cnn_int8.onnx"
    model = small_cnn(convs=3, classes=4)
    onnx.save(model, fp32)
    calib = {"x": np.random.default_rng(1).normal(size=(8, 3, 8, 8)).astype(np.float32)}
    onnx.save(quantize(model, calib), int8)
    return fp32, int8


def test_every_conv_of_a_quantized_cnn_runs_as_qlinearconv(models: tuple[Path, Path]) -> None:
    _, int8 = models
    report = inspect_model(int8)
    conv = next(f for f in report.families if f.family == "Conv")
    assert conv.int8 == {"QLinearConv": 3}
    assert conv.float_ops == {}
    assert conv.total == conv.in_file == 3
    assert conv.describe() == "Conv: 3 of 3 run as QLinearConv"
    assert report.categories["float"] == {}
    assert count_int8_kernels(int8)["QLinearConv"] == 3
    text = format_inspect(report)
    assert "Conv: 3 of 3 run as QLinearConv" in text
    assert report.optimization_level == "extended"
    json.dumps(report.to_dict())
    assert report.to_dict()["totals"]["int8"] == sum(report.int8_kernels.values())


def test_float_model_has_no_int8_kernels(models: tuple[Path, Path]) -> None:
    fp32, _ = models
    report = inspect_model(fp32)
    assert count_int8_kernels(fp32) == {}
    conv = next(f for f in report.families if f.family == "Conv")
    assert conv.int8_count == 0 and conv.total == 3
    assert "Conv: 0 of 3 run as int8 kernels" in format_inspect(report)


def test_unfused_qdq_is_reported(tmp_path: Path) -> None:
    """A lone Q/DQ pair around Relu has no int8 kernel: it stays as QDQ overhead."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    qdq (float[N, 4] x) => (float[N, 4] y) {
        s = Constant<value = float {0.1}>()
        z = Constant<value = uint8 {128}>()
        q = QuantizeLinear(x, s, z)
        d = DequantizeLinear(q, s, z)
        y = Relu(d)
    }
    """
    path = tmp_path / "qdq.onnx"
    onnx.save(onnx.parser.parse_model(text), path)
    report = inspect_model(path)
    assert report.categories["int8"] == {}
    assert sum(report.categories["qdq"].values()) >= 1
    assert "no int8 kernel runs" in format_inspect(report)


def test_categories_and_families() -> None:
    assert (category("QLinearMatMul"), family("QLinearMatMul")) == ("int8", "MatMul")
    assert (category("FusedConv"), family("FusedConv")) == ("float", "Conv")
    assert category("DequantizeLinear") == "qdq"
    assert (category("Relu"), family("Relu")) == ("other", "Relu")


def test_errors(tmp_path: Path, models: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidModelError):
        inspect_model(tmp_path / "missing.onnx")
    with pytest.raises(ProviderError):
        inspect_model(models[1], "tpu")
