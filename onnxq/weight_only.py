"""Weight-only quantization, orchestration only: load -> prepare (opset 21) -> [Hessians] ->
blocked integer weights -> embedding tables -> check.

Activations stay float. MatMul (and plain Gemm) weights become blocked uint4 (default), int4,
uint8 or int8 behind an opset-21 ``DequantizeLinear`` that ONNX Runtime fuses into
``MatMulNBits`` (``onnxq.passes.weight_only`` has the rules and what ORT does with them).
Calibration data, when given, only feeds GPTQ's input Hessians; without it weights round to
nearest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx

from onnxq.calibration.calibrate import collect_hessians
from onnxq.config import QuantConfig, QuantMode, QuantType, WeightRounding
from onnxq.errors import ConfigError, UnsupportedModelError
from onnxq.model_io import model_bytes, model_proto
from onnxq.passes.plan import check_op_types
from onnxq.passes.quantize_embeddings import quantize_embeddings
from onnxq.passes.weight_only import (
    WEIGHT_ONLY_OPSET,
    WEIGHT_ONLY_TYPES,
    quantize_weight_only_graph,
    weight_only_inputs,
)
from onnxq.pipeline import (
    MODE_OP_RULES,
    ModelSource,
    QuantizationReport,
    QuantResult,
    finish,
    prepare_float,
    refuse_quantized,
)
from onnxq.targets import check_activation_type, check_mode, get_target

DEFAULT_WEIGHT_TYPE = QuantType.UINT4
"""A zero point per block: on all-MiniLM-L6-v2 (block 32, GPTQ from 64 sentences) cosine to
fp32 0.975 rounded to nearest and 0.990 with GPTQ, where symmetric int4 (``[-7, 7]``, no zero
point) gets 0.961 and 0.985; the zero points cost 1% of the file."""

REDUCE_RANGE_REASON = "weight-only: activations stay float, so no u8 x s8 pair sums to keep small"


def quantize_weight_only(
    model: ModelSource,
    config: QuantConfig | None = None,
    *,
    calibration_data: Any = None,
    workers: int = 1,
) -> onnx.ModelProto:
    """Blocked integer MatMul weights, float activations; embedding tables int8 per row.

    ``config.weight_type`` (default uint4: 4-bit with a zero point per block) and
    ``config.block_size`` choose the blocks; ``calibration_data`` (any source
    ``onnxq.calibration.readers.open_feeds`` accepts), when given, lets GPTQ round each weight
    against its layer's inputs.
    """
    return quantize_weight_only_with_report(
        model, config, calibration_data=calibration_data, workers=workers
    ).model


def quantize_weight_only_with_report(
    model: ModelSource,
    config: QuantConfig | None = None,
    *,
    calibration_data: Any = None,
    workers: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> QuantResult:
    """``quantize_weight_only`` plus a ``QuantizationReport``; ``on_batch(samples)`` follows
    the Hessian collection."""
    config = resolve_weight_only(config)
    notes: list[str] = []
    if calibration_data is None and config.weight_rounding is WeightRounding.GPTQ:
        config = config.replace(weight_rounding=WeightRounding.NEAREST)
        notes.append("no calibration data: weights rounded to nearest (give data for GPTQ)")
    elif calibration_data is not None and config.weight_rounding is WeightRounding.NEAREST:
        notes.append("calibration data not read: nearest rounding needs none")
        calibration_data = None
    proto = model_proto(model)
    refuse_quantized(proto)
    try:
        float_model, float_proto, _ = prepare_float(
            proto, config, min_opset=WEIGHT_ONLY_OPSET, merge=False
        )
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"weight-only mode writes blocked DequantizeLinear, which needs opset "
            f"{WEIGHT_ONLY_OPSET}: {exc}"
        ) from None
    hessians, samples = {}, 0
    if calibration_data is not None:
        hessians, samples = collect_hessians(
            float_proto,
            weight_only_inputs(float_model, config),
            calibration_data,
            config,
            workers=workers,
            on_batch=on_batch,
        )
    decisions = quantize_weight_only_graph(float_model, config, hessians)
    if config.quantize_embeddings:
        decisions += quantize_embeddings(float_model)
    out = finish(float_model, config, QuantMode.WEIGHT_ONLY)
    report = QuantizationReport(
        decisions=decisions,
        size_before=model_bytes(proto),
        size_after=model_bytes(out),
        samples=samples,
        reduce_range=False,
        reduce_range_reason=REDUCE_RANGE_REASON,
        config={**config.to_dict(), "mode": QuantMode.WEIGHT_ONLY.value},
        target=get_target(config.target).to_dict(),
        notes=notes,
    )
    return QuantResult(out, report)


def resolve_weight_only(config: QuantConfig | None) -> QuantConfig:
    """``config`` (default ``QuantConfig()``) checked against weight-only mode and its target,
    with the target's scheme filled in and ``weight_type`` (default uint4) kept: the target's
    own weight type is its static one, and activations are float here."""
    config = config or QuantConfig()
    check_mode(get_target(config.target), QuantMode.WEIGHT_ONLY)
    check_activation_type(config, QuantMode.WEIGHT_ONLY)
    check_op_types(config, MODE_OP_RULES[QuantMode.WEIGHT_ONLY], QuantMode.WEIGHT_ONLY.value)
    weight_type = config.weight_type or DEFAULT_WEIGHT_TYPE
    if weight_type not in WEIGHT_ONLY_TYPES:
        choices = ", ".join(sorted(t.value for t in WEIGHT_ONLY_TYPES))
        raise ConfigError(f"weight-only mode writes {choices} weights, not {weight_type.value}")
    if config.reduce_range:
        raise ConfigError(f"reduce_range does not apply ({REDUCE_RANGE_REASON})")
    resolved = config.replace(weight_type=None, reduce_range=False).resolved()
    return resolved.replace(weight_type=weight_type)
