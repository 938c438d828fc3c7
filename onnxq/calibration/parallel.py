"""Calibration over several processes: batch ``i`` goes to worker ``i % N``, the parent merges.

The parent reads the calibration source (any kind, one-shot generators and ``get_next()``
readers included: every source is read once, in order, by the parent) and sends each validated
batch to its worker over a bounded queue, so at most ``QUEUE_DEPTH`` batches per worker wait in
memory. Each worker is a fresh ``spawn`` process that runs ``collect_shard`` (its own ONNX
Runtime session, ``intra_op_num_threads = cores // N``) on its shard and sends its observers
back one tensor at a time; the parent merges them in worker order. The assignment does not
depend on timing, so the merged statistics equal a single-process run: exactly for min-max and
histogram counts (a moving average merges by definition, see ``observers``; Hessians agree to
float32 rounding, as each batch's ``x x^T`` is a float32 product whose BLAS threads differ).

Sending batches costs a pickle and a pipe copy per batch (a few ms per MB), cheap next to
running a model on it; re-opening the source in every worker would need a picklable, seekable
source and a second validation, for no gain here. A cluster engine can reuse ``collect_shard``
with the same shard rule.

Errors in a worker (a batch ONNX Runtime rejects) come back as the same ``OnnxqError``; a worker
that dies (killed, out of memory) is a ``CalibrationDataError``. On any exception in the parent,
``KeyboardInterrupt`` included, every worker is terminated before the exception propagates.
Workers ignore SIGINT: Ctrl-C is the parent's to handle.
"""

from __future__ import annotations

import contextlib
import itertools
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

from onnxq.calibration.collect import Feed, Observer, collect_shard, observe
from onnxq.errors import CalibrationDataError, ConfigError

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


def collect_observers(
    model: onnx.ModelProto | bytes,
    observers: Mapping[str, Sequence[Observer]],
    feeds: Iterable[Feed],
    *,
    workers: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Fill ``observers`` (fresh) from ``feeds``: in this process, or over ``workers`` processes.

    ``on_batch(index)`` is called in this process once batch ``index`` has been observed.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        counter = itertools.count()

        def done(_: Feed) -> None:
            index = next(counter)
            if on_batch is not None:
                on_batch(index)

        observe(model, observers, feeds, on_batch=done)
        return
    observe_parallel(model, observers, feeds, workers=workers, on_batch=on_batch)


def observe_parallel(
    model: onnx.ModelProto | bytes,
    observers: Mapping[str, Sequence[Observer]],
    feeds: Iterable[Feed],
    *,
    workers: int,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """``collect_observers`` over ``workers`` spawned processes (see the module docstring)."""
    if any(getattr(obs, "count", 0) for group in observers.values() for obs in group):
        raise ValueError("observe_parallel fills fresh observers; these have seen data")
    model_bytes = model if isinstance(model, bytes) else model.SerializeToString()
    plan = {name: list(group) for name, group in observers.items()}
    with _Workers(model_bytes, plan, workers, on_batch) as pool:
        for index, feed in enumerate(feeds):
            pool.send(index % workers, feed)
        pool.finish()
        for worker in range(workers):
            for name, group in observers.items():
                theirs = pool.result(worker, name)
                for own, other in zip(group, theirs, strict=True):
                    own.merge(other)
        pool.join()


class _Workers:
    """The processes and queues of one parallel collection; terminates everything on error."""

    def __init__(
        self,
        model_bytes: bytes,
        plan: dict[str, list[Observer]],
        workers: int,
        on_batch: Callable[[int], None] | None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.on_batch = on_batch
        self.events = _Queue(context)
        self.feeds = [_Queue(context, QUEUE_DEPTH) for _ in range(workers)]
        self.results = [_Queue(context) for _ in range(workers)]
        threads = worker_threads(workers)
        self.processes = [
            context.Process(
                target=_work,
                args=(model_bytes, plan, self.feeds[k], self.results[k], self.events, (k, workers)),
                kwargs={"threads": threads},
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

    def send(self, worker: int, feed: Feed | None) -> None:
        """Queue a batch (``None``: no more) for ``worker``, reporting progress while waiting."""
        while True:
            try:
                self.feeds[worker].put(feed, timeout=_POLL_S)
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

    def result(self, worker: int, name: str) -> list[Observer]:
        """The next tensor's observers from ``worker`` (sent in plan order)."""
        while True:
            try:
                got, observers = self.results[worker].get(timeout=_POLL_S)
                break
            except queue.Empty:
                self._check_alive(worker, results_pending=True)
        if got != name:
            raise RuntimeError(f"worker {worker} sent {got!r}, expected {name!r}")
        return observers

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
                self.on_batch(payload)
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
    feeds: _Queue,
    results: _Queue,
    events: _Queue,
    shard: tuple[int, int],
    *,
    threads: int,
) -> None:
    """A worker: observe the shard's batches, report progress, send the observers back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker, step = shard
    seen = 0

    def batches() -> Iterator[Feed]:
        while (feed := feeds.get()) is not None:
            yield feed

    def done(_: Feed) -> None:
        nonlocal seen
        events.put(("batch", worker, worker + seen * step))
        seen += 1

    try:
        filled = collect_shard(
            model_bytes, plan, batches(), shard=shard, threads=threads, on_batch=done
        )
    except BaseException as exc:  # reported to the parent, which decides
        events.put(("error", worker, _picklable(exc)))
        return
    events.put(("observed", worker, None))
    for name, observers in filled.items():
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
