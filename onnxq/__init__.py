"""onnxq: calibrated int8 QDQ quantization of ONNX models, measured on ONNX Runtime."""

from onnxq.config import CalibrationMethod, QuantConfig, QuantMode, QuantType
from onnxq.errors import OnnxqError

__all__ = [
    "CalibrationMethod",
    "OnnxqError",
    "QuantConfig",
    "QuantMode",
    "QuantType",
]
__version__ = "0.1.0"
