"""Issue acceptance on a ResNet-18-style CNN at 224x224 exported from PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from support import optimized_op_counts, run, sqnr_db

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from calibration.images import eval_inputs, resnet_inputs
from models.resnet import resnet18_factory
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.export import export_torch
from onnxq.pipeline import quantize_with_report


@pytest.fixture(scope="module")
def resnet_fp32(tmp_path_factory) -> Path:
    module, example = resnet18_factory()
    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    export_torch(module, example, path)
    return path


@pytest.fixture(scope="module")
def eval_images() -> np.ndarray:
    return eval_inputs(8)  # disjoint in pixels from the calibration crops


# (target, range method, SQNR floor, how the floor is measured). ort-cpu writes 7-bit weights,
# exact on every CPU, so ORT's fused int8 kernels are measured; ort-x86-vnni's 8-bit weights are
# exact only on VNNI CPUs, so its floor is checked on the float (fake-quant) graph, which is what
# a VNNI CPU computes on any machine. Measured: ort-cpu 29.2 / 29.5 dB, ort-x86-vnni 30.1 dB
# (ORT's own quantizer with its best CPU settings: 26.1 dB).
CASES = [
    ("ort-cpu", CalibrationMethod.PERCENTILE, 29.0, "fused"),
    ("ort-cpu", CalibrationMethod.MSE, 29.0, "fused"),
    ("ort-x86-vnni", CalibrationMethod.PERCENTILE, 30.0, "fake-quant"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("target", "method", "floor", "measured"), CASES)
def test_resnet18_int8_is_small_close_and_fully_fused(
    resnet_fp32, eval_images, target, method, floor, measured, tmp_path
):
    calib = {"input": resnet_inputs(16)}
    config = QuantConfig(target=target, method=method, batch_size=8)
    result = quantize_with_report(resnet_fp32, calib, config)
    quantized = result.model
    onnx.checker.check_model(quantized, full_check=True)
    assert result.report.samples == 16
    assert result.report.quality["sqnr_db"] > 20 and not result.report.warnings  # no collapse

    fp32_size = resnet_fp32.stat().st_size
    assert quantized.ByteSize() <= 0.30 * fp32_size

    reference = run(resnet_fp32, {"input": eval_images})[0]
    approx = run(quantized, {"input": eval_images}, fused=measured == "fused")[0]
    assert sqnr_db(reference, approx) >= floor

    fp32_convs = sum(n.op_type == "Conv" for n in onnx.load(resnet_fp32).graph.node)
    counts = optimized_op_counts(quantized, tmp_path)
    assert fp32_convs == 20
    assert counts.get("QLinearConv", 0) == fp32_convs
    assert "Conv" not in counts
