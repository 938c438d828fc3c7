"""Where sharded work runs: one seam, three engines, one shard rule and one merge order.

Rules, the same for every engine, so a result does not depend on where it was computed:

1. Calibration: batch ``i`` of the stream goes to shard ``i % workers``; each shard observes its
   batches in stream order with fresh observers (``ShardObserver``); the shards' observers are
   merged into the caller's in shard order 0, 1, ..., N-1. Min-max and histogram counts then
   equal one process exactly, Hessians to float32 rounding, moving averages by their merge rule.
2. Variants (sensitivity, accuracy targets): one task per item, ``function(item)``, on any
   worker; results come back in item order. A task is a pure function of the shipped
   ``function`` (its state) and its item, so which worker runs it does not change its result.
3. Engines (``ENGINES``): ``local`` runs in this process (one worker) or in spawned processes
   (``onnxq.calibration.parallel``); ``ray`` runs Ray actors (``onnxq.ray_engine``), on this
   machine or on a cluster. Each worker owns one ONNX Runtime session with ``threads``
   intra-op threads.

A batch is a checked feed, or a ``BatchFile`` the worker reads and checks itself (folder and glob
sources: the driver never reads those). ``on_batch(index, samples)`` runs in the caller's
process once batch ``index`` has been observed, in completion order.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import onnx

from onnxq.calibration.collect import Observer, ShardObserver
from onnxq.calibration.readers import BatchFile, Feed
from onnxq.errors import ConfigError
from onnxq.model_io import InputSpec

Batch = Feed | BatchFile
OnBatch = Callable[[int, int], None]
T = TypeVar("T")
R = TypeVar("R")


class Executor(abc.ABC):
    """An engine with ``workers`` workers of ``threads`` ORT threads each (module rules)."""

    workers: int
    threads: int | None

    @abc.abstractmethod
    def collect(
        self,
        model: bytes | onnx.ModelProto,
        observers: Mapping[str, Sequence[Observer]],
        batches: Iterable[Batch],
        inputs: Sequence[InputSpec],
        *,
        on_batch: OnBatch | None = None,
    ) -> None:
        """Fill ``observers`` (fresh) from ``batches`` (rule 1)."""

    @abc.abstractmethod
    def map(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[function(item) for item in items]`` over the workers (rule 2); ``function`` (a
        picklable callable holding the shared state) is shipped once per worker."""

    def close(self) -> None:  # noqa: B027 (engines with nothing to release keep this)
        """Release the workers (and a Ray instance this executor started)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class InProcess(Executor):
    """One worker: this process, ORT's default threads."""

    workers = 1
    threads = None

    def collect(
        self,
        model: bytes | onnx.ModelProto,
        observers: Mapping[str, Sequence[Observer]],
        batches: Iterable[Batch],
        inputs: Sequence[InputSpec],
        *,
        on_batch: OnBatch | None = None,
    ) -> None:
        shard = ShardObserver(model, observers, inputs=inputs)
        for index, batch in enumerate(batches):
            samples = shard.observe(index, batch)
            if on_batch is not None:
                on_batch(index, samples)

    def map(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [function(item) for item in items]


def merge_shards(
    observers: Mapping[str, Sequence[Observer]],
    shards: Iterable[Mapping[str, Sequence[Observer]]],
) -> None:
    """Merge each shard's observers into ``observers``, shard after shard (rule 1)."""
    for shard in shards:
        for name, group in observers.items():
            for own, other in zip(group, shard[name], strict=True):
                own.merge(other)


def check_fresh(observers: Mapping[str, Sequence[Observer]]) -> None:
    """Sharded collection merges into the caller's observers: they must not have seen data."""
    if any(getattr(obs, "count", 0) for group in observers.values() for obs in group):
        raise ValueError("sharded collection fills fresh observers; these have seen data")


def local_executor(workers: int = 1) -> Executor:
    """This process for one worker, else ``workers`` spawned processes."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return InProcess()
    from onnxq.calibration.parallel import LocalProcesses

    return LocalProcesses(workers)


def ray_executor(workers: int | None = None, address: str | None = None) -> Executor:
    """Ray actors (``onnxq.ray_engine``); Ray is imported only here."""
    from onnxq.ray_engine import RayExecutor

    return RayExecutor(workers, address)


ENGINES: dict[str, Callable[[int | None, str | None], Executor]] = {
    "local": lambda workers, _address: local_executor(workers or 1),
    "ray": ray_executor,
}


def open_executor(
    engine: str = "local", workers: int | None = None, address: str | None = None
) -> Executor:
    """The executor of ``engine`` with ``workers`` workers (``None``: 1 locally, one per CPU
    on Ray); ``address``: the Ray cluster to join (``RAY_ADDRESS`` when ``None``)."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if address is not None and engine != "ray":
        raise ConfigError("a Ray address needs the ray engine (--engine ray)")
    return ENGINES[engine](workers, address)
