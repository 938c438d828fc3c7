"""The ``local`` engine over several processes: batch ``i`` goes to worker ``i % N``.

The parent reads the calibration source (any kind, one-shot generators and ``get_next()``
readers included: every source is read once, in order, by the parent) and sends each batch to
its worker over a bounded queue, so at most ``QUEUE_DEPTH`` batches per worker wait in memory; a
folder or glob source sends only ``BatchFile`` paths, which the worker reads itself. Each worker
is a fresh ``spawn`` process with one ``ShardObserver`` (its own ONNX Runtime session,
``intra_op_num_threads = cores // N``) and sends its observers back one tensor at a time; the
parent merges them in worker order (``onnxq.executor`` rule 1), so the merged statistics equal a
single-process run: exactly for min-max and histogram counts (a moving average merges by
definition, see ``observers``; Hessians agree to float32 rounding, as each batch's ``x x^T`` is
a float32 product whose BLAS threads differ).

Sending batches costs a pickle and a pipe copy per batch (a few ms per MB), cheap next to
running a model on it. Variant tasks (``map``) run on a ``spawn`` process pool that receives the
function once per worker.

Errors in a worker (a batch ONNX Runtime rejects) come back as the same ``OnnxqError``; a worker
that dies (killed, out of memory) is a ``CalibrationDataError``. On any exception in the parent,
``KeyboardInterrupt`` included, every worker is terminated before the exception propagates.
Workers ignore SIGINT: Ctrl-C is the parent's to handle.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.queues
import os
import pickle
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import onnx

from onnxq.calibration.collect import Observer, ShardObserver
from onnxq.errors import CalibrationDataError
from onnxq.executor import Batch, Executor, OnBatch, R, T, check_fresh, merge_shards
from onnxq.model_io import InputSpec

QUEUE_DEPTH = 2  # batches waiting per worker
_POLL_S = 0.05
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(workers: int) -> int:
    """ONNX Runtime threads per worker: the cores shared out evenly, at least one."""
    return max(1, available_cores() // workers)


class LocalProcesses(Executor):
    """``workers`` spawned processes on this machine (module docstring)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.threads = worker_threads(workers)

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
        plan = {name: list(group) for name, group in observers.items()}
        with _Workers(model, plan, inputs, self.workers, self.threads, on_batch) as pool:
            for index, batch in enumerate(batches):
                pool.send(index % self.workers, (index, batch))
            pool.finish()
            merge_shards(observers, (pool.result(worker, plan) for worker in range(self.workers)))
            pool.join()

    def map(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        context = multiprocessing.get_context("spawn")
        with _child_threads(self.threads), _children_ignore_sigint():
            pool = context.Pool(self.workers, initializer=_keep, initargs=(function,))
        with pool:  # leaving the block, normally or not, terminates the pool
            return pool.map(_call, items, chunksize=1)


_function: Callable[[Any], Any] | None = None  # a map worker's function, received once


def _keep(function: Callable[[Any], Any]) -> None:
    global _function
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _function = function


def _call(item: Any) -> Any:
    assert _function is not None
    return _function(item)


class _Workers:
    """The processes and queues of one parallel collection; terminates everything on error."""

    def __init__(
        self,
        model_bytes: bytes,
        plan: dict[str, list[Observer]],
        inputs: Sequence[InputSpec],
        workers: int,
        threads: int,
        on_batch: OnBatch | None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        inputs = tuple(inputs)
        self.on_batch = on_batch
        self.events = _Queue(context)
        self.feeds = [_Queue(context, QUEUE_DEPTH) for _ in range(workers)]
        self.results = [_Queue(context) for _ in range(workers)]
        self.processes = [
            context.Process(
                target=_work,
                args=(
                    model_bytes,
                    plan,
                    tuple(inputs),
                    self.feeds[k],
                    self.results[k],
                    self.events,
                ),
                kwargs={"threads": threads, "worker": k},
                name=f"onnxq-calibrate-{k}",
                daemon=True,
            )
            for k in range(workers)
        ]
        self.observed: set[int] = set()
        try:
            with _child_threads(threads), _children_ignore_sigint():
                for process in self.processes:
                    process.start()
        except BaseException:  # Ctrl-C while starting: no worker outlives the call
            self.__exit__(KeyboardInterrupt)
            raise

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        started = [process for process in self.processes if process.pid is not None]
        if kind is not None:
            for process in started:
                if process.is_alive():
                    process.terminate()
        for process in started:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        for q in (self.events, *self.feeds, *self.results):
            q.cancel_join_thread()
            q.close()

    def send(self, worker: int, item: tuple[int, Batch] | None) -> None:
        """Queue a numbered batch (``None``: no more) for ``worker``, reporting progress while
        waiting."""
        while True:
            try:
                self.feeds[worker].put(item, timeout=_POLL_S)
                break
            except queue.Full:
                self.poll()
        self.poll(block=False)

    def finish(self) -> None:
        """Tell every worker the stream ended and wait until all have observed their shard."""
        for worker in range(len(self.processes)):
            self.send(worker, None)
        while len(self.observed) < len(self.processes):
            self.poll()

    def result(self, worker: int, plan: Mapping[str, Any]) -> dict[str, list[Observer]]:
        """``worker``'s filled observers, received tensor by tensor in plan order."""
        filled = {}
        for name in plan:
            while True:
                try:
                    got, observers = self.results[worker].get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    self._check_alive(worker, results_pending=True)
            if got != name:
                raise RuntimeError(f"worker {worker} sent {got!r}, expected {name!r}")
            filled[name] = observers
        return filled

    def join(self) -> None:
        for process in self.processes:
            process.join()

    def poll(self, *, block: bool = True) -> None:
        """Handle worker events (progress, completion, errors); check no worker died."""
        timeout = _POLL_S if block else 0.0
        while True:
            try:
                event = self.events.get(timeout=timeout) if timeout else self.events.get_nowait()
            except queue.Empty:
                break
            timeout = 0.0
            kind, worker, payload = event
            if kind == "batch" and self.on_batch is not None:
                self.on_batch(*payload)
            elif kind == "observed":
                self.observed.add(worker)
            elif kind == "error":
                raise payload
        for worker in range(len(self.processes)):
            if worker not in self.observed:
                self._check_alive(worker)

    def _check_alive(self, worker: int, *, results_pending: bool = False) -> None:
        process = self.processes[worker]
        if process.exitcode is None:
            return
        if not results_pending:  # its last words may still be in the pipe
            with contextlib.suppress(queue.Empty):
                event = self.events.get(timeout=_POLL_S)
                if event[0] == "error":
                    raise event[2]
        raise CalibrationDataError(
            f"calibration worker {worker} stopped unexpectedly (exit code {process.exitcode}; "
            "out of memory?)"
        )


class _Queue(multiprocessing.queues.Queue):
    """A queue whose feeder thread stays quiet when the other end was terminated."""

    def __init__(self, context: Any, maxsize: int = 0) -> None:
        super().__init__(maxsize, ctx=context)

    def _on_queue_feeder_error(self, error: Exception, obj: object) -> None:
        if not isinstance(error, (BrokenPipeError, ConnectionResetError)):
            super()._on_queue_feeder_error(error, obj)


def _work(
    model_bytes: bytes,
    plan: dict[str, list[Observer]],
    inputs: tuple[InputSpec, ...],
    feeds: _Queue,
    results: _Queue,
    events: _Queue,
    *,
    threads: int,
    worker: int,
) -> None:
    """A worker: observe the shard's batches, report progress, send the observers back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        shard = ShardObserver(model_bytes, plan, inputs=inputs, threads=threads)
        while (item := feeds.get()) is not None:
            index, batch = item
            events.put(("batch", worker, (index, shard.observe(index, batch))))
    except BaseException as exc:  # reported to the parent, which decides
        events.put(("error", worker, _picklable(exc)))
        return
    events.put(("observed", worker, None))
    for name, observers in plan.items():
        results.put((name, observers))


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Children started here inherit an ignored SIGINT (kept across exec), so a Ctrl-C during
    their start-up cannot print a traceback; the parent's handler is restored right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _child_threads(threads: int) -> Iterator[None]:
    """Spawned children inherit the environment: cap their BLAS/OpenMP pools (unless set)."""
    added = [name for name in _THREAD_VARIABLES if name not in os.environ]
    for name in added:
        os.environ[name] = str(threads)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
