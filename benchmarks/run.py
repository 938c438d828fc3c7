"""One command, every zoo model, every quantizer: ``python -m benchmarks.run``.

Options: ``--models digits,resnet,lstm,minilm`` (default all), ``--out benchmarks/results``,
``--quick`` (few samples and runs: a smoke run), ``--variants`` (a comma list of slugs from
``benchmarks.variants.VARIANTS``; default all), ``--threads`` (ORT intra-op threads and torch
threads; default the usable cores), ``--keep-models DIR`` (keep the exported and quantized
models there instead of a temporary folder), ``--cpu PROFILE`` (run everything with CPUID
masked to a profile of ``benchmarks.cpu_mask.PROFILES``, e.g. ``avx2``: ONNX Runtime's kernels
for a CPU without VNNI, natively on this one).

Writes ``results.md`` and ``results.json`` into ``--out``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cpu_mask import PROFILES, MaskUnavailable, active_mask, active_profile, masked_env
from benchmarks.measure import ModelResult, measure_model
from benchmarks.report import write_results
from benchmarks.variants import VARIANTS
from benchmarks.zoo import FULL, MODELS, QUICK, prepare
from onnxq.runtime import Provider, environment

DEFAULT_OUT = Path("benchmarks/results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", default=",".join(v.slug for v in VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep-models", type=Path, default=None)
    parser.add_argument("--cpu", choices=sorted(PROFILES), default=None)
    args = parser.parse_args(argv)
    args.models = _choices(parser, "--models", args.models, MODELS)
    args.variants = _choices(parser, "--variants", args.variants, [v.slug for v in VARIANTS])
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def run(args: argparse.Namespace) -> list[ModelResult]:
    """Benchmark every requested model; write the results; return them."""
    start = time.perf_counter()
    load_before = _load_average()
    threads = args.threads or _usable_cores()
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as tmp:
        work = args.keep_models or Path(tmp)
        sizes = QUICK if args.quick else FULL
        for name in args.models:
            _log(f"[{name}] building, exporting and writing data")
            model = prepare(name, work / name, sizes[name])
            _log(f"[{name}] quantizing ({len(args.variants)} variants) and measuring")
            results.append(measure_model(model, threads=threads, variants=args.variants))
    env = environment(Provider.CPU, intra_op_threads=threads)
    env.update(_versions())
    env["cpu_mask"] = active_mask()
    run_info = {
        "command": _command(args),
        "quick": bool(args.quick),
        "models": args.models,
        "variants": args.variants,
        "seconds": time.perf_counter() - start,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    json_path, md_path = write_results(args.out, results, env, run_info)
    _log(f"wrote {md_path} and {json_path} in {run_info['seconds']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.run``; with ``--cpu``, first re-executes itself
    with CPUID masked (every subprocess inherits the mask)."""
    args = parse_args(argv)
    if args.cpu and active_profile() != args.cpu:
        try:
            env = masked_env(args.cpu)
        except MaskUnavailable as error:
            raise SystemExit(f"--cpu {args.cpu}: {error}") from None
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *argv], env)
    run(args)
    return 0


def _choices(
    parser: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...] | list[str]
) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        parser.error(f"{flag}: choose from {', '.join(allowed)} (got {value!r})")
    return chosen


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the host skews latencies."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str]:
    import onnx
    import torch

    import onnxq

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxq": onnxq.__version__}


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m benchmarks.run", f"--models {','.join(args.models)}", f"--out {args.out}"]
    if len(args.variants) != len(VARIANTS):
        parts.append(f"--variants {','.join(args.variants)}")
    if args.quick:
        parts.append("--quick")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if args.cpu:
        parts.append(f"--cpu {args.cpu}")
    return " ".join(parts)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
