"""Moving-average min-max: PyTorch's EMA per batch, its merge rule, and (de)serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calibration.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    observer_from_dict,
)
from onnxq.calibration.ranges import moving_average_range


def _observe(batches: list[np.ndarray], c: float = 0.01) -> MovingAverageMinMaxObserver:
    observer = MovingAverageMinMaxObserver(c)
    for batch in batches:
        observer.update(batch)
    return observer


def test_ema_of_batch_extremes_as_pytorch():
    """``m0 = min(b0)``, then ``m <- m + c (min(b) - m)``; non-finite values are skipped and
    a batch with no finite value leaves the average alone."""
    batches = [
        np.float32([1.0, -2.0, 3.0]),
        np.float32([0.5, np.inf, -1.0]),
        np.float32([np.nan, np.nan]),
        np.float32([10.0, -8.0]),
    ]
    c = 0.25
    observer = _observe(batches, c)
    lo, hi = -2.0, 3.0
    lo, hi = lo + c * (-1.0 - lo), hi + c * (0.5 - hi)
    lo, hi = lo + c * (-8.0 - lo), hi + c * (10.0 - hi)
    assert moving_average_range(observer) == (lo, hi)
    assert (observer.min, observer.max, observer.batches) == (-8.0, 10.0, 3)
    assert observer.nonfinite == 3


def test_constant_must_be_a_fraction():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            MovingAverageMinMaxObserver(bad)


batches_strategy = st.lists(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=8), min_size=0, max_size=6
)


def _arrays(lists: list[list[float]]) -> list[np.ndarray]:
    return [np.float32(values) for values in lists]


@settings(max_examples=60, deadline=None)
@given(batches_strategy, batches_strategy, batches_strategy)
def test_merge_is_a_count_weighted_mean(a, b, c):
    """Commutative, identity = empty, between the shards' averages, associative up to rounding."""
    x, y, z = (_observe(_arrays(v), 0.1) for v in (a, b, c))

    def merged(*parts: MovingAverageMinMaxObserver) -> MovingAverageMinMaxObserver:
        out = MovingAverageMinMaxObserver(0.1)
        for part in parts:
            out.merge(part)
        return out

    xy, yx = merged(x, y), merged(y, x)
    assert moving_average_range(xy) == pytest.approx(moving_average_range(yx), rel=1e-12)
    assert merged(x).to_dict() == x.to_dict()
    if x.count and y.count:
        for attr in ("average_min", "average_max"):
            low, high = sorted((getattr(x, attr), getattr(y, attr)))
            assert low - 1e-9 <= getattr(xy, attr) <= high + 1e-9
            n = x.count + y.count
            expected = (x.count * getattr(x, attr) + y.count * getattr(y, attr)) / n
            assert getattr(xy, attr) == pytest.approx(expected, rel=1e-12)
    left, right = merged(merged(x, y), z), merged(x, merged(y, z))
    assert moving_average_range(left) == pytest.approx(moving_average_range(right), rel=1e-9)
    assert (left.min, left.max, left.count, left.batches) == (
        right.min,
        right.max,
        right.count,
        right.batches,
    )


def test_merge_refuses_other_constants_and_kinds():
    with pytest.raises(ValueError):
        MovingAverageMinMaxObserver(0.1).merge(MovingAverageMinMaxObserver(0.2))
    with pytest.raises(TypeError):
        MovingAverageMinMaxObserver().merge(MinMaxObserver())


@pytest.mark.parametrize("kind", [MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver])
def test_state_round_trips_through_json(kind, rng):
    observer = kind()
    assert observer_from_dict(json.loads(json.dumps(observer.to_dict()))).to_dict() == (
        observer.to_dict()
    )
    for scale in (0.5, 30.0, 0.01):
        observer.update(rng.standard_normal(300).astype(np.float32) * scale)
    observer.update(np.float32([np.inf, np.nan]))
    again = observer_from_dict(json.loads(json.dumps(observer.to_dict(), allow_nan=False)))
    assert type(again) is kind
    assert again.to_dict() == observer.to_dict()
    if isinstance(observer, HistogramObserver):
        assert np.array_equal(again.counts, observer.counts)


def test_corrupt_histogram_state_is_refused(rng):
    observer = HistogramObserver()
    observer.update(rng.standard_normal(100).astype(np.float32))
    state = observer.to_dict()
    with pytest.raises(ValueError):
        observer_from_dict({**state, "counts": state["counts"][:-1]})
    with pytest.raises(ValueError):
        observer_from_dict({**state, "kind": "nope"})
