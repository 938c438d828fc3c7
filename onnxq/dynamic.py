"""Dynamic quantization, orchestration only: load -> prepare -> int8 weights -> check.

No calibration data: activations are quantized at run time by ``DynamicQuantizeLinear``.
"""

from __future__ import annotations

from typing import Any

import onnx

from onnxq.config import QuantConfig
from onnxq.model_io import model_proto
from onnxq.passes.dynamic_quant import quantize_dynamic_graph
from onnxq.passes.quantize_embeddings import quantize_embeddings
from onnxq.pipeline import (
    ModelSource,
    QuantizationReport,
    QuantResult,
    finish,
    prepare_float,
    refuse_quantized,
    resolve_reduce_range,
)


def quantize_dynamic(
    model: ModelSource, config: QuantConfig | None = None, *, calibration_data: Any = None
) -> onnx.ModelProto:
    """Int8 weights (MatMul, Gemm, LSTM, embedding tables), activations quantized at run time.

    No data is needed; ``calibration_data``, when given, feeds SmoothQuant only.
    """
    return quantize_dynamic_with_report(model, config, calibration_data=calibration_data).model


def quantize_dynamic_with_report(
    model: ModelSource, config: QuantConfig | None = None, *, calibration_data: Any = None
) -> QuantResult:
    """``quantize_dynamic`` plus a ``QuantizationReport`` (``samples`` is 0)."""
    config = config or QuantConfig()
    proto = model_proto(model)
    refuse_quantized(proto)
    reduce_range, reduce_reason = resolve_reduce_range(config)
    float_model, _, notes = prepare_float(proto, config, calibration_data)
    decisions = quantize_dynamic_graph(float_model, config, reduce_range=reduce_range)
    if config.quantize_embeddings:
        decisions += quantize_embeddings(float_model)
    out = finish(float_model, config, reduce_range)
    report = QuantizationReport(
        decisions=decisions,
        size_before=proto.ByteSize(),
        size_after=out.ByteSize(),
        samples=0,
        reduce_range=reduce_range,
        reduce_range_reason=reduce_reason,
        config={**config.to_dict(), "mode": "dynamic"},
        notes=notes,
    )
    return QuantResult(out, report)
