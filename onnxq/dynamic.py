"""Dynamic quantization, orchestration only: load -> prepare -> int8 weights -> check.

No calibration data: activations are quantized at run time by ``DynamicQuantizeLinear``.
SmoothQuant statistics come from the calibration data when given, else, for token models,
from random token sequences (``onnxq.calibration.synthetic``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.calibration.calibrate import calibrate_plan, needs_hessians
from onnxq.calibration.readers import open_feeds
from onnxq.calibration.synthetic import synthetic_token_feeds
from onnxq.config import QuantConfig, QuantMode
from onnxq.errors import CalibrationDataError, OnnxqError, first_line
from onnxq.evaluate import sqnr_db
from onnxq.ir_io import from_proto, to_proto
from onnxq.model_io import input_specs, model_bytes, model_proto
from onnxq.passes.dynamic_quant import quantize_dynamic_graph
from onnxq.passes.merge_matmuls import merge_matmuls, merged_note
from onnxq.passes.plan import NodeDecision, QuantPlan, plan_quantization, subgraph_decisions
from onnxq.passes.quantize_embeddings import quantize_embeddings
from onnxq.pipeline import (
    ModelSource,
    QuantizationReport,
    QuantResult,
    check_quality,
    finish,
    prepare_float,
    quality_fields,
    refuse_quantized,
    resolve_config,
)
from onnxq.quality import OutputQuality
from onnxq.runtime import make_session, run_float_outputs
from onnxq.smoothing import smooth_from_data
from onnxq.targets import get_target

SYNTHETIC_SEQUENCES = 32
GUARD_BATCHES = 4


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
    """``quantize_dynamic`` plus a ``QuantizationReport`` (``samples`` is 0).

    SmoothQuant is kept only if it raises the output SQNR (against fp32) on the first
    ``GUARD_BATCHES`` batches of the data it was computed from; else the unsmoothed model is
    returned, and the report says so.
    """
    config, reduce_reason = resolve_config(config, QuantMode.DYNAMIC)
    proto = model_proto(model)
    refuse_quantized(proto)
    # no data: nothing smoothed; merged after smoothing, which folds through value MatMuls
    plain_model, prepared, notes = prepare_float(proto, config, merge=False)
    smoothed_model, smoothing_data, smooth_notes = _smooth(prepared, config, calibration_data)
    notes += smooth_notes
    if smoothed_model is not None:
        merge_matmuls(smoothed_model, config)
    if merged := merge_matmuls(plain_model, config):
        notes.append(merged_note(merged))
    if smoothed_model is None:
        out, decisions = _quantize(plain_model, config, calibration_data)
    else:  # the plain candidate records what it is: no smoothing
        smoothed = _quantize(smoothed_model, config, calibration_data)
        plain = _quantize(plain_model, config.replace(smooth=False), calibration_data)
        out, decisions, verdict = _keep_smoothing_if_it_pays(
            proto, smoothed, plain, smoothing_data, config
        )
        notes.append(verdict)
    quality = _quality(prepared, out, decisions, calibration_data, smoothing_data, config, notes)
    report = QuantizationReport(
        decisions=decisions,
        size_before=model_bytes(proto),
        size_after=model_bytes(out),
        samples=0,
        reduce_range=config.reduce_range,
        reduce_range_reason=reduce_reason,
        config={**config.to_dict(), "mode": "dynamic"},
        target=get_target(config.target).to_dict(),
        notes=notes,
        **quality_fields(quality),
    )
    return QuantResult(out, report)


def _smooth(
    prepared: onnx.ModelProto, config: QuantConfig, calibration_data: Any
) -> tuple[ir.Model | None, Any, list[str]]:
    """SmoothQuant on a copy of the prepared float model, from the calibration data, else
    (token models) from random token sequences: the smoothed model (``None`` where nothing was
    smoothed), the data it read, and notes."""
    if not config.smooth:
        return None, None, []
    data, notes = calibration_data, []
    if data is None:
        data = synthetic_token_feeds(prepared, samples=SYNTHETIC_SEQUENCES)
        if data is None:
            return None, None, []
        notes = [
            f"SmoothQuant statistics from {SYNTHETIC_SEQUENCES} random token sequences "
            "(no calibration data given)"
        ]
    model = from_proto(prepared)
    try:
        changed, smooth_notes = smooth_from_data(model, prepared, data, config)
    except CalibrationDataError as exc:
        if calibration_data is not None:
            raise
        # smoothing is optional: this model just cannot take made-up tokens
        return None, None, [f"SmoothQuant skipped: random token sequences fail ({first_line(exc)})"]
    return (model if changed else None), data, notes + smooth_notes


def _quality(
    prepared: onnx.ModelProto,
    out: onnx.ModelProto,
    decisions: list[NodeDecision],
    calibration_data: Any,
    smoothing_data: Any,
    config: QuantConfig,
    notes: list[str],
) -> OutputQuality | None:
    """Output quality on the user's data, else on the random token sequences; those are made
    up, so a failure on them is a note, never a refusal."""
    if calibration_data is not None:
        return check_quality(prepared, out, decisions, calibration_data, config)
    try:
        return check_quality(prepared, out, decisions, smoothing_data, config)
    except OnnxqError as exc:
        notes.append(
            f"output quality not measured: random token sequences fail ({first_line(exc)})"
        )
        return None


def _keep_smoothing_if_it_pays(
    proto: onnx.ModelProto,
    smoothed: tuple[onnx.ModelProto, list[NodeDecision]],
    plain: tuple[onnx.ModelProto, list[NodeDecision]],
    smoothing_data: Any,
    config: QuantConfig,
) -> tuple[onnx.ModelProto, list[NodeDecision], str]:
    """The smoothed build, or the plain one where that has the higher output SQNR against
    ``proto`` on the first ``GUARD_BATCHES`` batches of ``smoothing_data``; and the verdict."""
    feeds = open_feeds(smoothing_data, input_specs(proto), batch_size=config.batch_size)
    smoothed_db, plain_db = _output_sqnr(
        proto, (smoothed[0], plain[0]), islice(feeds, GUARD_BATCHES)
    )
    verdict = f"output SQNR {smoothed_db:.1f} dB smoothed, {plain_db:.1f} dB not"
    if smoothed_db >= plain_db:
        return *smoothed, f"SmoothQuant kept: {verdict}"
    return *plain, f"SmoothQuant dropped: {verdict}"


def _quantize(
    float_model: ir.Model, config: QuantConfig, data: Any
) -> tuple[onnx.ModelProto, list[NodeDecision]]:
    """Int8 weights (rewriting ``float_model``; GPTQ-rounded from real calibration ``data``
    where given: Hessians from random tokens lowered MiniLM's cosine on real text, 0.9943 ->
    0.9937), embedding tables, check."""
    hessians = _weight_hessians(float_model, config, data)
    decisions = quantize_dynamic_graph(float_model, config, hessians)
    decisions += subgraph_decisions(float_model.graph)
    if config.quantize_embeddings:
        decisions += quantize_embeddings(float_model)
    return finish(float_model, config, QuantMode.DYNAMIC), decisions


def _weight_hessians(float_model: ir.Model, config: QuantConfig, data: Any) -> dict[str, Any]:
    """The input Hessians ``E[x x^T]`` of the weight MatMuls over ``data``, for GPTQ rounding
    and MSE weight ranges (none without data, or where neither is asked for)."""
    if data is None or not needs_hessians(config):
        return {}
    plan = plan_quantization(float_model, config.replace(op_types=("MatMul",)))
    weights_only = QuantPlan(nodes=plan.nodes)
    proto = to_proto(float_model)
    calibration = calibrate_plan(proto, weights_only, data, config, methods=(), hessians=True)
    return calibration.hessians or {}


def _output_sqnr(
    reference: onnx.ModelProto,
    models: Sequence[onnx.ModelProto],
    feeds: Iterable[dict[str, np.ndarray]],
) -> list[float]:
    """SQNR (dB) of each model's float outputs against ``reference``'s over ``feeds``."""
    sessions = [make_session(m) for m in (reference, *models)]
    outputs: list[list[np.ndarray]] = [[] for _ in sessions]
    for feed in feeds:
        for collected, session in zip(outputs, sessions, strict=True):
            collected += run_float_outputs(session, feed)
    return [sqnr_db(outputs[0], got) for got in outputs[1:]]
