"""onnxq: calibrated int8 QDQ quantization of ONNX models, measured on ONNX Runtime.

The one-call API::

    import onnxq
    quantized = onnxq.quantize("model.onnx", {"input": calibration_images})
    dynamic = onnxq.quantize_dynamic("model.onnx")
    four_bit = onnxq.quantize_weight_only("model.onnx")
    finished = onnxq.finish_qdq("qat.onnx")  # a QDQ model from another tool, its own qparams
"""

from __future__ import annotations

from typing import Any

from onnxq.config import CalibrationMethod, QuantConfig, QuantMode, QuantType, WeightRounding
from onnxq.errors import OnnxqError

__all__ = [
    "CalibrationMethod",
    "OnnxqError",
    "QuantConfig",
    "QuantMode",
    "QuantType",
    "WeightRounding",
    "export_torch",
    "finish_qdq",
    "quantize",
    "quantize_dynamic",
    "quantize_weight_only",
]
__version__ = "0.1.0"


def quantize(model: Any, calibration_data: Any, config: QuantConfig | None = None) -> Any:
    """Static int8 QDQ quantization (see ``onnxq.pipeline.quantize``)."""
    from onnxq.pipeline import quantize as run

    return run(model, calibration_data, config)


def finish_qdq(model: Any, *, target: str | None = None) -> Any:
    """A QDQ model from another tool finished with its own qparams (see ``onnxq.finish``)."""
    from onnxq.finish import finish_qdq as run

    return run(model, target=target)


def quantize_dynamic(model: Any, config: QuantConfig | None = None, **options: Any) -> Any:
    """Int8 weights, activations quantized at run time (see ``onnxq.dynamic``)."""
    from onnxq.dynamic import quantize_dynamic as run

    return run(model, config, **options)


def quantize_weight_only(model: Any, config: QuantConfig | None = None, **options: Any) -> Any:
    """Blocked 4-bit (or 8-bit) MatMul weights, float activations (see ``onnxq.weight_only``)."""
    from onnxq.weight_only import quantize_weight_only as run

    return run(model, config, **options)


def export_torch(module: Any, example_inputs: Any, path: Any, **options: Any) -> Any:
    """PyTorch module -> ONNX, checked in ONNX Runtime (see ``onnxq.export``; needs torch)."""
    from onnxq.export import export_torch as run

    return run(module, example_inputs, path, **options)
