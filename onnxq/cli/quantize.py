"""``onnxq quantize``: static int8 QDQ quantization with a short summary."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click

from onnxq.config import CalibrationMethod, QuantConfig, QuantType
from onnxq.model_io import check_output_path, save_model


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    """Options given several times or comma-separated: ``-x Add,Mul -x Concat``."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--calib",
    required=True,
    type=click.Path(path_type=Path),
    help=".npz file, or a folder of .npz / .npy / test_data_set_* feeds.",
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in CalibrationMethod]),
    default="minmax",
    show_default=True,
)
@click.option("--percentile", type=float, default=99.999, show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True)
@click.option(
    "--activation-type",
    type=click.Choice([t.value for t in QuantType]),
    default="uint8",
    show_default=True,
)
@click.option(
    "--weight-type",
    type=click.Choice([t.value for t in QuantType]),
    default="int8",
    show_default=True,
)
@click.option(
    "--reduce-range/--no-reduce-range",
    default=None,
    help="7-bit weights. Default: on where u8s8 kernels can saturate (x86 without VNNI).",
)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-samples", type=int, default=None)
@click.option("--op-types", multiple=True, help="Only quantize these op types (comma-separated).")
@click.option("--exclude-op-types", multiple=True, help="Op types left in float.")
@click.option("--exclude-nodes", multiple=True, help="Regex on node names left in float.")
@click.option("--quantize-outputs", is_flag=True, help="Also quantize graph outputs.")
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the run's report as JSON.",
)
def command(
    model: Path,
    output: Path,
    calib: Path,
    method: str,
    percentile: float,
    per_channel: bool,
    activation_type: str,
    weight_type: str,
    reduce_range: bool | None,
    batch_size: int,
    max_samples: int | None,
    op_types: tuple[str, ...],
    exclude_op_types: tuple[str, ...],
    exclude_nodes: tuple[str, ...],
    quantize_outputs: bool,
    summary_json: Path | None,
) -> None:
    """Static int8 QDQ quantization of MODEL calibrated on --calib data."""
    from tqdm import tqdm

    from onnxq.pipeline import quantize_with_report

    check_output_path(output, model)
    if summary_json is not None:
        check_output_path(summary_json, model, output)
    config = QuantConfig(
        method=method,
        percentile=percentile,
        per_channel=per_channel,
        activation_type=activation_type,
        weight_type=weight_type,
        reduce_range=reduce_range,
        op_types=_split(op_types),
        exclude_op_types=_split(exclude_op_types),
        exclude_nodes=exclude_nodes,
        batch_size=batch_size,
        max_samples=max_samples,
        quantize_outputs=quantize_outputs,
    )
    with tqdm(
        desc="calibrating", unit="sample", file=sys.stderr, disable=None, total=max_samples
    ) as bar:
        result = quantize_with_report(
            model, calib, config, on_batch=lambda n: bar.update(n - bar.n)
        )
    save_model(result.model, output)
    report = result.report
    click.echo(_summary(report.to_dict(), output))
    if summary_json is not None:
        summary_json.write_text(json.dumps(report.to_dict(), indent=2, default=str))


def _summary(report: dict, output: Path) -> str:
    """A few lines: what was quantized, what stayed float and why, size before and after."""
    quantized = [d for d in report["decisions"] if d["quantized"]]
    kernels = Counter(d["op_type"] for d in quantized)
    floats = Counter((d["op_type"], d["reason"]) for d in report["decisions"] if not d["quantized"])
    lines = [
        f"quantized {len(quantized)} nodes: "
        + ", ".join(f"{op} x{n}" for op, n in kernels.most_common())
    ]
    if floats:
        lines.append(f"left float {sum(floats.values())} nodes:")
        lines += [f"  {op} x{n}: {reason}" for (op, reason), n in floats.most_common()]
    before, after = report["size_before"], report["size_after"]
    lines.append(f"size: {_mb(before)} -> {_mb(after)} ({100 * after / before:.1f}%)")
    config = report["config"]
    reduce = "on" if report["reduce_range"] else "off"
    lines.append(
        f"calibration: {report['samples']} samples, {config['method']}; "
        f"reduce_range {reduce} ({report['reduce_range_reason']})"
    )
    if report["uncalibrated"]:
        skipped = ", ".join(report["uncalibrated"])
        lines.append(f"no finite calibration values, left float: {skipped}")
    lines.append(f"wrote {output}")
    return "\n".join(lines)


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
