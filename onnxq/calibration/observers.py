"""Streaming, mergeable statistics of a tensor's values (pure numpy).

An observer sees one batch at a time and keeps no samples; its memory does not grow with the
data. Every observer merges: ``a.merge(b)`` folds in ``b``'s statistics, so shards observed in
different processes combine in the parent.

* ``MinMaxObserver`` tracks the exact finite min and max. Merging is exact.
* ``MovingAverageMinMaxObserver`` also keeps an exponential moving average of each batch's min
  and max (PyTorch's ``MovingAverageMinMaxObserver``): ``m <- m + c * (batch_min - m)``, the
  first batch setting ``m``. An EMA depends on batch order, so merging is a definition, not an
  identity: the merged average is the count-weighted mean of the shards' averages
  ``(n_a m_a + n_b m_b) / (n_a + n_b)`` (``n``: finite values each shard saw). It is
  commutative, has the empty observer as identity, and lies between the shards' averages.
* ``HistogramObserver`` also keeps a histogram of ``BINS`` equal bins over ``[-R, R]`` where
  ``R`` is a power of two that grows as data arrives. Growing doubles ``R`` and adds
  neighbouring bin pairs, so edges stay aligned: two observers over two halves of the data
  merge into exactly the histogram one observer over all of it would hold. ``R`` is the
  smallest power of two (at least ``2**-126``) strictly above every magnitude seen, so every
  bin is half-open ``[a, b)``: a value ``x`` lands in bin ``floor(x * BINS / (2R)) + BINS/2``,
  computed exactly (the factor is a power of two, the product is taken in float64).

Non-finite values (``inf`` from masks, ``nan``) are counted and left out of the statistics.
Range methods over these statistics live in ``onnxq.calibration.ranges``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BINS = 8192
_MIN_HALF_RANGE = 2.0**-126  # smallest normal float32: its bin edges are exact float32 values
_CHUNK = 1 << 18  # values binned at a time (bounds the float64 temporaries to 2 MiB)


class MinMaxObserver:
    """Exact finite min and max of everything seen."""

    kind = "minmax"

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
        if not flat.size:
            return flat
        lo, hi = flat.min(), flat.max()  # nan or inf in either means some value is not finite
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = np.isfinite(flat)
            self.nonfinite += int(flat.size - finite.sum())
            flat = flat[finite]
            if not flat.size:
                return flat
            lo, hi = flat.min(), flat.max()
        self._fold(flat, float(lo), float(hi))
        return flat

    def _fold(self, flat: np.ndarray, lo: float, hi: float) -> None:
        """Fold in a non-empty batch of finite values whose min and max are ``lo`` and ``hi``."""
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(flat.size)

    def merge(self, other: MinMaxObserver) -> None:
        """Fold in another observer's statistics (order does not matter)."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state (``min``/``max`` are ``None`` while empty)."""
        return {
            "kind": self.kind,
            "min": None if self.empty else self.min,
            "max": None if self.empty else self.max,
            "count": self.count,
            "nonfinite": self.nonfinite,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MinMaxObserver:
        """Inverse of ``to_dict`` for this class (see ``observer_from_dict`` for any kind)."""
        observer = cls()
        observer._load(data)
        return observer

    def _load(self, data: dict[str, Any]) -> None:
        self.count = int(data["count"])
        self.nonfinite = int(data["nonfinite"])
        if self.count:
            self.min, self.max = float(data["min"]), float(data["max"])


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Min-max plus the EMA of per-batch min and max (see module docstring for merging)."""

    kind = "moving_average"

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = float(averaging_constant)
        self.average_min = math.inf
        self.average_max = -math.inf
        self.batches = 0

    def _fold(self, flat: np.ndarray, lo: float, hi: float) -> None:
        super()._fold(flat, lo, hi)
        if self.batches == 0:
            self.average_min, self.average_max = lo, hi
        else:
            c = self.averaging_constant
            self.average_min += c * (lo - self.average_min)
            self.average_max += c * (hi - self.average_max)
        self.batches += 1

    def merge(self, other: MinMaxObserver) -> None:
        if not isinstance(other, MovingAverageMinMaxObserver):
            raise TypeError("a moving-average observer merges only with another one")
        if other.averaging_constant != self.averaging_constant:
            raise ValueError(
                f"cannot merge moving averages with constants {self.averaging_constant} "
                f"and {other.averaging_constant}"
            )
        if other.count:
            if self.count == 0:
                self.average_min, self.average_max = other.average_min, other.average_max
            else:
                total = self.count + other.count
                self.average_min = (
                    self.count * self.average_min + other.count * other.average_min
                ) / total
                self.average_max = (
                    self.count * self.average_max + other.count * other.average_max
                ) / total
        self.batches += other.batches
        super().merge(other)

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "averaging_constant": self.averaging_constant,
            "average_min": None if self.empty else self.average_min,
            "average_max": None if self.empty else self.average_max,
            "batches": self.batches,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MovingAverageMinMaxObserver:
        observer = cls(float(data["averaging_constant"]))
        observer._load(data)
        observer.batches = int(data["batches"])
        if observer.count:
            observer.average_min = float(data["average_min"])
            observer.average_max = float(data["average_max"])
        return observer


class HistogramObserver(MinMaxObserver):
    """Min-max plus an aligned, growable histogram (see module docstring)."""

    kind = "histogram"

    def __init__(self) -> None:
        super().__init__()
        self.half_range = 0.0  # R; 0 until data arrives
        self.counts = np.zeros(BINS, dtype=np.int64)

    @property
    def edges(self) -> np.ndarray:
        """``BINS + 1`` bin edges over ``[-R, R]`` (exact: ``R`` and the width are powers of 2)."""
        return np.linspace(-self.half_range, self.half_range, BINS + 1)

    def _fold(self, flat: np.ndarray, lo: float, hi: float) -> None:
        super()._fold(flat, lo, hi)
        self._grow_to(_half_range_above(max(abs(self.min), abs(self.max))))
        self.counts += bin_counts(flat, self.half_range)

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

    def to_dict(self) -> dict[str, Any]:
        """Counts are stored from the first to the last non-empty bin (``first_bin``)."""
        nonzero = np.flatnonzero(self.counts)
        first, last = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, 0)
        return {
            **super().to_dict(),
            "half_range": self.half_range,
            "bins": BINS,
            "first_bin": first,
            "counts": self.counts[first:last].tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistogramObserver:
        if int(data["bins"]) != BINS:
            raise ValueError(f"histogram has {data['bins']} bins, this onnxq uses {BINS}")
        observer = cls()
        observer._load(data)
        observer.half_range = float(data["half_range"])
        counts = np.asarray(data["counts"], dtype=np.int64)
        first = int(data["first_bin"])
        if first < 0 or first + counts.size > BINS or np.any(counts < 0):
            raise ValueError("histogram counts out of range")
        observer.counts[first : first + counts.size] = counts
        if int(observer.counts.sum()) != observer.count:
            raise ValueError("histogram counts do not add up to the observed count")
        return observer

    def _grow_to(self, half_range: float) -> None:
        """Double R (coarsening the bins in place) up to ``half_range``, a power of two."""
        if self.half_range == 0.0:
            self.half_range = half_range
            return
        while self.half_range < half_range:
            self.counts = _coarsen(self.counts)
            self.half_range *= 2


OBSERVER_KINDS: dict[str, type[MinMaxObserver]] = {
    cls.kind: cls for cls in (MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver)
}


def observer_from_dict(data: dict[str, Any]) -> MinMaxObserver:
    """Rebuild any observer from its ``to_dict`` (``ValueError``/``KeyError`` when malformed)."""
    kind = OBSERVER_KINDS.get(data.get("kind"))
    if kind is None:
        raise ValueError(f"unknown observer kind {data.get('kind')!r}")
    return kind.from_dict(data)


def bin_counts(flat: np.ndarray, half_range: float) -> np.ndarray:
    """Counts of finite ``flat`` (all ``|x| < half_range``) in ``BINS`` bins over ``[-R, R)``."""
    scale = (BINS // 2) / half_range  # a power of two: x * scale is exact in float64
    counts = np.zeros(BINS, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        scaled = flat[start : start + _CHUNK].astype(np.float64)
        scaled *= scale
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.intp)
        index += BINS // 2
        counts += np.bincount(index, minlength=BINS)
    return counts


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
