"""SmoothQuant as a pipeline step: observe the inputs of weight MatMuls, then smooth them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxq.calibration.collect import observe
from onnxq.passes.smooth_quant import ChannelStatsObserver, SmoothQuantPass, smoothing_groups


def smooth_model(
    model: ir.Model, feeds: Iterable[dict[str, np.ndarray]], *, alpha: float = 0.7
) -> list[tuple[str, str]]:
    """Smooth ``model`` in place from one pass over ``feeds``.

    Returns ``(activation, how the factor was applied)`` for each smoothed group.
    """
    groups = smoothing_groups(model.graph)
    if not groups:
        return []
    stats = {name: ChannelStatsObserver() for name in groups}
    observe(ir.to_proto(model), {name: [obs] for name, obs in stats.items()}, feeds)
    smooth = SmoothQuantPass(stats, alpha)
    smooth(model)
    return smooth.applied
