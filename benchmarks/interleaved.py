"""Interleaved batch-1 latency of models kept by ``benchmarks.run --keep-models``.

``python -m benchmarks.interleaved FOLDER fp32 onnxq-dynamic ort-dynamic [--rounds 7]
[--runs 150] [--threads 2]``: FOLDER holds ``NAME.onnx`` files and the ``eval.npz`` they were
measured on. Every round times each model ``runs`` times in turn, so drifts of a shared host
hit all of them alike; per round a model's ratio is its median over the first model's median.
Prints the median ratio and how many rounds each model beat the last one named.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

WARMUP = 20


def median_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    """Median wall time of ``runs`` calls, in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def interleave(
    folder: Path, names: list[str], rounds: int, runs: int, threads: int
) -> dict[str, np.ndarray]:
    """Per model, its median latency (ms) in each round."""
    with np.load(folder / "eval.npz") as saved:
        feed = {name: saved[name][:1] for name in saved.files}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {
        name: ort.InferenceSession(str(folder / f"{name}.onnx"), options, ["CPUExecutionProvider"])
        for name in names
    }
    for session in sessions.values():
        median_ms(session, feed, WARMUP)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, session in sessions.items():
            medians[name].append(median_ms(session, feed, runs))
    return {name: np.array(values) for name, values in medians.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.interleaved", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    medians = interleave(args.folder, args.names, args.rounds, args.runs, args.threads)
    base, last = medians[args.names[0]], medians[args.names[-1]]
    for name, values in medians.items():
        wins = int((values < last).sum())
        print(
            f"{name:24s} p50 {np.median(values):7.3f} ms   x {args.names[0]} "
            f"{np.median(values / base):.3f}   faster than {args.names[-1]} in "
            f"{wins}/{args.rounds} rounds"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
