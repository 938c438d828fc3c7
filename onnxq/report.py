"""Human-readable views of a ``ComparisonResult``: a fixed-width table and a PNG plot."""

from __future__ import annotations

import io
import math
from pathlib import Path

from onnxq.evaluate import ComparisonResult, PathLike
from onnxq.model_io import atomic_write


def format_table(result: ComparisonResult) -> str:
    """A fixed-width table, one row per model; ratios are ``model / fp32``."""
    env = result.environment
    feats = env.get("cpu_features", {})
    isa = ", ".join(
        f"{'' if feats.get(key) else 'no '}{label}"
        for key, label in (("avx2", "AVX2"), ("avx512", "AVX-512"), ("vnni", "VNNI"))
    )
    device = ""
    if env.get("provider") == "cuda":
        device = env.get("gpu") or "GPU name unknown"
    settings = result.settings
    lines = [
        (env.get("runtime") or f"onnxruntime {env.get('onnxruntime')} on {env.get('ort_provider')}")
        + (f" ({device})" if device else "")
        + f" | CPU: {env.get('cpu_model')} ({isa}) | threads: {env.get('intra_op_threads')}",
        f"accuracy on {settings['samples']} samples | latency: batch {settings['latency_batch']}, "
        f"{settings['latency_runs']} runs after {settings['warmup']} warm-up | throughput: batch "
        f"{settings['throughput_batch']}, {settings['throughput_runs']} runs",
        "",
    ]
    header = (
        "model", "size", "p50 ms", "p90 ms", "samples/s", "peak MB",
        "top-1", "agree", "SQNR dB", "cos mean/min",
    )  # fmt: skip
    body = []
    for row in result.rows:
        ratio = result.ratios(row)
        acc = row.accuracy
        ref = "ref" if row.reference else "-"
        body.append(
            (
                row.name,
                f"{_size(row.size_bytes)} {_x(ratio['size'])}",
                f"{_num(row.latency.p50_ms)} {_x(ratio['p50'])}",
                f"{_num(row.latency.p90_ms)} {_x(ratio['p90'])}",
                f"{_num(row.throughput)} {_x(ratio['throughput'])}",
                "-" if row.peak_memory_bytes is None else f"{row.peak_memory_bytes / 1e6:.1f}",
                "-" if acc.top1 is None else f"{100 * acc.top1:.2f}%",
                ref if acc.agreement is None else f"{100 * acc.agreement:.2f}%",
                ref if acc.sqnr_db is None else _db(acc.sqnr_db),
                ref if acc.cosine_mean is None else f"{acc.cosine_mean:.4f}/{acc.cosine_min:.4f}",
            )
        )
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    for cells in (header, *body):
        left = cells[0].ljust(widths[0])
        lines.append(
            "  ".join([left, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])
        )
    lines.insert(len(lines) - len(body), "  ".join("-" * w for w in widths))
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def plot(result: ComparisonResult, path: PathLike) -> Path:
    """Three panels (p50 latency / fp32, size / fp32, accuracy) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = list(result.quantized)
    names = [r.name for r in rows]
    ratios = [result.ratios(r) for r in rows]
    fig = Figure(figsize=(max(9.0, 3.0 + 1.8 * len(rows)), 3.6), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.2])
    for ax, key, title in (
        (axes[0], "p50", "p50 latency vs fp32 (lower is faster)"),
        (axes[1], "size", "file size vs fp32"),
    ):
        values = [r[key] or 0.0 for r in ratios]
        bars = ax.bar(names, values, color=[_ratio_colour(v) for v in values])
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="fp32 = 1")
        ax.legend(loc="upper right", fontsize=7, frameon=False)
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max([1.2, *(v * 1.2 for v in values)]))
    ax = axes[2]
    labelled = result.fp32.accuracy.top1 is not None
    if labelled:
        values = [100 * (r.accuracy.top1 or 0.0) for r in (result.fp32, *rows)]
        bar_names = [result.fp32.name, *names]
        title = "top-1 accuracy % vs labels"
    else:
        values = [100 * (r.accuracy.agreement or 0.0) for r in rows]
        bar_names = names
        title = "top-1 agreement with fp32 %"
    sqnr = ["reference"] if labelled else []
    sqnr += [
        "SQNR -" if r.accuracy.sqnr_db is None else f"SQNR {_db(r.accuracy.sqnr_db)} dB"
        for r in rows
    ]
    bars = ax.bar(bar_names, values, color=["#888"] * labelled + ["#37a"] * len(rows))
    ax.bar_label(
        bars, labels=[f"{v:.1f}%\n{s}" for v, s in zip(values, sqnr, strict=True)], fontsize=8
    )
    ax.set_ylim(0, 118)
    ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
    env = result.environment
    fig.suptitle(
        f"{env.get('ort_provider')}, onnxruntime {env.get('onnxruntime')}, {env.get('cpu_model')}",
        fontsize=9,
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    out = Path(path)
    atomic_write(out, buffer.getvalue())
    return out


def _ratio_colour(ratio: float) -> str:
    """Green below fp32, red above, grey within 2%."""
    return "#2a7" if ratio < 0.98 else ("#c44" if ratio > 1.02 else "#999")


def _size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _num(value: float) -> str:
    """Three significant digits, no exponent for everyday magnitudes."""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.2e}"


def _x(ratio: float | None) -> str:
    return "(-)" if ratio is None else f"({ratio:.2f}x)"


def _db(value: float) -> str:
    return "inf" if value == math.inf else ("-inf" if value == -math.inf else f"{value:.2f}")
