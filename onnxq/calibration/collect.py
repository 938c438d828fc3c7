"""Run calibration batches through an augmented copy of the model and observe chosen tensors.

The copy lists every observed tensor as a graph output; ONNX Runtime runs it with graph
optimisations off (so every tensor keeps its name and float value). One batch is in memory at a
time: its activations are folded into the observers and dropped before the next batch runs.

``ShardObserver`` is the unit of distributed work: built from picklable arguments (serialised
model, fresh observers per tensor, the model's inputs), it owns one session and observes the
batches of its shard as they arrive (a checked feed, or a ``BatchFile`` it reads itself). Every
engine of ``onnxq.executor`` runs one per worker and merges their observers in shard order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.observers import HistogramObserver, MinMaxObserver
from onnxq.calibration.readers import BatchFile, Feed, load_batch, sample_count
from onnxq.errors import CalibrationDataError, first_line
from onnxq.model_io import InputSpec
from onnxq.runtime import OptimizationLevel, make_session


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


def graph_session(model: onnx.ModelProto, *, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session that runs the graph as written (no fusion, no constant folding), so every
    named tensor is the float value the graph computes; ``threads``: intra-op threads."""
    return make_session(
        model,
        optimization_level=OptimizationLevel.DISABLED,
        intra_op_threads=threads,
    )


class Observer(Protocol):
    """Anything that folds in a tensor's value, one batch at a time, and merges."""

    def update(self, values: np.ndarray) -> object: ...

    def merge(self, other: object) -> None: ...


class ShardObserver:
    """One shard's observers and the session that feeds them, built once.

    ``threads``: ONNX Runtime intra-op threads (``None``: ORT's default). ``inputs``: the
    model's inputs, needed to read and check ``BatchFile`` batches and to count samples.
    """

    def __init__(
        self,
        model: onnx.ModelProto | bytes,
        observers: Mapping[str, Sequence[Observer]],
        *,
        inputs: Sequence[InputSpec] = (),
        threads: int | None = None,
    ) -> None:
        self.observers = observers
        self.inputs = tuple(inputs)
        self.names = list(observers)
        if isinstance(model, bytes):
            model = onnx.load_from_string(model)
        self.session = (
            graph_session(augment_outputs(model, self.names), threads=threads)
            if self.names
            else None
        )

    def observe(self, index: int, batch: Feed | BatchFile) -> int:
        """Fold batch ``index`` of the whole stream into the observers; return its samples."""
        feed = load_batch(batch, self.inputs, index)
        if self.session is not None:
            try:
                values = self.session.run(self.names, feed)
            except Exception as exc:  # ORT raises several unrelated exception types
                raise CalibrationDataError(
                    f"batch {index}: ONNX Runtime failed: {first_line(exc)}"
                ) from None
            for name, value in zip(self.names, values, strict=True):
                for observer in self.observers[name]:
                    observer.update(value)
        return sample_count(feed, self.inputs) if self.inputs else 0


def observe(
    model: onnx.ModelProto | bytes,
    observers: Mapping[str, Sequence[Observer]],
    feeds: Iterable[Feed],
    *,
    on_batch: Callable[[Feed], None] | None = None,
) -> None:
    """Run every feed in this process and hand each named tensor's value to its observers."""
    shard = ShardObserver(model, observers)
    for index, feed in enumerate(feeds):
        shard.observe(index, feed)
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
