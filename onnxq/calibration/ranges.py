"""Range methods: small pure functions from an observer's state to a clipping range ``(lo, hi)``.

Every method works per tensor on the statistics of ``onnxq.calibration.observers``; none sees a
sample, so all of them apply equally to a fresh observer, a merged one, or one read back from a
ranges file. An empty observer gives ``(0.0, 0.0)``.

* ``minmax``: ``[min, max]``.
* ``moving_average``: ``[EMA(batch min), EMA(batch max)]``.
* ``percentile``: ``[P(100 - p), P(p)]``, interpolated linearly inside a bin.
* ``mse``: ``alpha * [min, max]`` minimising the expected squared error of uniform quantization.
* ``entropy``: TensorRT's KL-divergence threshold search (``entropy_range``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from onnxq.calibration.observers import (
    BINS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
)
from onnxq.config import CalibrationMethod, QuantConfig

Range = tuple[float, float]
_CANDIDATE_BLOCK = 512  # entropy candidates evaluated at a time (bounds the temporaries)


def observer_kind(method: CalibrationMethod) -> type[MinMaxObserver]:
    """The observer class whose statistics ``method`` needs."""
    if method is CalibrationMethod.MINMAX:
        return MinMaxObserver
    if method is CalibrationMethod.MOVING_AVERAGE:
        return MovingAverageMinMaxObserver
    return HistogramObserver


def pick_observer(
    observers: Sequence[MinMaxObserver], method: CalibrationMethod
) -> MinMaxObserver | None:
    """The first of ``observers`` that holds what ``method`` needs (any one for min-max)."""
    kind = observer_kind(method)
    return next((obs for obs in observers if isinstance(obs, kind)), None)


def observers_for(
    methods: Sequence[CalibrationMethod], averaging_constant: float = 0.01
) -> list[MinMaxObserver]:
    """The fewest fresh observers whose statistics serve every method in ``methods``.

    A histogram serves min-max, percentile, entropy and MSE; a moving average serves min-max
    and itself; a plain min-max observer only min-max.
    """
    kinds = {observer_kind(CalibrationMethod(m)) for m in methods}
    observers: list[MinMaxObserver] = []
    if HistogramObserver in kinds:
        observers.append(HistogramObserver())
    if MovingAverageMinMaxObserver in kinds:
        observers.append(MovingAverageMinMaxObserver(averaging_constant))
    return observers or [MinMaxObserver()]


def range_for(observer: MinMaxObserver, config: QuantConfig) -> Range:
    """The activation range the config's method chooses from ``observer``.

    Raises ``TypeError`` when the observer lacks the statistics (e.g. a histogram method on a
    plain min-max observer).
    """
    method = config.method
    if not isinstance(observer, observer_kind(method)):
        raise TypeError(
            f"the {method.value} range needs a {observer_kind(method).kind} observer, "
            f"got {observer.kind}"
        )
    config = config.resolved()  # the target's activation type where the config leaves it
    qmin, qmax = config.activation_type.bounds
    if method is CalibrationMethod.MINMAX:
        return minmax_range(observer)
    if method is CalibrationMethod.MOVING_AVERAGE:
        return moving_average_range(observer)
    if method is CalibrationMethod.PERCENTILE:
        return percentile_range(observer, config.percentile)
    if method is CalibrationMethod.MSE:
        return mse_range(observer, qmax - qmin + 1)
    return entropy_range(observer, qmax - qmin + 1, symmetric=config.activation_symmetric)


def minmax_range(observer: MinMaxObserver) -> Range:
    """``[min, max]`` of every finite value seen."""
    return (0.0, 0.0) if observer.empty else (observer.min, observer.max)


def moving_average_range(observer: MovingAverageMinMaxObserver) -> Range:
    """``[EMA(batch min), EMA(batch max)]`` (merged shards: count-weighted mean of EMAs)."""
    return (0.0, 0.0) if observer.empty else (observer.average_min, observer.average_max)


def percentile_range(observer: HistogramObserver, percentile: float) -> Range:
    """``[P(100 - p), P(p)]`` of the observed values, interpolated within a bin.

    ``P(q)`` is where the cumulative count reaches ``q%`` of the total, assuming values spread
    evenly inside a bin; the ends are clamped to ``[min, max]``, so ``p = 100`` gives min-max.
    """
    if observer.empty:
        return 0.0, 0.0
    counts = observer.counts
    total = counts.sum()
    cumulative = np.cumsum(counts)
    edges = observer.edges

    def quantile(fraction: float) -> float:
        target = fraction * total
        index = min(int(np.searchsorted(cumulative, target, side="left")), BINS - 1)
        before = cumulative[index - 1] if index else 0
        inside = counts[index]
        weight = (target - before) / inside if inside else 0.0
        return float(edges[index] + weight * (edges[index + 1] - edges[index]))

    lo = max(observer.min, quantile(1.0 - percentile / 100.0))
    hi = min(observer.max, quantile(percentile / 100.0))
    return min(lo, hi), max(lo, hi)


def mse_range(observer: HistogramObserver, levels: int, *, candidates: int = 128) -> Range:
    """The range ``alpha * [min, max]`` (``alpha`` in ``1/candidates .. 1``) minimising the
    expected squared error of ``levels``-level uniform quantization over the histogram.

    A value ``x`` (a bin centre, weighted by its count) costs ``s**2 / 12`` inside the range
    (rounding, step ``s = (hi - lo) / (levels - 1)``) and ``(x - clip(x))**2`` outside
    (clipping). Ties keep the smallest ``alpha``.
    """
    lo0, hi0 = min(observer.min, 0.0), max(observer.max, 0.0)
    if observer.empty or hi0 == lo0:
        return (0.0, 0.0) if observer.empty else (lo0, hi0)
    edges = observer.edges
    filled = np.flatnonzero(observer.counts)
    centers = (edges[filled] + edges[filled + 1]) / 2
    counts = observer.counts[filled].astype(np.float64)
    alphas = np.linspace(1.0 / candidates, 1.0, candidates)[:, None]
    lo, hi = alphas * lo0, alphas * hi0
    step = (hi - lo) / (levels - 1)
    clipped = np.clip(centers, lo, hi)
    inside = centers == clipped
    error = (counts * ((centers - clipped) ** 2 + np.where(inside, step**2 / 12, 0.0))).sum(1)
    best = float(alphas[int(np.argmin(error)), 0])
    return best * lo0, best * hi0


def entropy_range(observer: HistogramObserver, levels: int, *, symmetric: bool = False) -> Range:
    """TensorRT's entropy calibration (as NVIDIA's pytorch-quantization implements it), adapted
    to asymmetric grids.

    On a histogram of magnitudes ``h`` (bin width ``w``), every threshold ``T = i w`` with
    ``L <= i <= n`` (``n``: last non-empty bin) is scored by ``KL(P || Q)``: ``P`` is ``h[:i]``
    with the clipped outliers added to its last bin; ``Q`` merges ``h[:i]`` (outliers left out)
    into ``L`` groups of about ``i / L`` bins (group ``g`` starts at bin ``ceil(g i / L)``) and
    spreads each group's count evenly over the group's bins where ``P`` is non-zero. The
    threshold with the least divergence wins (ties: the smallest); a ``Q`` with no mass where
    ``P`` has some scores infinity (no smoothing). The first bin's count is replaced by the
    second's before scoring (as pytorch-quantization does): zero is exact on every grid, and
    the spike of exact zeros after a ReLU would otherwise dominate the divergence and favour
    ever smaller thresholds.

    Which magnitudes and how many levels ``L`` (``levels``: integers of the activation type):

    * one-sided data (``min >= 0``, e.g. after ReLU; or ``max <= 0``): the histogram of that
      side with every level of the grid, ``L = levels`` (256 for uint8; ``levels // 2`` when
      ``symmetric``, whose grid spends half its levels on the empty side). TensorRT's symmetric
      int8 would waste half the grid here.
    * two-sided data: ``|x|`` folded over zero with ``L = levels // 2`` (each sign gets half of
      the grid, as in TensorRT), giving ``[max(min, -T), min(max, T)]``.
    """
    if observer.empty:
        return 0.0, 0.0
    half = BINS // 2
    width = observer.half_range / half
    positive, negative = observer.counts[half:], observer.counts[:half][::-1]
    if observer.min >= 0.0 or observer.max <= 0.0:
        magnitudes = positive if observer.min >= 0.0 else negative
        threshold = _kl_threshold(magnitudes, levels // 2 if symmetric else levels) * width
        if observer.min >= 0.0:
            return observer.min, min(observer.max, threshold)
        return max(observer.min, -threshold), observer.max
    threshold = _kl_threshold(positive + negative, levels // 2) * width
    return max(observer.min, -threshold), min(observer.max, threshold)


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """The bin count ``i`` minimising ``KL(P_i || Q_i)`` (see ``entropy_range``), in closed form.

    With ``Z`` the total, ``O_i`` the outliers, ``P_g``/``H_g`` a group's sum with/without them
    and ``n_g`` its bins where ``P`` is non-zero (``Q`` sums to ``Z - O_i``)::

        KL_i = (sum_b p_b log p_b - sum_g P_g log(H_g / n_g)) / Z - log Z + log(Z - O_i)
    """
    filled = np.flatnonzero(hist)
    n = int(filled[-1]) + 1 if filled.size else 0
    if n <= levels:
        return max(n, 1)
    h = hist[:n].astype(np.float64)
    h[0] = h[1]  # the zero spike is exact on any grid (see entropy_range)
    total = float(h.sum())
    cum = np.concatenate([[0.0], np.cumsum(h)])
    cum_nonzero = np.concatenate([[0], np.cumsum(h > 0)])
    cum_plogp = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    best_i, best_kl = n, math.inf
    for start in range(levels, n + 1, _CANDIDATE_BLOCK):
        i = np.arange(start, min(start + _CANDIDATE_BLOCK, n + 1))
        bounds = -(-np.arange(levels + 1)[None, :] * i[:, None] // levels)  # ceil(g i / L)
        group = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]  # H_g
        nonzero = (cum_nonzero[bounds[:, 1:]] - cum_nonzero[bounds[:, :-1]]).astype(np.float64)
        outliers = total - cum[i]
        last = h[i - 1]
        nonzero[:, -1] += (last == 0) & (outliers > 0)  # the last bin of P gains the outliers
        with_outliers = group.copy()
        with_outliers[:, -1] += outliers  # P_g
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(with_outliers > 0, with_outliers * np.log(group / nonzero), 0.0)
            plogp = cum_plogp[i - 1] + _xlogx(last + outliers)
            kl = (plogp - cross.sum(axis=1)) / total - math.log(total) + np.log(total - outliers)
        kl = np.where(np.isfinite(kl), kl, np.inf)
        index = int(np.argmin(kl))
        if kl[index] < best_kl:
            best_i, best_kl = int(i[index]), float(kl[index])
    return best_i


def _xlogx(x: np.ndarray) -> np.ndarray:
    """``x log x`` with ``0 log 0 = 0``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)
