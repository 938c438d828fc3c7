"""Streaming, mergeable statistics of a tensor's values (pure numpy).

An observer sees one batch at a time and keeps no samples:

* ``MinMaxObserver`` tracks the exact finite min and max.
* ``HistogramObserver`` also keeps a histogram of ``BINS`` equal bins over ``[-R, R]`` where
  ``R`` is a power of two that grows as data arrives. Growing doubles ``R`` and adds
  neighbouring bin pairs, so edges stay aligned: two observers over two halves of the data
  merge into exactly the histogram one observer over all of it would hold. ``R`` is the
  smallest power of two (at least ``2**-126``) strictly above every magnitude seen, so every
  bin is half-open ``[a, b)`` (the last bin of ``np.histogram`` is closed, and a value equal to
  ``R`` would change bins when the histogram is coarsened) and every edge is exact in float32.

Non-finite values (``inf`` from masks, ``nan``) are counted and left out of the statistics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BINS = 4096
_MIN_HALF_RANGE = 2.0**-126  # smallest normal float32: its bin edges are exact float32 values
_FLOAT32_EDGES_UP_TO = 2.0**127  # 2**128 overflows float32: such histograms bin in float64


class MinMaxObserver:
    """Exact finite min and max of everything seen."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0

    @property
    def empty(self) -> bool:
        """True until a finite value has been seen."""
        return self.count == 0

    def update(self, values: np.ndarray) -> np.ndarray:
        """Fold in a batch; returns its finite values as float32 (flattened)."""
        flat = np.asarray(values, dtype=np.float32).ravel()
        finite = np.isfinite(flat)
        if not finite.all():
            self.nonfinite += int(flat.size - finite.sum())
            flat = flat[finite]
        if flat.size:
            self.min = min(self.min, float(flat.min()))
            self.max = max(self.max, float(flat.max()))
            self.count += int(flat.size)
        return flat

    def merge(self, other: MinMaxObserver) -> None:
        """Fold in another observer's statistics (order does not matter)."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "count": self.count, "nonfinite": self.nonfinite}


class HistogramObserver(MinMaxObserver):
    """Min-max plus an aligned, growable histogram (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.half_range = 0.0  # R; 0 until data arrives
        self.counts = np.zeros(BINS, dtype=np.int64)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_range, self.half_range, BINS + 1)

    def update(self, values: np.ndarray) -> np.ndarray:
        flat = super().update(values)
        if flat.size:
            self._grow_to(_half_range_above(max(abs(self.min), abs(self.max))))
            data = flat if self.half_range <= _FLOAT32_EDGES_UP_TO else flat.astype(np.float64)
            hist, _ = np.histogram(data, bins=BINS, range=(-self.half_range, self.half_range))
            self.counts += hist
        return flat

    def merge(self, other: MinMaxObserver) -> None:
        if not isinstance(other, HistogramObserver):
            raise TypeError("a histogram observer merges only with another histogram observer")
        super().merge(other)
        if other.half_range == 0.0:
            return
        counts = other.counts.copy()
        rescaled_range = other.half_range
        self._grow_to(other.half_range)
        while rescaled_range < self.half_range:
            counts = _coarsen(counts)
            rescaled_range *= 2
        self.counts += counts

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """``[P(100 - p), P(p)]`` of the observed values, interpolated within a bin."""
        total = self.counts.sum()
        cumulative = np.cumsum(self.counts)
        edges = self.edges

        def quantile(fraction: float) -> float:
            target = fraction * total
            index = int(np.searchsorted(cumulative, target, side="left"))
            index = min(index, BINS - 1)
            before = cumulative[index - 1] if index else 0
            inside = self.counts[index]
            weight = (target - before) / inside if inside else 0.0
            return float(edges[index] + weight * (edges[index + 1] - edges[index]))

        lo = max(self.min, quantile(1.0 - percentile / 100.0))
        hi = min(self.max, quantile(percentile / 100.0))
        return min(lo, hi), max(lo, hi)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "half_range": self.half_range, "counts": self.counts.tolist()}

    def _grow_to(self, half_range: float) -> None:
        """Double R (coarsening the bins in place) up to ``half_range``, a power of two."""
        if self.half_range == 0.0:
            self.half_range = half_range
            return
        while self.half_range < half_range:
            self.counts = _coarsen(self.counts)
            self.half_range *= 2


def _half_range_above(magnitude: float) -> float:
    """The smallest power of two strictly above ``magnitude``, at least ``_MIN_HALF_RANGE``."""
    if magnitude < _MIN_HALF_RANGE:
        return _MIN_HALF_RANGE
    half_range = 2.0 ** math.floor(math.log2(magnitude))
    while half_range <= magnitude:
        half_range *= 2
    while half_range / 2 > magnitude:
        half_range /= 2
    return half_range


def _coarsen(counts: np.ndarray) -> np.ndarray:
    """Histogram over ``[-2R, 2R]`` from one over ``[-R, R]``: pairs summed into the middle half."""
    out = np.zeros_like(counts)
    quarter = counts.size // 4
    out[quarter : quarter + counts.size // 2] = counts.reshape(-1, 2).sum(axis=1)
    return out


def mse_range(
    observer: HistogramObserver, levels: int, *, candidates: int = 128
) -> tuple[float, float]:
    """The clipping range ``alpha * [min, max]`` minimising the expected squared error of
    ``levels``-level uniform quantization over the observed histogram.

    Error of a value ``x`` for range ``[lo, hi]`` with step ``s = (hi - lo) / (levels - 1)``:
    ``s**2 / 12`` inside the range (rounding), ``(x - clip(x))**2`` outside (clipping).
    """
    lo0, hi0 = min(observer.min, 0.0), max(observer.max, 0.0)
    if hi0 == lo0:
        return lo0, hi0
    edges = observer.edges
    centers = (edges[:-1] + edges[1:]) / 2
    counts = observer.counts.astype(np.float64)
    best, best_error = (lo0, hi0), math.inf
    for alpha in np.linspace(1.0 / candidates, 1.0, candidates):
        lo, hi = alpha * lo0, alpha * hi0
        step = (hi - lo) / (levels - 1)
        clipped = np.clip(centers, lo, hi)
        error = np.sum(
            counts * ((centers - clipped) ** 2 + np.where(centers == clipped, step**2 / 12, 0))
        )
        if error < best_error:
            best, best_error = (lo, hi), error
    return best
