"""Measure every variant of one zoo model in one run.

Each quantization runs in its own ``benchmarks.worker`` process (wall time, peak memory). The
ONNX models that load in ONNX Runtime are then measured together by ``onnxq.evaluate.compare``
(one accuracy pass, batch-1 latency in interleaved blocks, same thread count); PyTorch rows are
scored here against the ONNX Runtime fp32 outputs with the same metric functions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.variants import BY_SLUG, CALIB_BATCH, ORT_PEER, VARIANTS, Job
from benchmarks.zoo import ZooModel, batches, load_feeds
from onnxq.errors import OnnxqError, first_line
from onnxq.evaluate import compare, cosine_per_sample, sqnr_db, top1
from onnxq.model_io import input_specs, json_safe, load_model
from onnxq.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 1800
NOISE_FLOOR_MS = 0.05


@dataclass
class Row:
    """One variant of one model: how it was made and what it measured."""

    slug: str
    label: str
    engine: str
    status: str = "ok"
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    quantize_s: float | None = None
    peak_mb: float | None = None
    growth_mb: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    p50_ms: float | None = None
    p90_ms: float | None = None
    throughput: float | None = None
    size_bytes: int | None = None
    x_fp32: float | None = None
    x_ort_best: float | None = None
    size_x_fp32: float | None = None
    fp32_p50_ms: float | None = None  # fp32 in this row's runtime, when not ONNX Runtime's row


@dataclass
class ModelResult:
    """All rows of one model, with the settings they were measured under."""

    name: str
    description: str
    metric: str
    rows: list[Row]
    settings: dict[str, Any]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def measure_model(model: ZooModel, *, threads: int, variants: list[str]) -> ModelResult:
    """Quantize ``model`` with each variant, then measure every row that produced a model."""
    names = [spec.name for spec in input_specs(load_model(model.fp32))]
    fp32 = Row("fp32", "fp32 (ONNX Runtime)", "onnx", notes=["reference"])
    rows = [fp32]
    for variant in VARIANTS:
        if variant.slug not in variants:
            continue
        job = Job(
            model=model.name,
            kind=model.kind,
            variant=variant.slug,
            fp32=str(model.fp32),
            calib=str(model.calib),
            eval=str(model.eval),
            out=str(model.folder / f"{variant.slug}.onnx"),
            torch_state=str(model.torch_state),
            threads=threads,
            eval_batch=model.sizes.eval_batch,
            latency_runs=model.sizes.latency_runs,
            warmup=model.sizes.warmup,
            input_names=names,
        )
        rows.append(_run_worker(job, variant.label, variant.engine))
    onnx_rows = [r for r in rows[1:] if r.engine == "onnx" and r.status == "ok"]
    for row in onnx_rows:
        _check_loads(row, model)
    groups: dict[str | None, list[Row]] = {}
    for row in (r for r in onnx_rows if r.status == "ok"):
        groups.setdefault(BY_SLUG[row.slug].target, []).append(row)
    notes = []
    for target in sorted(groups, key=lambda t: t or ""):  # the plain ORT group first
        try:
            notes += _measure_onnx(model, fp32, groups[target], threads, target)
        except OnnxqError as exc:
            for row in groups[target]:
                row.status, row.reason = "failed", f"not measured: {first_line(exc)}"
    _score_torch(model, [r for r in rows if r.engine == "torch" and r.status == "ok"], threads)
    if fp32.p50_ms is not None and fp32.p50_ms < NOISE_FLOOR_MS:
        notes.append(
            f"a batch-1 run takes {1e3 * fp32.p50_ms:.0f} us here: latency ratios of this model "
            "are mostly timer and scheduling noise (about +-30% on a shared host)"
        )
    _ratios(rows)
    settings = {
        **asdict(model.sizes),
        "threads": threads,
        "calib_batch": CALIB_BATCH,
        "inputs": names,
    }
    return ModelResult(model.name, model.description, model.metric, rows, settings, notes)


def _run_worker(job: Job, label: str, engine: str) -> Row:
    row = Row(job.variant, label, engine)
    job_path = Path(job.out).with_suffix(".job.json")
    out_path = Path(job.out).with_suffix(".result.json")
    job_path.write_text(json.dumps(asdict(job)))
    out_path.unlink(missing_ok=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", str(job_path), str(out_path)],
            cwd=Path(job.out).parent,  # ORT's quantizers leave side files in the cwd
            env=env,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        row.status, row.reason = "failed", f"quantization took over {WORKER_TIMEOUT_S} s"
        return row
    if not out_path.is_file():
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        row.status = "failed"
        row.reason = f"worker exited {done.returncode}: {lines[-1] if lines else 'no output'}"
        return row
    result = json.loads(out_path.read_text())
    row.status, row.reason, row.notes = result["status"], result["reason"], result["notes"]
    row.quantize_s = result.get("quantize_s") if BY_SLUG[job.variant].quantizes else None
    row.peak_mb = result.get("peak_mb") if BY_SLUG[job.variant].quantizes else None
    row.growth_mb = result.get("growth_mb") if BY_SLUG[job.variant].quantizes else None
    if engine == "torch" and row.status == "ok":
        times = np.asarray(result["latency_s"]) * 1e3
        row.p50_ms, row.p90_ms = float(np.percentile(times, 50)), float(np.percentile(times, 90))
        row.size_bytes = int(result["size_bytes"])
        row.metrics = {"outputs": result["outputs"]}  # scored later
    return row


def _check_loads(row: Row, model: ZooModel) -> None:
    """A model ORT cannot load or run is a failed row, not a failed benchmark."""
    path = model.folder / f"{row.slug}.onnx"
    try:
        session = make_session(path)
        session.run(None, batches(load_feeds(model.eval), 1)[0])
    except Exception as exc:
        row.status, row.reason = "failed", f"ONNX Runtime cannot run it: {first_line(exc)}"


def _measure_onnx(
    model: ZooModel, fp32: Row, rows: list[Row], threads: int, target: str | None
) -> list[str]:
    """Measure ``rows`` with the fp32 model in one ``compare`` (in ``target``'s runtime when
    given: the fp32 model is then measured again there, and the rows' ``x fp32`` is against
    that measurement; ``fp32`` itself is the ONNX Runtime group's)."""
    sizes = model.sizes
    result = compare(
        model.fp32,
        [model.folder / f"{row.slug}.onnx" for row in rows],
        model.eval,
        labels=model.labels,
        batch_size=sizes.eval_batch,
        latency_runs=sizes.latency_runs,
        warmup=sizes.warmup,
        throughput_batch=8,
        intra_op_threads=threads,
        measure_memory=False,
        target=target,
    )
    by_name = {m.name: m for m in result.rows}
    for row in rows if target is not None else ():
        row.fp32_p50_ms = result.fp32.latency.p50_ms
        row.notes.append(f"x fp32 against fp32 measured alongside ({row.fp32_p50_ms:.3f} ms)")
    for row in [fp32, *rows] if target is None else rows:
        measured = by_name[model.fp32.stem if row is fp32 else row.slug]
        acc = measured.accuracy
        row.p50_ms, row.p90_ms = measured.latency.p50_ms, measured.latency.p90_ms
        row.throughput = measured.throughput
        row.size_bytes = measured.size_bytes
        row.metrics = {
            "top1": acc.top1,
            "agreement": 1.0 if row is fp32 else acc.agreement,
            "sqnr_db": math.inf if row is fp32 else acc.sqnr_db,
            "cosine_mean": 1.0 if row is fp32 else acc.cosine_mean,
            "cosine_min": 1.0 if row is fp32 else acc.cosine_min,
        }
    return list(result.notes)


def _score_torch(model: ZooModel, rows: list[Row], threads: int) -> None:
    """PyTorch outputs against ONNX Runtime fp32 outputs: the metrics ``compare`` reports."""
    if not rows:
        return
    session = make_session(model.fp32, intra_op_threads=threads)
    feeds = batches(load_feeds(model.eval), model.sizes.eval_batch)
    reference = np.concatenate([session.run(None, feed)[0] for feed in feeds])
    labels = np.load(model.labels) if model.labels is not None else None
    for row in rows:
        out = np.load(row.metrics.pop("outputs"))
        pred = top1(out)
        row.metrics = {
            "top1": float((pred == labels).mean()) if labels is not None else None,
            "agreement": float((pred == top1(reference)).mean()),
            "sqnr_db": sqnr_db(reference, out),
            "cosine_mean": float(cosine_per_sample(reference, out).mean()),
            "cosine_min": float(cosine_per_sample(reference, out).min()),
        }


def _ratios(rows: list[Row]) -> None:
    """Latency relative to fp32 and to ORT's best static; size relative to its own fp32."""
    by_slug = {r.slug: r for r in rows if r.status == "ok"}
    fp32, peer, torch_fp32 = by_slug.get("fp32"), by_slug.get(ORT_PEER), by_slug.get("torch-fp32")
    for row in rows:
        if row.status != "ok":
            continue
        row.x_fp32 = _ratio(row.p50_ms, row.fp32_p50_ms or (fp32.p50_ms if fp32 else None))
        row.x_ort_best = _ratio(row.p50_ms, peer.p50_ms if peer else None)
        base = torch_fp32 if row.engine == "torch" else fp32
        row.size_x_fp32 = _ratio(row.size_bytes, base.size_bytes if base else None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
