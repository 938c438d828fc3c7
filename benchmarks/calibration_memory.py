"""Calibration that scales: peak memory and time of onnxq's calibration against ONNX Runtime's.

``python -m benchmarks.calibration_memory`` measures, each run in a fresh process
(``benchmarks.calibration_probe``; peak RSS is the process's ``VmHWM``):

1. ResNet-18 at 224x224 (``models.resnet``, photo crops of ``calibration.images`` generated
   batch by batch), calibrated over 32 and over 512 samples with percentile and entropy (and
   min-max) by onnxq and by ONNX Runtime's calibrators (``create_calibrator`` with
   ``CalibrationMethod.MinMax / Percentile / Entropy``). ORT's histogram calibrators keep every
   intermediate output of every sample until the end: they run over 32 and 128 samples, and
   over 512 only when the growth seen so far projects under the limit (``--ort-limit-gb``, at
   most 60% of the machine's available memory); a watchdog kills any run that passes it.
   Both tools get the same prepared float model (BatchNorm folded) and the same batches of 8;
   ORT calibrates the op types onnxq quantizes.
2. Wall time per sample against ORT's MinMax calibrator, over 512 samples: total / samples and
   the marginal ``(t_512 - t_32) / 480`` (set-up excluded); onnxq with ``--workers 1`` and 2.
3. A transformer with uneven batches (all-MiniLM-L6-v2, batch sizes 1/5/3/8 padded to 16/64/
   40/24 tokens): onnxq's percentile and entropy, and ORT's, which stack all batches.

Writes ``benchmarks/results/calibration_memory.md`` (tables) and ``.json`` (every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onnxq.model_io import atomic_write, write_json

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
ORT_HISTOGRAM_STEPS = (128, 256)  # ORT histogram runs between FEW and MANY samples


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    available = _mem_available()
    limit = int(min(args.ort_limit_gb * 2**30, 0.6 * available if available else float("inf")))
    report: dict[str, Any] = {
        "environment": _environment(),
        "limit_bytes": limit,
        "repeat": args.repeat,
        "mem_available_bytes": available,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="onnxq-calib-bench-") as tmp:
        folder = Path(tmp)
        resnet, op_types = _resnet_model(folder)
        small, large = args.samples

        def probe(tool: str, method: str, samples: int, **extra: Any) -> dict[str, Any]:
            spec = {
                "tool": tool,
                "method": method,
                "model": str(resnet),
                "data": "resnet",
                "input": "input",
                "samples": samples,
                "batch": BATCH,
                "op_types": op_types,
                **extra,
            }
            return _record(report, _probe(spec, folder, limit))

        for _ in range(args.repeat):  # interleaved repeats: the fastest of each counts
            for method in ("percentile", "entropy", "minmax"):
                for samples in (small, large):
                    probe("onnxq", method, samples)
            probe("onnxq", "percentile", large, workers=2)
            probe("onnxq", "entropy", large, workers=2)
            for samples in (small, large):
                probe("ort", "minmax", samples)
        for method in ("percentile", "entropy"):
            runs = [probe("ort", method, small)]
            for samples in (*ORT_HISTOGRAM_STEPS, large):
                projected = _project(runs, samples)
                if projected is None or projected > limit:
                    report["runs"].append(_skipped("ort", method, samples, projected, limit))
                    break
                runs.append(probe("ort", method, samples))
        if not args.skip_transformer:
            _transformer(report, folder, limit)
    summary = _summarise(report, small, large)
    report["summary"] = summary
    write_json(report, args.out / "calibration_memory.json")
    table = _markdown(report, summary, small, large)
    atomic_write(args.out / "calibration_memory.md", table.encode())
    print(table)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs=2, default=(32, 512), metavar=("FEW", "MANY"))
    parser.add_argument("--ort-limit-gb", type=float, default=12.0)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per setting")
    parser.add_argument("--skip-transformer", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


# --- models ------------------------------------------------------------------------------------


def _resnet_model(folder: Path) -> tuple[Path, list[str]]:
    """Export ResNet-18, prepare it once (both tools calibrate the same graph)."""
    import onnx_ir as ir

    from models.resnet import resnet18_factory
    from onnxq.config import QuantConfig
    from onnxq.export import export_torch
    from onnxq.model_io import load_model, save_model
    from onnxq.passes.plan import plan_quantization
    from onnxq.passes.prepare import prepare

    module, example = resnet18_factory()
    exported = folder / "resnet18.onnx"
    export_torch(module, example, exported)
    prepared = prepare(ir.from_proto(load_model(exported)))
    plan = plan_quantization(prepared, QuantConfig())
    op_types = sorted({node.op_type for node, _ in plan.nodes})
    path = folder / "resnet18_prepared.onnx"
    save_model(prepared, path)
    return path, op_types


def _transformer(report: dict[str, Any], folder: Path, limit: int) -> None:
    """MiniLM with uneven batches; without its extras, the section records why it is missing."""
    try:
        from models.minilm import export_minilm

        path = folder / "minilm.onnx"
        export_minilm(path)
    except Exception as exc:  # torch/transformers/weights missing: say so in the report
        report["transformer_skipped"] = f"{type(exc).__name__}: {exc}"[:300]
        return
    for tool in ("onnxq", "ort"):
        for method in ("percentile", "entropy"):
            spec = {
                "tool": tool,
                "method": method,
                "model": str(path),
                "data": "minilm",
                "samples": 64,
                "batch": BATCH,
                "section": "transformer",
            }
            _record(report, _probe(spec, folder, limit))


# --- running probes ----------------------------------------------------------------------------


def _probe(spec: dict[str, Any], folder: Path, limit: int) -> dict[str, Any]:
    """Run one probe process; kill it if its resident memory passes ``limit``."""
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    load = os.getloadavg()[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.calibration_probe", str(spec_path), str(result_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak_seen = 0
    while process.poll() is None:
        rss = _rss(process.pid)
        peak_seen = max(peak_seen, rss)
        if rss > limit:
            process.kill()
            process.wait()
            return {
                "spec": spec,
                "error": f"killed by the benchmark at {rss / 2**30:.1f} GiB (limit)",
                "peak_rss_bytes": rss,
                "wall_s": time.perf_counter() - started,
            }
        time.sleep(0.2)
    stderr = process.stderr.read() if process.stderr else ""
    if process.returncode != 0 or not result_path.exists():
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        return {"spec": spec, "error": f"probe exited {process.returncode}: {tail[0]}"[:300]}
    result = json.loads(result_path.read_text())
    result["load_before"], result["load_after"] = load, os.getloadavg()[0]
    return result


def _mem_available() -> int:
    """``MemAvailable`` of the machine (0 where there is no /proc): the memory limit for a
    run is at most 60% of it, so the benchmark never starves other processes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _record(report: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    report["runs"].append(run)
    spec = run["spec"]
    peak = run.get("peak_rss_bytes")
    print(
        f"{spec['tool']:5s} {spec['method']:10s} {spec['samples']:4d} samples "
        f"workers={spec.get('workers', 1)}: "
        + (f"{run['wall_s']:.1f} s, peak {peak / 2**20:.0f} MiB" if peak else "")
        + (f" ERROR {run['error']}" if run.get("error") else ""),
        file=sys.stderr,
        flush=True,
    )
    return run


def _project(runs: list[dict[str, Any]], samples: int) -> int | None:
    """Peak RSS at ``samples`` on the line through the last two runs (one run: scaled in
    proportion, a pessimistic guess); ``None`` when a run failed."""
    if any(run.get("error") for run in runs):
        return None
    last = runs[-1]
    if len(runs) == 1:
        return int(last["peak_rss_bytes"] * samples / last["spec"]["samples"])
    return int(
        last["peak_rss_bytes"] + _slope(runs[-2], last) * (samples - last["spec"]["samples"])
    )


def _slope(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Peak RSS growth per sample between two runs."""
    return (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (
        b["spec"]["samples"] - a["spec"]["samples"]
    )


def _skipped(tool: str, method: str, samples: int, projected: int | None, limit: int) -> dict:
    why = (
        "a smaller run failed"
        if projected is None
        else (f"projected peak {projected / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB")
    )
    return {
        "spec": {"tool": tool, "method": method, "samples": samples, "data": "resnet"},
        "skipped": why,
        "projected_peak_rss_bytes": projected,
    }


# --- summary -----------------------------------------------------------------------------------


def _find(report: dict, tool: str, method: str, samples: int, workers: int = 1, data="resnet"):
    """The fastest run of a setting (repeats differ by the machine's other load)."""
    found = [
        run
        for run in report["runs"]
        if (run["spec"]["tool"], run["spec"]["method"], run["spec"]["samples"])
        == (
            tool,
            method,
            samples,
        )
        and run["spec"].get("data") == data
        and run["spec"].get("workers", 1) == workers
    ]
    return min(found, key=lambda run: run.get("wall_s", float("inf")), default=None)


def _summarise(report: dict[str, Any], small: int, large: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"memory": {}, "time": {}}
    for tool in ("onnxq", "ort"):
        for method in ("minmax", "percentile", "entropy"):
            summary["memory"][f"{tool}/{method}"] = _memory_row(report, tool, method, small, large)
    reference = _timing(
        _find(report, "ort", "minmax", small), _find(report, "ort", "minmax", large)
    )
    summary["time"]["ort/minmax"] = reference
    for method in ("minmax", "percentile", "entropy"):
        for workers in (1, 2):
            few = _find(report, "onnxq", method, small)
            many = _find(report, "onnxq", method, large, workers)
            if many is None:
                continue
            timing = _timing(few, many)
            if reference.get("per_sample_s") and timing.get("per_sample_s"):
                timing["x_ort_minmax"] = timing["per_sample_s"] / reference["per_sample_s"]
            if workers > 1:  # set-up differs (worker start-up): no marginal figure
                timing.pop("marginal_s", None)
            elif reference.get("marginal_s") and timing.get("marginal_s"):
                timing["marginal_x_ort_minmax"] = timing["marginal_s"] / reference["marginal_s"]
            timing["children_peak_rss_bytes"] = many.get("children_peak_rss_bytes")
            timing["peak_rss_bytes"] = many.get("peak_rss_bytes")
            summary["time"][f"onnxq/{method}/workers={workers}"] = timing
    for method in ("percentile", "entropy"):
        measured = sorted(summary["memory"][f"ort/{method}"]["observed"])
        if len(measured) >= 2:
            timing = _timing(
                _find(report, "ort", method, measured[0]),
                _find(report, "ort", method, measured[-1]),
            )
            if reference.get("per_sample_s") and timing.get("per_sample_s"):
                timing["x_ort_minmax"] = timing["per_sample_s"] / reference["per_sample_s"]
            if reference.get("marginal_s") and timing.get("marginal_s"):
                timing["marginal_x_ort_minmax"] = timing["marginal_s"] / reference["marginal_s"]
            summary["time"][f"ort/{method} ({measured[-1]} samples)"] = timing
    for method in ("percentile", "entropy"):
        one = summary["time"].get(f"onnxq/{method}/workers=1", {})
        two = summary["time"].get(f"onnxq/{method}/workers=2", {})
        if one.get("wall_s") and two.get("wall_s"):
            summary["time"][f"onnxq/{method}/speedup_2_workers"] = one["wall_s"] / two["wall_s"]
    summary["transformer"] = {
        f"{tool}/{method}": (
            "ok" if run and not run.get("error") else (run or {}).get("error", "not run")
        )
        for tool in ("onnxq", "ort")
        for method in ("percentile", "entropy")
        for run in [_find(report, tool, method, 64, data="minilm")]
    }
    return summary


def _memory_row(
    report: dict[str, Any], tool: str, method: str, small: int, large: int
) -> dict[str, Any]:
    """Peaks over FEW and MANY samples (or the projection), the runs between, the growth."""
    runs = [
        run
        for run in report["runs"]
        if run["spec"]["tool"] == tool
        and run["spec"]["method"] == method
        and run["spec"].get("data") == "resnet"
        and run["spec"].get("workers", 1) == 1
    ]
    by_samples = {n: _find(report, tool, method, n) for n in {r["spec"]["samples"] for r in runs}}
    row: dict[str, Any] = {"tensors": next((r["tensors"] for r in runs if r.get("tensors")), None)}
    few, many = by_samples.get(small), by_samples.get(large)
    if few and not few.get("error"):
        row["peak_few"] = few["peak_rss_bytes"]
    if many and many.get("skipped"):
        row["projected_many"] = many["projected_peak_rss_bytes"]
        row["skipped"] = many["skipped"]
    elif many:
        row["peak_many"] = many.get("peak_rss_bytes")
        row["many_error"] = many.get("error")
    measured = [
        r
        for r in sorted(by_samples.values(), key=lambda r: r["spec"]["samples"])
        if not r.get("error") and not r.get("skipped")
    ]
    row["observed"] = {r["spec"]["samples"]: r["peak_rss_bytes"] for r in measured}
    if len(measured) >= 2:
        row["growth_per_sample"] = _slope(measured[-2], measured[-1])
    if row.get("peak_few") and row.get("peak_many") and not row.get("many_error"):
        row["ratio"] = row["peak_many"] / row["peak_few"]
        row["within_15_percent"] = row["ratio"] <= 1.15
    return row


def _timing(few: dict | None, many: dict | None) -> dict[str, Any]:
    if many is None or many.get("error") or "wall_s" not in many:
        return {}
    samples = many["spec"]["samples"]
    out = {"wall_s": many["wall_s"], "per_sample_s": many["wall_s"] / samples}
    if few and not few.get("error"):
        out["marginal_s"] = (many["wall_s"] - few["wall_s"]) / (samples - few["spec"]["samples"])
    return out


def _markdown(report: dict[str, Any], summary: dict[str, Any], small: int, large: int) -> str:
    env = report["environment"]
    lines = [
        "# Calibration memory and time: onnxq vs ONNX Runtime calibrators",
        "",
        f"ResNet-18 224x224 (BatchNorm folded), batches of {BATCH}; {env['cpu']}, "
        f"{env['cores']} cores, onnxruntime {env['onnxruntime']}. Peak RSS (VmHWM) of a fresh "
        f"process per run; times are the fastest of {report['repeat']} interleaved runs (1-min "
        f"load average during the runs: {_load(report)}, the machine is shared).",
        "",
        f"| tool / method | tensors | peak RSS {small} samples | peak RSS {large} samples | "
        f"{large} / {small} | note |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in summary["memory"].items():
        notes = []
        if row.get("skipped"):
            projected = row.get("projected_many")
            many_text = f"~{_gib(projected)} (projected)" if projected else "not run"
            notes.append(f"{large} not run: {row['skipped']}")
        else:
            many_text = _gib(row.get("peak_many"))
            if row.get("many_error"):
                notes.append(row["many_error"])
        if row.get("growth_per_sample", 0) > 2**20:  # more than 1 MiB per sample
            observed = ", ".join(f"{_gib(v)} at {n}" for n, v in sorted(row["observed"].items()))
            notes.append(f"observed {observed}: +{row['growth_per_sample'] / 2**20:.1f} MiB/sample")
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
        lines.append(
            f"| {key} | {row.get('tensors') or '-'} | {_gib(row.get('peak_few'))} | {many_text} | "
            f"{ratio} | {'; '.join(notes)} |"
        )
    lines += [
        "",
        f"Wall time over {large} samples (data generation, set-up, collection, ranges; ORT's "
        "histogram calibrators over the most samples they ran). Marginal: "
        f"(t_{large} - t_{small}) / {large - small}, set-up excluded.",
        "",
        "| run | wall s | ms / sample | marginal ms / sample | x ORT MinMax (total, marginal) |",
        "|---|---|---|---|---|",
    ]
    for key, timing in summary["time"].items():
        if not isinstance(timing, dict) or not timing:
            continue
        ratio = "1 (reference)" if key == "ort/minmax" else "-"
        if "x_ort_minmax" in timing:
            marginal_x = timing.get("marginal_x_ort_minmax")
            ratio = f"{timing['x_ort_minmax']:.2f}, " + (f"{marginal_x:.2f}" if marginal_x else "-")
        marginal = f"{1e3 * timing['marginal_s']:.1f}" if "marginal_s" in timing else "-"
        lines.append(
            f"| {key} | {timing['wall_s']:.1f} | {1e3 * timing['per_sample_s']:.1f} | "
            f"{marginal} | {ratio} |"
        )
    for method in ("percentile", "entropy"):
        speedup = summary["time"].get(f"onnxq/{method}/speedup_2_workers")
        if speedup:
            two = summary["time"][f"onnxq/{method}/workers=2"]
            lines.append(
                f"\n`--workers 2` vs `--workers 1`, {method}: {speedup:.2f}x faster (peak RSS: "
                f"parent {_gib(two['peak_rss_bytes'])}, each worker at most "
                f"{_gib(two['children_peak_rss_bytes'])})."
            )
    lines += ["", "Transformer (all-MiniLM-L6-v2), 64 sentences in uneven batches:", ""]
    if "transformer_skipped" in report:
        lines.append(f"skipped: {report['transformer_skipped']}")
    else:
        lines += ["| tool / method | result |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in summary["transformer"].items()]
    return "\n".join(lines) + "\n"


def _load(report: dict[str, Any]) -> str:
    loads = [run["load_before"] for run in report["runs"] if "load_before" in run]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "unknown"


def _gib(value: int | None) -> str:
    return "-" if not value else f"{value / 2**30:.2f} GiB"


def _environment() -> dict[str, Any]:
    import onnxruntime

    from onnxq.calibration.parallel import available_cores
    from onnxq.runtime import cpu_model_name

    return {
        "cpu": cpu_model_name(),
        "cores": available_cores(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
