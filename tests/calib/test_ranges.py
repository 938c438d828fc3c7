"""Range methods on known distributions, against oracles, and after merging shards."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration.observers import BINS, HistogramObserver, MinMaxObserver
from onnxq.calibration.ranges import (
    entropy_range,
    minmax_range,
    mse_range,
    observers_for,
    percentile_range,
    pick_observer,
    range_for,
)
from onnxq.config import CalibrationMethod, QuantConfig, QuantType

HISTOGRAM_METHODS = [CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY, CalibrationMethod.MSE]


def _histogram(*batches: np.ndarray) -> HistogramObserver:
    observer = HistogramObserver()
    for batch in batches:
        observer.update(np.asarray(batch, dtype=np.float32))
    return observer


def _gaussian_with_outliers(rng: np.random.Generator, *, one_sided: bool) -> np.ndarray:
    data = rng.standard_normal(200_000)
    outliers = np.full(20, 40.0)
    if one_sided:
        data = np.abs(data)
    else:
        outliers[::2] = -40.0
    return np.concatenate([data, outliers]).astype(np.float32)


# --------------------------------------------------------------------------- percentile


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1e-3, 1e3), st.floats(-1.0, 1.0))
def test_percentile_100_is_minmax(seed, scale, shift):
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(rng.integers(1, 500)) * scale + shift * scale).astype(np.float32)
    observer = _histogram(data)
    assert percentile_range(observer, 100.0) == minmax_range(observer)
    assert minmax_range(observer) == (float(data.min()), float(data.max()))


def test_percentile_is_within_one_bin_of_numpy(rng):
    data = rng.standard_normal(100_000).astype(np.float32)
    observer = _histogram(data)
    width = 2 * observer.half_range / BINS
    lo, hi = percentile_range(observer, 99.0)
    assert abs(lo - np.percentile(data, 1.0)) <= width
    assert abs(hi - np.percentile(data, 99.0)) <= width


# --------------------------------------------------------------------------- entropy


def test_entropy_clips_outliers_of_a_gaussian(rng):
    observer = _histogram(_gaussian_with_outliers(rng, one_sided=False))
    lo, hi = entropy_range(observer, 256)
    assert lo == -hi  # two-sided: one threshold on |x|
    assert 2.5 < hi < 10.0, hi  # the +-40 outliers are clipped, the bulk is kept


def test_entropy_one_sided_uses_the_whole_grid(rng):
    """Post-ReLU data: [min, T] with 256 levels; the uint8 grid is not halved."""
    observer = _histogram(_gaussian_with_outliers(rng, one_sided=True))
    lo, hi = entropy_range(observer, 256)
    assert lo == observer.min >= 0.0
    assert 2.5 < hi < 10.0
    _, hi_symmetric = entropy_range(observer, 256, symmetric=True)  # 128 levels: clips more
    assert hi_symmetric <= hi


def test_entropy_ignores_the_zero_spike_after_relu(rng):
    """Half the values exactly 0: flattened before scoring, else it pulls T down to ~1.5."""
    observer = _histogram(np.maximum(rng.standard_normal(200_000), 0).astype(np.float32))
    lo, hi = entropy_range(observer, 256)
    assert lo == 0.0 and 3.0 < hi <= observer.max


def test_entropy_without_outliers_keeps_a_uniform_range(rng):
    data = rng.uniform(0.0, 3.0, 50_000).astype(np.float32)
    observer = _histogram(data)
    lo, hi = entropy_range(observer, 256)
    assert lo == observer.min and hi >= 0.97 * observer.max


def _kl_oracle(hist: np.ndarray, levels: int) -> int:
    """The search written out as loops: zero spike flattened, P (outliers folded), Q (merged
    into evenly spaced groups, expanded over P's non-zero bins), KL(P || Q)."""
    n = int(np.flatnonzero(hist)[-1]) + 1
    if n <= levels:
        return n
    hist = hist[:n].astype(np.float64)
    hist[0] = hist[1]
    best, best_kl = n, math.inf
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        group_of = np.arange(i) * levels // i  # bin b is in group floor(b L / i)
        for g in range(levels):
            members = (group_of == g) & (p != 0)
            if members.any():
                q[members] = hist[:i][group_of == g].sum() / members.sum()
        if np.any((p > 0) & (q == 0)):
            continue
        p_hat, q_hat = p / p.sum(), q / q.sum()
        mask = p_hat > 0
        kl = float(np.sum(p_hat[mask] * np.log(p_hat[mask] / q_hat[mask])))
        if kl < best_kl - 1e-12:
            best, best_kl = i, kl
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_the_loop_oracle(seed):
    rng = np.random.default_rng(seed)
    data = np.abs(rng.standard_t(3, 20_000)).astype(np.float32)
    observer = _histogram(data)
    levels = 16  # few levels: the oracle loop stays quick
    magnitudes = observer.counts[BINS // 2 :]
    width = observer.half_range / (BINS // 2)
    expected = min(observer.max, _kl_oracle(magnitudes, levels) * width)
    assert entropy_range(observer, levels) == pytest.approx((observer.min, expected), rel=1e-12)


def test_entropy_negative_only_mirrors_positive(rng):
    data = np.abs(rng.standard_normal(20_000)).astype(np.float32)
    lo, hi = entropy_range(_histogram(data), 256)
    mirrored_lo, mirrored_hi = entropy_range(_histogram(-data), 256)
    assert (mirrored_lo, mirrored_hi) == (-hi, -lo)


# --------------------------------------------------------------------------- mse


def test_mse_clips_rare_outliers(rng):
    """200k N(0, 1) values and one at each of +-40: the squared error
    ``2 (40 - 40a)**2 + 200k (80a / 255)**2 / 12`` is least near ``a = 0.66``."""
    data = np.concatenate([rng.standard_normal(200_000), [40.0, -40.0]]).astype(np.float32)
    lo, hi = mse_range(_histogram(data), 256)
    assert lo == -hi
    assert 0.6 * 40 < hi < 0.72 * 40


def test_mse_keeps_a_uniform_range(rng):
    observer = _histogram(rng.uniform(-2.0, 2.0, 50_000).astype(np.float32))
    lo, hi = mse_range(observer, 256)
    assert lo == pytest.approx(observer.min) and hi == pytest.approx(observer.max)


# --------------------------------------------------------------------------- dispatch


def test_range_for_dispatches_and_refuses_missing_statistics(rng):
    observer = _histogram(rng.standard_normal(1000).astype(np.float32))
    for method in CalibrationMethod:
        config = QuantConfig(method=method)
        found = pick_observer([observer], method)
        if method is CalibrationMethod.MOVING_AVERAGE:
            assert found is None
            with pytest.raises(TypeError):
                range_for(observer, config)
        else:
            lo, hi = range_for(observer, config)
            assert observer.min <= lo <= hi <= observer.max
    with pytest.raises(TypeError):
        range_for(MinMaxObserver(), QuantConfig(method="entropy"))
    kinds = [type(o).kind for o in observers_for(list(CalibrationMethod))]
    assert kinds == ["histogram", "moving_average"]
    assert [o.kind for o in observers_for([CalibrationMethod.MINMAX])] == ["minmax"]


def test_empty_observer_gives_zero_range():
    config = QuantConfig(method="entropy", activation_type=QuantType.INT8)
    assert range_for(HistogramObserver(), config) == (0.0, 0.0)


# --------------------------------------------------------------------------- merging


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.integers(1, 400))
def test_histogram_methods_merge_exactly(seed, n_a, n_b):
    """Two shards merged give the same histogram, hence the same range, for every method."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n_a) * rng.uniform(0.1, 10)).astype(np.float32)
    b = np.maximum(rng.standard_normal(n_b) * rng.uniform(0.1, 100), 0).astype(np.float32)
    whole = _histogram(a, b)
    merged = _histogram(b)
    merged.merge(_histogram(a))
    for method in HISTOGRAM_METHODS:
        config = QuantConfig(method=method)
        assert range_for(merged, config) == range_for(whole, config), method
