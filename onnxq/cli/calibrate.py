"""``onnxq calibrate``: observe a model's activations once, write a reusable ranges file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from onnxq.cli.options import (
    CALIB_HELP,
    batching,
    engine_options,
    plan_filters,
    target_option,
)
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.executor import Executor
from onnxq.model_io import check_output_path


@click.command("calibrate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Ranges file (JSON) to write; GPTQ Hessians go next to it as <stem>.hessians.npz.",
)
@click.option(
    "--calib",
    required=True,
    type=click.Path(path_type=Path),
    help=CALIB_HELP,
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in CalibrationMethod]),
    default=None,
    help="Record only what this method needs. Default: histograms and moving averages, so "
    "`onnxq quantize --ranges` can use any method and percentile.",
)
@click.option("--averaging-constant", type=float, default=0.01, show_default=True)
@engine_options
@batching
@click.option(
    "--hessians/--no-hessians",
    default=True,
    show_default=True,
    help="Also record GPTQ's input Hessians (large); without them GPTQ rounds to nearest.",
)
@plan_filters
@target_option
def command(
    model: Path,
    output: Path,
    calib: Path,
    method: str | None,
    averaging_constant: float,
    executor: Executor,
    batch_size: int,
    max_samples: int | None,
    hessians: bool,
    plan: dict[str, Any],
    target: str,
) -> None:
    """Observe MODEL's activations on --calib data and write their statistics to -o."""
    from tqdm import tqdm

    from onnxq.calibration.cache import hessians_path
    from onnxq.calibration.calibrate import ALL_METHODS
    from onnxq.pipeline import calibrate

    check_output_path(output, model, calib)
    if hessians:
        check_output_path(hessians_path(output), model, calib)
    config = QuantConfig(
        target=target,
        averaging_constant=averaging_constant,
        batch_size=batch_size,
        max_samples=max_samples,
        **plan,
    )
    methods = ALL_METHODS if method is None else (CalibrationMethod(method),)
    with tqdm(
        desc="calibrating", unit="sample", file=sys.stderr, disable=None, total=max_samples
    ) as bar:
        result = calibrate(
            model,
            calib,
            config,
            methods=methods,
            hessians=hessians,
            executor=executor,
            on_batch=lambda n: bar.update(n - bar.n),
        )
    details = {
        "config": config.to_dict(),
        "methods": [m.value for m in methods],
        "workers": executor.workers,
        "source": str(calib),
    }
    written = result.save(output, details)
    kinds = sorted({obs.kind for group in result.observers.values() for obs in group})
    lines = [
        f"observed {len(result.observers)} tensors over {result.samples} samples "
        f"({result.batches} batches, {executor.workers} worker"
        f"{'s' if executor.workers > 1 else ''}): " + ", ".join(kinds)
    ]
    if result.uncalibrated:
        lines.append(f"no finite values (will stay float): {', '.join(result.uncalibrated)}")
    for path in written:
        lines.append(f"wrote {path} ({_size(path.stat().st_size)})")
    click.echo("\n".join(lines))


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
