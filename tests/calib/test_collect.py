"""collect: ranges equal numpy's over the same math; ORT failures are one-line errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxq.calibration.collect import augment_outputs, collect
from onnxq.calibration.observers import HistogramObserver, MinMaxObserver
from onnxq.errors import CalibrationDataError

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
W = np.array([0.5, -2.0, 3.0, 0.25], dtype=np.float32)
C = np.float32(-0.75)

# x -> Relu -> Mul by a constant vector -> Add a scalar constant -> y (4 is a fixed dimension)
MODEL = f"""{HEADER}
agraph (float[N, 4] x) => (float[N, 4] y)
    <float[4] w = {{0.5, -2.0, 3.0, 0.25}}, float c = {{-0.75}}>
{{
    r = Relu(x)
    m = Mul(r, w)
    y = Add(m, c)
}}"""

NAMES = ["r", "m", "y"]


def _model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(MODEL)
    onnx.checker.check_model(model, full_check=True)
    return model


def _numpy(x: np.ndarray) -> dict[str, np.ndarray]:
    """The same float32 math (each op rounds to float32, as ORT's kernels do)."""
    r = np.maximum(x, np.float32(0))
    m = r * W
    return {"r": r, "m": m, "y": m + C}


def _feeds(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    feeds = [
        {"x": (rng.standard_normal((n, 4)) * scale).astype(np.float32)}
        for n, scale in ((2, 1.0), (5, 10.0), (1, 0.01), (3, 3.0))
    ]
    feeds[2]["x"][0, 1] = np.inf  # relu -> inf, * -2 -> -inf, + c -> -inf
    feeds[3]["x"][1, 2] = -np.inf  # relu -> 0: finite downstream
    return feeds


@pytest.mark.parametrize("histogram", [False, True])
def test_ranges_equal_numpy(histogram, rng):
    feeds = _feeds(rng)
    seen = []
    observers = collect(_model(), NAMES, feeds, histogram=histogram, on_batch=seen.append)
    assert seen == feeds  # every batch, in order
    assert list(observers) == NAMES
    expected = {name: [] for name in NAMES}
    for feed in feeds:
        for name, value in _numpy(feed["x"]).items():
            expected[name].append(value.ravel())
    for name in NAMES:
        values = np.concatenate(expected[name])
        finite = values[np.isfinite(values)]
        observer = observers[name]
        assert isinstance(observer, HistogramObserver if histogram else MinMaxObserver)
        assert observer.min == float(finite.min()), name
        assert observer.max == float(finite.max()), name
        assert observer.count == finite.size and observer.nonfinite == values.size - finite.size
        if histogram:
            oracle = HistogramObserver()
            for batch in expected[name]:
                oracle.update(batch)
            assert observer.half_range == oracle.half_range
            assert np.array_equal(observer.counts, oracle.counts), name
    # the inf fed to x reached m and y as -inf; -inf stopped at Relu
    assert observers["r"].nonfinite == 1 and observers["m"].nonfinite == 1
    assert observers["y"].nonfinite == 1


def test_duplicate_names_and_graph_outputs(rng):
    feeds = _feeds(rng)[:2]
    observers = collect(_model(), ["y", "m", "y", "m"], feeds, histogram=False)
    assert list(observers) == ["y", "m"]
    y = np.concatenate([_numpy(f["x"])["y"].ravel() for f in feeds])
    assert (observers["y"].min, observers["y"].max) == (float(y.min()), float(y.max()))


def test_augment_outputs_leaves_the_model_alone():
    model = _model()
    augmented = augment_outputs(model, ["m", "y", "r"])
    assert [o.name for o in model.graph.output] == ["y"]
    assert [o.name for o in augmented.graph.output] == ["y", "m", "r"]
    assert all(
        o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in augmented.graph.output
    )


def test_no_feeds_gives_empty_observers():
    observers = collect(_model(), NAMES, [], histogram=True)
    assert all(observer.empty for observer in observers.values())


def _assert_one_line(exc: CalibrationDataError, batch: int) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert message.startswith(f"batch {batch}: "), message


def test_kernel_failure_is_a_calibration_error():
    """Shapes that only clash inside a kernel (Add broadcast): ORT raises ``Fail``."""
    model = onnx.parser.parse_model(
        f"{HEADER}\nagraph (float[N] a, float[M] b) => (float[K] y) {{ s = Add(a, b)\n"
        "y = Relu(s) }"
    )
    good = {"a": np.ones(3, np.float32), "b": np.ones(1, np.float32)}
    bad = {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)}
    with pytest.raises(CalibrationDataError) as info:
        collect(model, ["s"], [good, bad], histogram=False)
    _assert_one_line(info.value, 1)
    assert "ONNX Runtime failed" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"x": np.ones((2, 5), np.float32)}, id="wrong-fixed-dim"),
        pytest.param({"x": np.ones((4,), np.float32)}, id="wrong-rank"),
        pytest.param({"x": np.ones((2, 4), np.float64)}, id="wrong-dtype"),
        pytest.param({"z": np.ones((2, 4), np.float32)}, id="missing-input"),
    ],
)
def test_bad_feed_is_a_one_line_calibration_error(bad):
    good = {"x": np.ones((2, 4), np.float32)}
    try:
        collect(_model(), NAMES, [good, bad], histogram=False)
    except CalibrationDataError as exc:
        _assert_one_line(exc, 1)
    else:
        pytest.fail("a bad feed was accepted")
