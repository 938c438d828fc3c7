"""SmoothQuant as a pipeline step: observe the inputs of weight MatMuls, then smooth them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.calibration.collect import observe
from onnxq.calibration.readers import open_feeds
from onnxq.config import QuantConfig
from onnxq.model_io import input_specs
from onnxq.passes.smooth_quant import ChannelStatsObserver, SmoothQuantPass, smoothing_groups


def smooth_model(
    model: ir.Model,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    alpha: float = 0.7,
    proto: onnx.ModelProto | None = None,
) -> list[tuple[str, str]]:
    """Smooth ``model`` in place from one pass over ``feeds``; ``proto``, when the caller has
    it, is ``model`` as it is now, serialised (saves serialising again).

    Returns ``(activation, how the factor was applied)`` for each smoothed group.
    """
    groups = smoothing_groups(model.graph)
    if not groups:
        return []
    stats = {name: ChannelStatsObserver() for name in groups}
    proto = ir.to_proto(model) if proto is None else proto
    observe(proto, {name: [obs] for name, obs in stats.items()}, feeds)
    smooth = SmoothQuantPass(stats, alpha)
    smooth(model)
    return smooth.applied


def smooth_from_data(
    model: ir.Model, proto: onnx.ModelProto, calibration_data: Any, config: QuantConfig
) -> tuple[bool, list[str]]:
    """SmoothQuant from a calibration source (one extra pass; it must be re-iterable).

    Returns whether ``model`` changed, and notes for the report.
    """
    feeds = open_feeds(
        calibration_data,
        input_specs(proto),
        batch_size=config.batch_size,
        max_samples=config.max_samples,
    )
    if not feeds.reiterable:
        return False, ["SmoothQuant skipped: the calibration source can be read only once"]
    applied = smooth_model(model, feeds, alpha=config.smooth_alpha, proto=proto)
    if not applied:
        return False, []
    folded = sum(how.startswith("folded") for _, how in applied)
    return True, [
        f"SmoothQuant (alpha {config.smooth_alpha}): {len(applied)} MatMul inputs smoothed, "
        f"{folded} folded into their producer, {len(applied) - folded} with a Mul"
    ]
