"""Run one quantization in a fresh process and measure it: ``python -m benchmarks.worker JOB OUT``.

``JOB`` is a ``variants.Job`` as JSON; the result JSON written to ``OUT`` holds ``status``
(``ok``, ``skipped`` or ``failed``), ``reason``, ``quantize_s`` (wall time of the quantize call
and writing its result), ``peak_mb`` (the process's peak resident set during that call) and
``growth_mb`` (that peak minus the resident set just before it: imports and data excluded).
The peak is Linux's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere
``ru_maxrss`` of the whole process (``growth_mb`` is then unknown).

PyTorch rows also evaluate here, with ``torch.set_num_threads(job.threads)`` (ORT's intra-op
thread count): outputs on the evaluation data (saved next to ``OUT``), batch-1 run times (the
first evaluation sample, after warm-up) and the serialised ``state_dict`` size.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.variants import (
    ONNX_QUANTIZERS,
    TORCH_QUANTIZERS,
    Job,
    NotApplicable,
    Quantized,
)
from benchmarks.zoo import batches, load_feeds, torch_module
from onnxq.errors import first_line
from onnxq.memory import maxrss_bytes, reset_peak, status_bytes

_MB = 1024 * 1024


def run_job(job: Job) -> dict[str, Any]:
    """Quantize (and for PyTorch rows evaluate) ``job``; never raises for a quantizer failure."""
    result: dict[str, Any] = {"status": "ok", "reason": None, "notes": []}
    calib = load_feeds(Path(job.calib))
    module = None
    torch_row = job.variant in TORCH_QUANTIZERS
    if torch_row:
        import torch

        torch.set_num_threads(job.threads)
        module = torch_module(job.model, Path(job.torch_state))
    baseline = status_bytes("VmRSS") if reset_peak() else None
    start = time.perf_counter()
    try:
        if torch_row:
            made = TORCH_QUANTIZERS[job.variant](job, calib, module)
        else:
            made = ONNX_QUANTIZERS[job.variant](job, calib)
    except NotApplicable as exc:
        return {**result, "status": "skipped", "reason": str(exc)}
    except Exception as exc:
        reason = f"{type(exc).__name__}: {first_line(exc)}"[:300]
        return {**result, "status": "failed", "reason": reason}
    result["quantize_s"] = time.perf_counter() - start
    peak = status_bytes("VmHWM") or maxrss_bytes()
    result["peak_mb"] = peak / _MB if peak is not None else None
    result["growth_mb"] = (peak - baseline) / _MB if peak and baseline is not None else None
    result["notes"] = made.notes
    if torch_row:
        result.update(_evaluate_torch(job, made))
    return result


def _evaluate_torch(job: Job, made: Quantized) -> dict[str, Any]:
    """Outputs on the evaluation data, batch-1 run times and the ``state_dict`` size."""
    import torch

    module = made.module.eval()
    feeds = load_feeds(Path(job.eval))
    outputs = []
    with torch.inference_mode():
        for feed in batches(feeds, job.eval_batch):
            out = module(*(torch.from_numpy(feed[n]) for n in job.input_names))
            outputs.append(out.numpy())
        one = tuple(torch.from_numpy(feeds[n][:1]) for n in job.input_names)
        for _ in range(job.warmup):
            module(*one)
        times = []
        for _ in range(job.latency_runs):
            start = time.perf_counter()
            module(*one)
            times.append(time.perf_counter() - start)
    path = Path(job.out).with_suffix(".outputs.npy")
    np.save(path, np.concatenate(outputs))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return {"outputs": str(path), "latency_s": times, "size_bytes": buffer.getbuffer().nbytes}


def main(argv: list[str]) -> int:
    """``JOB.json OUT.json``: run the job, write its result."""
    job = Job(**json.loads(Path(argv[0]).read_text()))
    result = run_job(job)
    Path(argv[1]).write_text(json.dumps({"job": asdict(job), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
