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
from onnxq.ir_io import from_proto, to_proto
from onnxq.model_io import input_specs
from onnxq.passes.plan import NodeSelection
from onnxq.passes.smooth_quant import (
    ChannelStatsObserver,
    SmoothQuantPass,
    fold_route,
    smoothing_groups,
)

ROUTE_TOLERANCE = 1e-3  # max |X_new * s - X| over max |X|: float rounding, not a reordering


def smooth_model(
    model: ir.Model,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    alpha: float = 0.7,
    fold_only: bool = False,
    proto: onnx.ModelProto | None = None,
    selection: NodeSelection | None = None,
) -> list[tuple[str, str]]:
    """Smooth ``model`` in place from one pass over ``feeds``; ``proto``, when the caller has
    it, is ``model`` as it is now, serialised (saves serialising again). A group whose every
    MatMul ``selection`` leaves float is not smoothed: it would gain nothing (and may pay a Mul).

    Folds through channel-wise ops are first tried on a copy and kept only where the smoothed
    activation is ``X / s`` on the first batch (``verified_routes``).
    Returns ``(activation, how the factor was applied)`` for each smoothed group.
    """
    groups = {
        name: nodes
        for name, nodes in smoothing_groups(model.graph).items()
        if selection is None or not all(selection.declined(node) for node in nodes)
    }
    if not groups:
        return []
    routed = [
        name
        for name, nodes in groups.items()
        if (route := fold_route(nodes[0].inputs[0], nodes)) is not None and route.hops
    ]
    stats = {name: ChannelStatsObserver() for name in groups}
    first = {name: FirstBatch() for name in routed}
    first_feed: list[dict[str, np.ndarray]] = []

    def keep_first(feed: dict[str, np.ndarray]) -> None:
        if not first_feed:
            first_feed.append(feed)

    proto = to_proto(model) if proto is None else proto
    observers = {
        name: [obs] + ([first[name]] if name in first else []) for name, obs in stats.items()
    }
    observe(proto, observers, feeds, on_batch=keep_first)
    verified = verified_routes(proto, {n: stats[n] for n in routed}, first, first_feed, alpha)
    smooth = SmoothQuantPass(stats, alpha, verified_routes=verified, fold_only=fold_only)
    smooth(model)
    return smooth.applied


class FirstBatch:
    """Keeps the first value it sees."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        if self.value is None:
            self.value = np.array(values)


def verified_routes(
    proto: onnx.ModelProto,
    stats: dict[str, ChannelStatsObserver],
    before: dict[str, FirstBatch],
    feed: list[dict[str, np.ndarray]],
    alpha: float,
) -> frozenset[str]:
    """The activations whose fold through channel-wise ops really gives ``X / s``: smooth a copy
    with every such route taken, rerun the first batch, compare ``X_new * s`` with ``X``."""
    if not stats or not feed:
        return frozenset()
    trial = from_proto(proto)
    trial_smooth = SmoothQuantPass(stats, alpha, verified_routes=None)
    scales = {
        name: trial_smooth.scale(name, nodes)
        for name, nodes in smoothing_groups(trial.graph).items()
        if name in stats
    }
    trial_smooth(trial)
    after = {name: FirstBatch() for name in stats}
    observe(to_proto(trial), {name: [obs] for name, obs in after.items()}, feed)
    verified = set()
    for name, scale in scales.items():
        reference, smoothed = before[name].value, after[name].value
        if reference is None or smoothed is None or smoothed.shape != reference.shape:
            continue
        error = np.abs(smoothed * scale.astype(np.float32) - reference).max()
        if error <= ROUTE_TOLERANCE * (np.abs(reference).max() + 1e-12):
            verified.add(name)
    return frozenset(verified)


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
    applied = smooth_model(
        model,
        feeds,
        alpha=config.smooth_alpha,
        fold_only=config.smooth_fold_only,
        proto=proto,
        selection=NodeSelection.from_config(config),
    )
    if not applied:
        return False, []
    folded = sum(how.startswith("folded") for _, how in applied)
    return True, [
        f"SmoothQuant (alpha {config.smooth_alpha}): {len(applied)} MatMul inputs smoothed, "
        f"{folded} folded into their producer, {len(applied) - folded} with a Mul"
    ]
