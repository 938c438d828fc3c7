"""Parallel collection: deterministic shards equal one process; errors and Ctrl-C end cleanly."""

from __future__ import annotations

import multiprocessing

import numpy as np
import onnx.parser
import pytest

from onnxq.calibration.collect import ShardObserver
from onnxq.calibration.observers import HistogramObserver, MovingAverageMinMaxObserver
from onnxq.calibration.parallel import worker_threads
from onnxq.config import QuantConfig
from onnxq.errors import CalibrationDataError, ConfigError
from onnxq.executor import local_executor
from onnxq.model_io import input_specs
from onnxq.pipeline import calibrate

SIZES = [5, 3, 8, 1, 4, 6, 2]  # uneven batch sizes: batch i goes to worker i % 2


def _feeds(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [
        {"x": (rng.standard_normal((n, 3, 16, 16)) * (1 + i)).astype(np.float32)}
        for i, n in enumerate(SIZES)
    ]


def test_two_workers_equal_one(cnn, rng):
    feeds = _feeds(rng)
    progress: list[int] = []
    one = calibrate(cnn, feeds, QuantConfig(), workers=1)
    two = calibrate(cnn, feeds, QuantConfig(), workers=2, on_batch=progress.append)
    assert (one.samples, one.batches) == (two.samples, two.batches) == (sum(SIZES), len(SIZES))
    assert progress == sorted(progress) and progress[-1] == sum(SIZES)
    assert one.fingerprint == two.fingerprint and list(one.observers) == list(two.observers)
    for name, (histogram, average) in one.observers.items():
        other_histogram, other_average = two.observers[name]
        assert isinstance(histogram, HistogramObserver), name
        assert histogram.to_dict() == other_histogram.to_dict(), name  # counts exactly
        assert (average.min, average.max, average.count, average.batches) == (
            other_average.min,
            other_average.max,
            other_average.count,
            other_average.batches,
        )
    assert one.hessians.keys() == two.hessians.keys()
    for node, hessian in one.hessians.items():
        # each batch's x x^T is a float32 product: BLAS threads change its rounding
        scale = np.abs(hessian).max()
        np.testing.assert_allclose(two.hessians[node], hessian, atol=1e-6 * scale, err_msg=node)


def test_moving_average_merges_the_shards_by_definition(cnn, rng):
    """Two workers: the count-weighted mean of the even and odd batches' EMAs."""
    feeds = _feeds(rng)
    two = calibrate(cnn, feeds, QuantConfig(), workers=2, hessians=False)
    shards = [calibrate(cnn, feeds[k::2], QuantConfig(), hessians=False) for k in (0, 1)]
    for name, group in two.observers.items():
        average = group[1]
        assert isinstance(average, MovingAverageMinMaxObserver)
        a, b = (shard.observers[name][1] for shard in shards)
        expected = (a.count * a.average_max + b.count * b.average_max) / (a.count + b.count)
        assert average.average_max == pytest.approx(expected, rel=1e-12), name


ADD = """<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N] a, float[M] b) => (float[K] y) { s = Add(a, b)
 y = Relu(s) }"""


def test_worker_error_names_the_batch():
    """Batch 3 (worker 1's second) fails inside ONNX Runtime: same one-line error as inline."""
    model = onnx.parser.parse_model(ADD)
    good = {"a": np.ones(3, np.float32), "b": np.ones(1, np.float32)}
    bad = {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)}
    feeds = [good, good, good, bad, good]
    for workers in (1, 2):
        with pytest.raises(CalibrationDataError, match=r"^batch 3: ONNX Runtime failed"):
            local_executor(workers).collect(
                model.SerializeToString(), {"s": [HistogramObserver()]}, feeds, input_specs(model)
            )
    assert not multiprocessing.active_children()


def test_keyboard_interrupt_terminates_the_workers(cnn, rng):
    feeds = _feeds(rng)

    def interrupted():
        yield from feeds[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(cnn, interrupted(), QuantConfig(), workers=2)
    assert not multiprocessing.active_children()


def test_a_shard_observer_is_built_from_picklable_parts(cnn, rng):
    """What every worker runs: bytes, fresh observers, the inputs in; samples per batch out."""
    feeds = _feeds(rng)[:2]
    observers = {"x": [HistogramObserver()]}
    shard = ShardObserver(cnn.SerializeToString(), observers, inputs=input_specs(cnn))
    assert [shard.observe(i, feed) for i, feed in enumerate(feeds)] == SIZES[:2]
    assert observers["x"][0].count == sum(f["x"].size for f in feeds)


def test_worker_settings():
    assert worker_threads(1) >= worker_threads(2) >= 1
    with pytest.raises(ConfigError):
        local_executor(0)
