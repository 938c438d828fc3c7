"""``onnxq sensitivity``: rank the quantized layers by what int8 costs each."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.options import engine_options, method_option, target_option
from onnxq.config import QuantConfig
from onnxq.executor import Executor


@click.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", required=True, type=click.Path(path_type=Path), help="Calibration data.")
@click.option(
    "--eval",
    "eval_data",
    required=True,
    type=click.Path(path_type=Path),
    help="Evaluation data (same formats as --calib).",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, path_type=Path),
    help=".npy labels: the metric becomes top-1 accuracy (default: cosine to fp32).",
)
@method_option
@click.option("--max-samples", type=int, default=None)
@click.option("--top", type=int, default=20, show_default=True, help="Layers to list.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@target_option
@engine_options
def command(
    model: Path,
    calib: Path,
    eval_data: Path,
    labels: Path | None,
    method: str,
    max_samples: int | None,
    top: int,
    json_path: Path | None,
    target: str,
    executor: Executor,
) -> None:
    """Per layer: output SQNR in the int8 model, and the metric gained by keeping it float."""
    from dataclasses import asdict

    import numpy as np

    from onnxq.model_io import write_json
    from onnxq.sensitivity import analyze_sensitivity

    config = QuantConfig(target=target, method=method, max_samples=max_samples)
    metric = "top1" if labels is not None else "cosine"
    truth = np.load(labels) if labels is not None else None
    report = analyze_sensitivity(
        model, calib, eval_data, config, metric=metric, labels=truth, executor=executor
    )
    click.echo(f"{metric}: fp32 {report.fp32:.4f}, all int8 {report.int8:.4f}")
    click.echo(f"{'layer':60s} {'op':8s} {'out SQNR dB':>11s} {'gain if float':>14s}")
    for layer in report.layers[:top]:
        click.echo(
            f"{layer.name[-60:]:60s} {layer.op_type:8s} {layer.output_sqnr_db:11.1f} "
            f"{layer.gain:+14.5f}"
        )
    if json_path is not None:
        write_json(asdict(report), json_path)
        click.echo(f"wrote {json_path}")
