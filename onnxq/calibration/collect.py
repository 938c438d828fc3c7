"""Run calibration batches through an augmented copy of the model and observe chosen tensors.

The copy lists every observed tensor as a graph output; ONNX Runtime runs it with graph
optimisations off (so every tensor keeps its name and float value). One batch is in memory at a
time: its activations are folded into the observers and dropped before the next batch runs.

``collect_shard`` is the unit of distributed work: a plain function of picklable arguments
(serialised model, fresh observers per tensor, an iterable of feeds) returning the filled
observers. ``onnxq.calibration.parallel`` runs one per worker process and merges the results;
a cluster engine could run the same function remotely (e.g. ``ray.remote(collect_shard)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.observers import HistogramObserver, MinMaxObserver
from onnxq.errors import CalibrationDataError, first_line
from onnxq.runtime import OptimizationLevel, make_session

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


def graph_session(model: onnx.ModelProto, *, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session that runs the graph as written (no fusion, no constant folding), so every
    named tensor is the float value the graph computes; ``threads``: intra-op threads."""
    return make_session(
        model.SerializeToString(),
        optimization_level=OptimizationLevel.DISABLED,
        intra_op_threads=threads,
    )


class Observer(Protocol):
    """Anything that folds in a tensor's value, one batch at a time, and merges."""

    def update(self, values: np.ndarray) -> object: ...

    def merge(self, other: object) -> None: ...


Plan = TypeVar("Plan", bound=Mapping[str, Sequence[Observer]])


def observe(
    model: onnx.ModelProto | bytes,
    observers: Mapping[str, Sequence[Observer]],
    feeds: Iterable[Feed],
    *,
    on_batch: Callable[[Feed], None] | None = None,
    threads: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Run every feed and hand each named tensor's value to its observers.

    ``shard = (k, n)``: these feeds are batches ``k, k + n, k + 2n, ...`` of the whole stream
    (only used to number batches in error messages).
    """
    names = list(observers)
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    session = graph_session(augment_outputs(model, names), threads=threads) if names else None
    first, step = shard
    for local, feed in enumerate(feeds):
        index = first + local * step
        if session is None:  # nothing to observe: the feeds are still read and validated
            if on_batch is not None:
                on_batch(feed)
            continue
        try:
            values = session.run(names, feed)
        except Exception as exc:  # ORT raises several unrelated exception types
            raise CalibrationDataError(
                f"batch {index}: ONNX Runtime failed: {first_line(exc)}"
            ) from None
        for name, value in zip(names, values, strict=True):
            for observer in observers[name]:
                observer.update(value)
        if on_batch is not None:
            on_batch(feed)


def collect_shard(
    model_bytes: bytes,
    tensor_plan: Plan,
    shard_feeds: Iterable[Feed],
    *,
    shard: tuple[int, int] = (0, 1),
    threads: int | None = None,
    on_batch: Callable[[Feed], None] | None = None,
) -> Plan:
    """Observe one shard of the calibration batches and return ``tensor_plan``, filled.

    ``tensor_plan`` maps tensor names to fresh observers; run remotely it arrives as a pickled
    copy and the filled copy is what comes back. Merging every shard's result into one plan
    (observer by observer, ``a.merge(b)``) gives what one pass over all batches would: exactly
    for min-max and histogram counts. Runs anywhere the arguments can be pickled to: a
    ``multiprocessing`` worker (``onnxq.calibration.parallel``) or a cluster task.
    """
    observe(model_bytes, tensor_plan, shard_feeds, on_batch=on_batch, threads=threads, shard=shard)
    return tensor_plan


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
