"""Run calibration batches through an augmented copy of the model and observe chosen tensors.

The copy lists every observed tensor as a graph output; ONNX Runtime runs it with graph
optimisations off (so every tensor keeps its name and float value). One batch is in memory at a
time: its activations are folded into the observers and dropped before the next batch runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.observers import HistogramObserver, MinMaxObserver
from onnxq.errors import CalibrationDataError

Feed = dict[str, np.ndarray]


def augment_outputs(model: onnx.ModelProto, tensor_names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``tensor_names`` (float32 assumed)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    existing = {out.name for out in graph.output}
    known = {info.name: info for info in graph.value_info}
    for name in tensor_names:
        if name in existing:
            continue
        info = onnx.ValueInfoProto()
        if name in known:
            info.CopyFrom(known[name])
        else:
            info.name = name
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        graph.output.append(info)
    return augmented


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session that runs the graph as written (no fusion, no constant folding)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


class Observer(Protocol):
    """Anything that folds in a tensor's value, one batch at a time."""

    def update(self, values: np.ndarray) -> object: ...


def observe(
    model: onnx.ModelProto,
    observers: Mapping[str, Sequence[Observer]],
    feeds: Iterable[Feed],
    *,
    on_batch: Callable[[Feed], None] | None = None,
) -> None:
    """Run every feed and hand each named tensor's value to its observers."""
    names = list(observers)
    session = make_session(augment_outputs(model, names)) if names else None
    for index, feed in enumerate(feeds):
        if session is None:  # nothing to observe: the feeds are still read and validated
            if on_batch is not None:
                on_batch(feed)
            continue
        try:
            values = session.run(names, feed)
        except Exception as exc:  # ORT raises several unrelated exception types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CalibrationDataError(f"batch {index}: ONNX Runtime failed: {message}") from None
        for name, value in zip(names, values, strict=True):
            for observer in observers[name]:
                observer.update(value)
        if on_batch is not None:
            on_batch(feed)


def collect(
    model: onnx.ModelProto,
    tensor_names: Sequence[str],
    feeds: Iterable[Feed],
    *,
    histogram: bool,
    on_batch: Callable[[Feed], None] | None = None,
) -> dict[str, MinMaxObserver]:
    """Observe the ranges of ``tensor_names`` over every feed; one observer per tensor."""
    observer_type = HistogramObserver if histogram else MinMaxObserver
    observers = {name: observer_type() for name in dict.fromkeys(tensor_names)}
    observe(model, {name: [obs] for name, obs in observers.items()}, feeds, on_batch=on_batch)
    return observers
