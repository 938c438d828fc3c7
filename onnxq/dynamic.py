"""Dynamic quantization, orchestration only: load -> prepare -> int8 weights -> check.

No calibration data: activations are quantized at run time by ``DynamicQuantizeLinear``.
SmoothQuant statistics come from the calibration data when given, else, for token models,
from random token sequences (``onnxq.calibration.synthetic``).
"""

from __future__ import annotations

from typing import Any

import onnx

from onnxq.calibration.synthetic import synthetic_token_feeds
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

SYNTHETIC_SEQUENCES = 32


def quantize_dynamic(
    model: ModelSource, config: QuantConfig | None = None, *, calibration_data: Any = None
) -> onnx.ModelProto:
    """Int8 weights (MatMul, Gemm, LSTM, embedding tables), activations quantized at run time.

    No data is needed; ``calibration_data``, when given, feeds SmoothQuant only (token models
    without it are smoothed from random token sequences).
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
    smoothing_data, source_notes = calibration_data, []
    if calibration_data is None and config.smooth_alpha is not None:
        smoothing_data = synthetic_token_feeds(proto, samples=SYNTHETIC_SEQUENCES)
        if smoothing_data is not None:
            source_notes = [
                f"SmoothQuant statistics from {SYNTHETIC_SEQUENCES} random token sequences "
                "(no calibration data given)"
            ]
    float_model, _, notes = prepare_float(proto, config, smoothing_data)
    notes = source_notes + notes if notes else notes
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
