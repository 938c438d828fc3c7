"""Dynamic quantization, orchestration only: load -> prepare -> int8 weights -> check.

No calibration data: activations are quantized at run time by ``DynamicQuantizeLinear``.
SmoothQuant statistics come from the calibration data when given, else, for token models,
from random token sequences (``onnxq.calibration.synthetic``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import islice
from typing import Any

import numpy as np
import onnx

from onnxq.calibration.readers import open_feeds
from onnxq.calibration.synthetic import synthetic_token_feeds
from onnxq.config import QuantConfig
from onnxq.errors import CalibrationDataError, first_line
from onnxq.evaluate import sqnr_db
from onnxq.model_io import input_specs, model_proto
from onnxq.passes.dynamic_quant import quantize_dynamic_graph
from onnxq.passes.plan import NodeDecision
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
from onnxq.runtime import make_session

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
    config = config or QuantConfig()
    proto = model_proto(model)
    refuse_quantized(proto)
    reduce_range, reduce_reason = resolve_reduce_range(config)
    smoothing_data, notes = _smoothing_source(proto, config, calibration_data)
    try:
        out, decisions, smooth_notes = _build(proto, config, reduce_range, smoothing_data)
    except CalibrationDataError as exc:
        if calibration_data is not None or smoothing_data is None:
            raise
        # smoothing is optional: this model just cannot take made-up tokens
        notes = [f"SmoothQuant skipped: random token sequences fail ({first_line(exc)})"]
        smoothing_data = None
        out, decisions, smooth_notes = _build(proto, config, reduce_range)
    if smooth_notes and smoothing_data is not None:
        out, decisions, verdict = _keep_smoothing_if_it_pays(
            proto, config, reduce_range, smoothing_data, (out, decisions)
        )
        smooth_notes += verdict
    report = QuantizationReport(
        decisions=decisions,
        size_before=proto.ByteSize(),
        size_after=out.ByteSize(),
        samples=0,
        reduce_range=reduce_range,
        reduce_range_reason=reduce_reason,
        config={**config.to_dict(), "mode": "dynamic"},
        notes=notes + smooth_notes,
    )
    return QuantResult(out, report)


def _smoothing_source(
    proto: onnx.ModelProto, config: QuantConfig, calibration_data: Any
) -> tuple[Any, list[str]]:
    """The data SmoothQuant reads: the calibration data, else random token sequences for a
    token model (``None`` for other models, or when smoothing is off), and a note."""
    if calibration_data is not None or config.smooth_alpha is None:
        return calibration_data, []
    feeds = synthetic_token_feeds(proto, samples=SYNTHETIC_SEQUENCES)
    if feeds is None:
        return None, []
    note = f"SmoothQuant statistics from {SYNTHETIC_SEQUENCES} random token sequences"
    return feeds, [f"{note} (no calibration data given)"]


def _keep_smoothing_if_it_pays(
    proto: onnx.ModelProto,
    config: QuantConfig,
    reduce_range: bool,
    smoothing_data: Any,
    smoothed: tuple[onnx.ModelProto, list[NodeDecision]],
) -> tuple[onnx.ModelProto, list[NodeDecision], list[str]]:
    """The smoothed build, or the plain one where that has the higher output SQNR on the
    first ``GUARD_BATCHES`` batches of ``smoothing_data``; and the verdict as a note."""
    feeds = open_feeds(smoothing_data, input_specs(proto), batch_size=config.batch_size)
    if not feeds.reiterable:  # one-shot data was not used for smoothing either
        return *smoothed, []
    plain, plain_decisions, _ = _build(proto, replace(config, smooth_alpha=None), reduce_range)
    smoothed_db, plain_db = _output_sqnr(proto, (smoothed[0], plain), islice(feeds, GUARD_BATCHES))
    verdict = f"output SQNR {smoothed_db:.1f} dB smoothed, {plain_db:.1f} dB not"
    if smoothed_db >= plain_db:
        return *smoothed, [f"SmoothQuant kept: {verdict}"]
    return plain, plain_decisions, [f"SmoothQuant dropped: {verdict}"]


def _build(
    proto: onnx.ModelProto, config: QuantConfig, reduce_range: bool, smoothing_data: Any = None
) -> tuple[onnx.ModelProto, list[NodeDecision], list[str]]:
    """Prepare (and smooth), int8 weights, check: the model, its decisions, smoothing notes."""
    float_model, _, notes = prepare_float(proto, config, smoothing_data)
    decisions = quantize_dynamic_graph(float_model, config, reduce_range=reduce_range)
    if config.quantize_embeddings:
        decisions += quantize_embeddings(float_model)
    return finish(float_model, config, reduce_range), decisions, notes


def _output_sqnr(
    reference: onnx.ModelProto,
    models: Sequence[onnx.ModelProto],
    feeds: Iterable[dict[str, np.ndarray]],
) -> list[float]:
    """SQNR (dB) of each model's float outputs against ``reference``'s over ``feeds``."""
    sessions = [make_session(m.SerializeToString()) for m in (reference, *models)]
    outputs: list[list[np.ndarray]] = [[] for _ in sessions]
    for feed in feeds:
        for collected, session in zip(outputs, sessions, strict=True):
            collected += [o for o in session.run(None, feed) if np.asarray(o).dtype.kind == "f"]
    return [sqnr_db(outputs[0], got) for got in outputs[1:]]
