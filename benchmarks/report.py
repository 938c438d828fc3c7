"""``results.md`` (one table per model) and ``results.json`` from a benchmark run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.measure import ModelResult
from onnxq.model_io import atomic_write, write_json

METRIC_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "top1": (("top-1", "top1", "pct"), ("agree", "agreement", "pct")),
    "sqnr": (("SQNR dB", "sqnr_db", "db"), ("agree", "agreement", "pct")),
    "cosine": (("cos mean", "cosine_mean", "cos"), ("cos min", "cosine_min", "cos")),
}
LEGEND = (
    "p50: batch-1 median latency. x fp32 / x ORT-best: p50 over the fp32 ONNX Runtime row / over "
    "'ORT quantize_static (best CPU settings)' (< 1 is faster). size x fp32: the ONNX file over "
    "the fp32 ONNX file (PyTorch rows: serialised state_dict over the fp32 state_dict). "
    "quantize s: wall time of the quantize call including calibration and writing the result; "
    "quantize peak MB: peak resident memory growth of that call over the process's memory just "
    "before it (imports and loaded data excluded), each variant in its own process. "
    "ONNX rows are measured together by onnxq.evaluate.compare; rows for a deployment target "
    "by compare(target=...) in that target's runtime where it runs here (.ort file, OpenVINO "
    "CPU plugin at f32), else in ONNX Runtime CPU (the notes say which), each with the fp32 "
    "model measured alongside; PyTorch rows are timed in "
    "PyTorch with torch.set_num_threads equal to ORT's intra-op threads and scored against the "
    "ONNX Runtime fp32 outputs."
)


def write_results(
    folder: Path, results: list[ModelResult], environment: dict[str, Any], run: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"run": run, "environment": environment, "models": [r.to_dict() for r in results]}
    json_path = write_json(data, folder / "results.json")
    md_path = atomic_write(folder / "results.md", markdown(results, environment, run).encode())
    return json_path, md_path


def markdown(results: list[ModelResult], environment: dict[str, Any], run: dict[str, Any]) -> str:
    """The whole report: environment, then one table per model."""
    cpu = environment.get("cpu_features", {})
    flags = ", ".join(k for k in ("avx2", "avx512", "vnni") if cpu.get(k)) or "none"
    mask = environment.get("cpu_mask")
    if mask:
        flags += f" as seen through CPUID masked to {mask}; instruction timings are this CPU's"
    lines = [
        "# onnxq benchmark",
        "",
        f"Command: `{run['command']}` ({'quick smoke run' if run['quick'] else 'full run'}, "
        f"{run['seconds']:.0f} s).",
        "",
        f"Environment: onnxruntime {environment.get('onnxruntime')}, torch "
        f"{environment.get('torch')}, onnxq {environment.get('onnxq')}, Python "
        f"{environment.get('python')}; CPU {environment.get('cpu_model')} ({flags}; u8s8 "
        f"saturation risk: {str(cpu.get('u8s8_saturates')).lower()}), "
        f"{environment.get('cpus_usable')} usable cores, "
        f"{environment.get('intra_op_threads')} intra-op threads; load average "
        f"{_load(run.get('load_average_before'))} before, "
        f"{_load(run.get('load_average_after'))} after (other work on the host skews latency).",
        "",
        LEGEND,
    ]
    for result in results:
        lines += ["", f"## {result.name}: {result.description}", "", *table(result)]
        lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def table(result: ModelResult) -> list[str]:
    """One markdown table: a row per variant."""
    metrics = METRIC_COLUMNS[result.metric]
    head = [
        "variant",
        *(title for title, _, _ in metrics),
        "p50 ms",
        "x fp32",
        "x ORT-best",
        "size x fp32",
        "quantize s",
        "quantize peak MB",
        "notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        if row.status != "ok":
            cells = [row.label, *["—"] * (len(head) - 2), f"{row.status}: {row.reason}"]
        else:
            cells = [
                row.label,
                *(_fmt(row.metrics.get(key), kind) for _, key, kind in metrics),
                _fmt(row.p50_ms, "ms"),
                _fmt(row.x_fp32, "x"),
                _fmt(row.x_ort_best, "x"),
                _fmt(row.size_x_fp32, "x"),
                _fmt(row.quantize_s, "s"),
                _fmt(row.growth_mb, "mb"),
                "; ".join(row.notes),
            ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return {
        "pct": f"{100 * value:.2f}%",
        "db": f"{value:.1f}",
        "cos": f"{value:.4f}",
        "ms": f"{value:.3f}",
        "x": f"{value:.2f}",
        "s": f"{value:.1f}",
        "mb": f"{value:.0f}",
    }[kind]


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "unknown"
