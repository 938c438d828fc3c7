"""The ``ray`` engine: calibration shards and variant tasks on Ray actors (``onnxq.executor``).

Rules:

1. Joining: ``address`` (else the ``RAY_ADDRESS`` variable) joins that cluster, after a TCP probe
   of ``host:port`` (``CONNECT_TIMEOUT_S``), so an unreachable address is an error in seconds,
   not minutes of Ray's retries. Without one, a local Ray instance sized to this machine (its
   cores, no dashboard) is started, and shut down on ``close``. A Ray already initialised in
   this process (a notebook, a test) is used as it is and left running. Ray is contacted on
   first use, not when the executor is made.
2. Sizing: ``workers`` defaults to the cluster's CPUs. Each actor reserves ``threads`` CPUs and
   gives ONNX Runtime exactly that many intra-op threads (Ray sets ``OMP_NUM_THREADS``, which
   numpy's BLAS follows, to the same), so no node is oversubscribed: ``threads`` is the largest
   count for which every actor fits on some node (``actor_threads``).
3. Data: the model goes into the object store once (one copy per node); a batch travels as the
   argument of its actor call (large ones through the object store); a ``BatchFile`` travels as
   a path the actor reads from storage every node sees. At most ``QUEUE_DEPTH`` batches per
   worker are in flight. Each actor observes its shard in stream order (an actor runs its calls
   in submission order) and the driver merges the shards in shard order.
4. Failures: a batch ONNX Runtime rejects is the same ``OnnxqError`` as in one process; an actor
   that dies (killed, out of memory, its node gone) is an ``EngineError`` naming its shard or
   task. Nothing is retried: a stream read by the driver cannot be replayed. On any exception,
   ``KeyboardInterrupt`` included, every actor is killed before it propagates.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import onnx

from onnxq.calibration.collect import Observer, ShardObserver
from onnxq.calibration.parallel import available_cores
from onnxq.errors import ConfigError, EngineError, OnnxqError, first_line
from onnxq.executor import Batch, Executor, OnBatch, R, T, check_fresh, merge_shards
from onnxq.model_io import InputSpec

CONNECT_TIMEOUT_S = 5.0
QUEUE_DEPTH = 2  # batches in flight per worker
INSTALL_HINT = 'pip install "onnxq[ray]"'


def import_ray() -> Any:
    """The ``ray`` module, or an ``EngineError`` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise EngineError(
            f"the ray engine needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


def actor_threads(node_cpus: Sequence[int], workers: int) -> int:
    """The most threads per actor such that ``workers`` actors fit on nodes of these CPUs."""
    for threads in range(max(1, sum(node_cpus) // workers), 0, -1):
        if sum(cpus // threads for cpus in node_cpus) >= workers:
            return threads
    raise ConfigError(
        f"{workers} Ray workers need {workers} CPUs; the cluster has {sum(node_cpus)} "
        "(ask for fewer with --workers)"
    )


def check_reachable(address: str) -> None:
    """A TCP connect to ``host:port`` of a Ray address (``ray://`` client addresses too)."""
    if address == "auto":  # Ray finds the cluster of this machine itself
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"Ray address {address!r} is not host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EngineError(f"cannot reach the Ray cluster at {address}: {reason}") from None


class RayExecutor(Executor):
    """Ray actors on a cluster or a local instance (module rules)."""

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.ray = import_ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.requested = workers
        self.started = False
        self._size: tuple[int, int] | None = None  # workers, threads

    @property
    def workers(self) -> int:  # type: ignore[override]
        return self._sized()[0]

    @property
    def threads(self) -> int:  # type: ignore[override]
        return self._sized()[1]

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def collect(
        self,
        model: bytes | onnx.ModelProto,
        observers: Mapping[str, Sequence[Observer]],
        batches: Iterable[Batch],
        inputs: Sequence[InputSpec],
        *,
        on_batch: OnBatch | None = None,
    ) -> None:
        check_fresh(observers)
        workers, threads = self._sized()
        ray = self.ray
        plan = {name: list(group) for name, group in observers.items()}
        model_ref = ray.put(model)
        worker = ray.remote(_ShardWorker).options(num_cpus=threads, max_restarts=0)
        actors = [worker.remote(model_ref, plan, tuple(inputs), threads) for _ in range(workers)]
        pending: dict[Any, int] = {}  # call -> batch index

        def settle() -> None:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                index = pending.pop(ref)
                samples = self._get(ref, _shard(index % workers, workers))
                if on_batch is not None:
                    on_batch(index, samples)

        with self._killed_after(actors):
            for index, batch in enumerate(batches):
                while len(pending) >= workers * QUEUE_DEPTH:
                    settle()
                pending[actors[index % workers].observe.remote(index, batch)] = index
            while pending:
                settle()
            results = [actor.observers.remote() for actor in actors]
            # fetched in shard order as the merge goes: one shard's observers here at a time
            merge_shards(
                observers,
                (self._get(result, _shard(k, workers)) for k, result in enumerate(results)),
            )

    def map(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if not items:
            return []
        workers, threads = self._sized()
        count = min(workers, len(items))
        function_ref = self.ray.put(function)
        worker = self.ray.remote(_TaskWorker).options(num_cpus=threads, max_restarts=0)
        actors = [worker.remote(function_ref) for _ in range(count)]
        with self._killed_after(actors):
            calls = [actors[i % count].call.remote(item) for i, item in enumerate(items)]
            return [self._get(call, f"task {i} of {len(items)}") for i, call in enumerate(calls)]

    def _sized(self) -> tuple[int, int]:
        """Join or start Ray (rule 1) and size the workers (rule 2), once."""
        if self._size is None:
            self._connect()
            nodes = [node for node in self.ray.nodes() if node.get("Alive")]
            node_cpus = [int(node["Resources"].get("CPU", 0)) for node in nodes]
            workers = self.requested or max(1, sum(node_cpus))
            self._size = (workers, actor_threads(node_cpus, workers))
        return self._size

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        if self.address is None:
            ray.init(address="local", num_cpus=available_cores(), include_dashboard=False, **quiet)
        else:
            check_reachable(self.address)
            try:
                ray.init(address=self.address, **quiet)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
                raise EngineError(
                    f"cannot join the Ray cluster at {self.address}: {first_line(exc)}"
                ) from None
        self.started = True

    def _get(self, ref: Any, what: str) -> Any:
        """``ray.get`` with Ray's failures turned into onnxq's errors (rule 4)."""
        errors = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except errors.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, OnnxqError):
                raise cause from None
            raise EngineError(
                f"{what} failed on its Ray worker: {type(cause).__name__}: {first_line(cause)}"
            ) from None
        except errors.RayActorError as exc:
            raise EngineError(
                f"{what} lost its Ray worker, not retried: {first_line(exc)}"
            ) from None
        except errors.RayError as exc:
            raise EngineError(f"{what} failed in Ray, not retried: {first_line(exc)}") from None

    @contextlib.contextmanager
    def _killed_after(self, actors: list[Any]) -> Iterator[None]:
        """Kill the actors when the block ends, whatever ends it: no work outlives the call."""
        try:
            yield
        finally:
            for actor in actors:
                with contextlib.suppress(Exception):  # already dead, or Ray is going down
                    self.ray.kill(actor, no_restart=True)


def _shard(k: int, workers: int) -> str:
    batches = ", ".join(str(k + step * workers) for step in range(3))
    return f"calibration shard {k} of {workers} (batches {batches}, ...)"


class _ShardWorker:
    """A Ray actor: one shard's ``ShardObserver``, its session built once."""

    def __init__(
        self,
        model: bytes | onnx.ModelProto,
        plan: dict[str, list[Observer]],
        inputs: tuple[InputSpec, ...],
        threads: int,
    ) -> None:  # Ray hands out numpy arrays read-only: the observers get writable copies
        self.shard = ShardObserver(model, copy.deepcopy(plan), inputs=inputs, threads=threads)

    def observe(self, index: int, batch: Batch) -> int:
        return self.shard.observe(index, batch)

    def observers(self) -> Mapping[str, Sequence[Observer]]:
        return self.shard.observers


class _TaskWorker:
    """A Ray actor holding a task function (received once) and running it on items."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = copy.deepcopy(function)  # writable arrays, as in the driver

    def call(self, item: Any) -> Any:
        return self.function(item)
