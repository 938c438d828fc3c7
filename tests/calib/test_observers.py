"""Observers: exact min/max, non-finite handling, and exactly mergeable histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration.observers import BINS, HistogramObserver, MinMaxObserver
from onnxq.calibration.ranges import percentile_range

OBSERVERS = [MinMaxObserver, HistogramObserver]


def _batches(data: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(data, sorted(c % (data.size + 1) for c in cuts))


def _observe(kind: type[MinMaxObserver], batches: list[np.ndarray]) -> MinMaxObserver:
    observer = kind()
    for batch in batches:
        observer.update(batch)
    return observer


def _assert_same_histogram(a: HistogramObserver, b: HistogramObserver) -> None:
    assert a.half_range == b.half_range
    assert (a.min, a.max, a.count, a.nonfinite) == (b.min, b.max, b.count, b.nonfinite)
    diff = np.nonzero(a.counts != b.counts)[0][:8]
    assert diff.size == 0, f"bins differ at {diff}: {a.counts[diff]} vs {b.counts[diff]}"


# --------------------------------------------------------------------------- min / max


@pytest.mark.parametrize("kind", OBSERVERS)
def test_minmax_is_exact_over_batches(kind, rng):
    batches = [(rng.standard_normal((4, 5)) * 10.0**e).astype(np.float32) for e in (-3, 0, 2, -1)]
    observer = _observe(kind, batches)
    everything = np.concatenate([b.ravel() for b in batches])
    assert observer.min == float(everything.min())
    assert observer.max == float(everything.max())
    assert observer.count == everything.size and observer.nonfinite == 0
    assert not observer.empty


@pytest.mark.parametrize("kind", OBSERVERS)
def test_nonfinite_values_are_counted_and_ignored(kind):
    observer = kind()
    out = observer.update(np.array([[1.5, np.nan, np.inf], [-np.inf, -2.25, np.nan]]))
    assert out.dtype == np.float32 and out.tolist() == [1.5, -2.25]
    assert (observer.min, observer.max) == (-2.25, 1.5)
    assert observer.count == 2 and observer.nonfinite == 4
    observer.update(np.array([np.inf, 0.5], dtype=np.float32))
    assert (observer.min, observer.max, observer.count, observer.nonfinite) == (-2.25, 1.5, 3, 5)
    if isinstance(observer, HistogramObserver):
        assert observer.counts.sum() == 3


@pytest.mark.parametrize("kind", OBSERVERS)
def test_only_nonfinite_leaves_the_observer_empty(kind):
    observer = kind()
    observer.update(np.array([np.nan, np.inf, -np.inf], dtype=np.float32))
    assert observer.empty and observer.count == 0 and observer.nonfinite == 3
    assert (observer.min, observer.max) == (math.inf, -math.inf)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=60),
    st.integers(0, 60),
)
def test_minmax_merge_of_halves_equals_one_over_all(values, cut):
    data = np.array(values, dtype=np.float32)
    whole = _observe(MinMaxObserver, [data])
    first, second = _observe(MinMaxObserver, [data[:cut]]), _observe(MinMaxObserver, [data[cut:]])
    for a, b in ((first, second), (second, first)):
        merged = MinMaxObserver()
        merged.merge(a)
        merged.merge(b)
        assert merged.to_dict() == whole.to_dict()
    finite = data[np.isfinite(data)]
    assert whole.count == finite.size and whole.nonfinite == data.size - finite.size
    if finite.size:
        assert (whole.min, whole.max) == (float(finite.min()), float(finite.max()))


def test_minmax_merge_rejected_into_histogram():
    with pytest.raises(TypeError):
        HistogramObserver().merge(MinMaxObserver())


# --------------------------------------------------------------------------- histogram merge

# magnitudes with exact powers of two (the observer's half-range candidates) and bin edges
EDGE_VALUES = [1.0, -1.0, 0.5, -0.5, 4.0, 256.0, -256.0, 2.0**-3, 0.0, -0.0, 1.0 - 2.0**-11]


@st.composite
def two_halves(draw) -> tuple[np.ndarray, np.ndarray]:
    """Half A in [-1, 1], half B in [-300, 5] (different ranges), both with edge values."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_a, n_b = draw(st.integers(0, 300)), draw(st.integers(1, 300))
    a = rng.uniform(-1.0, 1.0, n_a)
    b = rng.uniform(-300.0, 5.0, n_b)
    a = np.concatenate([a, draw(st.lists(st.sampled_from(EDGE_VALUES[:4] + EDGE_VALUES[7:])))])
    b = np.concatenate([b, draw(st.lists(st.sampled_from(EDGE_VALUES)))])
    if draw(st.booleans()):  # sometimes the small-range half is the second one
        a, b = b, a
    return a.astype(np.float32), b.astype(np.float32)


@settings(max_examples=80, deadline=None)
@given(two_halves(), st.lists(st.integers(0, 10**6), max_size=3), st.booleans())
def test_histogram_merge_equals_one_over_all(halves, cuts, merge_into_empty):
    a, b = halves
    whole = _observe(HistogramObserver, [np.concatenate([a, b])])
    first = _observe(HistogramObserver, _batches(a, cuts))
    second = _observe(HistogramObserver, _batches(b, cuts))
    assert whole.count == a.size + b.size == whole.counts.sum()
    for x, y in ((first, second), (second, first)):
        merged = HistogramObserver()
        if merge_into_empty:
            merged.merge(x)
        else:
            merged = _observe(HistogramObserver, _batches(a if x is first else b, cuts))
        merged.merge(y)
        _assert_same_histogram(merged, whole)


@settings(max_examples=60, deadline=None)
@given(two_halves(), st.lists(st.integers(0, 10**6), min_size=1, max_size=6), st.booleans())
def test_histogram_batches_equal_one_update(halves, cuts, growing):
    """Growing the range batch after batch keeps every count and lands in the same bins."""
    data = np.concatenate(halves)
    batches = _batches(data, cuts)
    if growing:  # batches of rising magnitude, each ending at a power of two when there is one
        data = data[np.argsort(np.abs(data), kind="stable")]
        power_of_two = (data != 0) & (np.frexp(np.abs(data))[0] == 0.5)
        batches = np.split(data, np.nonzero(power_of_two)[0] + 1)
    _assert_same_histogram(
        _observe(HistogramObserver, batches), _observe(HistogramObserver, [data])
    )


def test_histogram_value_at_a_power_of_two_keeps_its_bin():
    """1.0 seen while R == 1 must land where one observer over everything puts it."""
    grown = _observe(HistogramObserver, [np.float32([1.0, -0.3]), np.float32([3.0])])
    whole = _observe(HistogramObserver, [np.float32([1.0, -0.3, 3.0])])
    _assert_same_histogram(grown, whole)
    edges = whole.edges
    one = int(np.nonzero((edges[:-1] <= 1.0) & (edges[1:] > 1.0))[0][0])
    assert grown.counts[one] == 1


def test_histogram_range_is_a_power_of_two_above_the_data():
    observer = _observe(HistogramObserver, [np.float32([0.75, -3.0])])
    assert observer.half_range == 4.0
    observer.update(np.float32([4.0]))
    assert observer.half_range == 8.0  # strictly above: 4.0 is in a half-open bin
    assert observer.counts.sum() == 3


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 0.0, -0.0],
        [1e-45, -3e-45, 0.0],  # subnormal float32
        [1e-40, 2e-39],
        [3e38, -1.0],  # needs R = 2**128, beyond float32
        [-3.4028235e38, 3.4028235e38],
    ],
)
def test_histogram_extreme_magnitudes(values):
    data = np.array(values, dtype=np.float32)
    observer = _observe(HistogramObserver, [data[:1], data[1:]])
    assert observer.counts.sum() == observer.count == data.size
    assert observer.half_range > max(abs(observer.min), abs(observer.max))
    assert percentile_range(observer, 100.0) == (float(data.min()), float(data.max()))
    _assert_same_histogram(observer, _observe(HistogramObserver, [data]))


def test_histogram_growth_keeps_total_count(rng):
    observer = HistogramObserver()
    total = 0
    for exponent in range(-4, 12, 3):  # every batch widens the range
        batch = (rng.standard_normal(500) * 2.0**exponent).astype(np.float32)
        observer.update(batch)
        total += batch.size
        assert observer.counts.sum() == total == observer.count


# --------------------------------------------------------------------------- percentiles


def test_percentile_100_is_min_max(rng):
    data = (rng.standard_normal(5000) * 3 + 1).astype(np.float32)
    observer = _observe(HistogramObserver, [data])
    assert percentile_range(observer, 100.0) == (float(data.min()), float(data.max()))


def test_percentile_matches_numpy_within_one_bin(rng):
    data = rng.standard_normal(200_000).astype(np.float32)
    observer = _observe(HistogramObserver, np.array_split(data, 7))
    bin_width = 2 * observer.half_range / BINS
    for p in (99.9, 99.0, 99.99):
        lo, hi = percentile_range(observer, p)
        want_lo, want_hi = np.percentile(data.astype(np.float64), [100.0 - p, p])
        assert abs(lo - want_lo) <= bin_width, (p, lo, want_lo, bin_width)
        assert abs(hi - want_hi) <= bin_width, (p, hi, want_hi, bin_width)
        assert observer.min <= lo < hi <= observer.max


def test_percentile_on_skewed_data(rng):
    data = np.concatenate([rng.exponential(1.0, 100_000), -rng.exponential(0.01, 1000)])
    data = data.astype(np.float32)
    observer = _observe(HistogramObserver, [data])
    bin_width = 2 * observer.half_range / BINS
    lo, hi = percentile_range(observer, 99.5)
    want_lo, want_hi = np.percentile(data.astype(np.float64), [0.5, 99.5])
    assert abs(lo - want_lo) <= bin_width and abs(hi - want_hi) <= bin_width
