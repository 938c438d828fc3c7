"""``onnxq demo``: the whole pipeline on a real model and real data that ship offline.

A small CNN is trained on scikit-learn's bundled 8x8 handwritten digits, exported to ONNX,
quantized to int8 on a calibration split, and compared with fp32 on a held-out test split:
top-1 accuracy, size and CPU latency.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

MAX_DROP_POINTS = 0.5


@click.command("demo")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to keep the models (default: a new temporary folder).",
)
@click.option("--runs", type=int, default=200, show_default=True, help="Timed latency runs.")
@click.option(
    "--qat",
    is_flag=True,
    help="Instead: fp32 vs post-training int8 vs quantization-aware training on a depthwise "
    "CNN with per-tensor weights (a scheme where post-training int8 loses accuracy).",
)
def command(out_dir: Path | None, runs: int, qat: bool) -> None:
    """Train, export, quantize and evaluate a digits CNN (no downloads)."""
    try:
        import torch

        from calibration.digits import load_digits_splits
        from models.digits_cnn import train_digits_cnn
    except ImportError as exc:
        raise click.ClickException(
            f"the demo needs torch and scikit-learn ({exc.name} is missing): "
            "pip install -e '.[demo]'"
        ) from None
    from onnxq.evaluate import compare
    from onnxq.export import export_torch
    from onnxq.model_io import save_model
    from onnxq.pipeline import quantize_with_report
    from onnxq.report import format_table

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="onnxq-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if qat:
        from onnxq.cli.demo_qat import run

        run(out_dir, runs)
        return
    splits = load_digits_splits(seed=0)
    click.echo(
        f"digits: {len(splits.train_x)} train, {len(splits.calib_x)} calibration, "
        f"{len(splits.test_x)} test images (scikit-learn, offline)"
    )
    model = train_digits_cnn(splits.train_x, splits.train_y, seed=0)
    fp32 = out_dir / "digits_fp32.onnx"
    exported = export_torch(model, torch.from_numpy(splits.test_x[:1]), fp32)
    click.echo(
        f"exported {fp32} (ONNX Runtime matches PyTorch within {exported.max_abs_error:.1e})"
    )
    int8 = out_dir / "digits_int8.onnx"
    result = quantize_with_report(fp32, {"input": splits.calib_x})
    save_model(result.model, int8)
    click.echo(
        f"quantized {len(result.report.quantized)} nodes on "
        f"{result.report.samples} calibration images -> {int8}"
    )
    comparison = compare(
        fp32, [int8], {"input": splits.test_x}, labels=splits.test_y, latency_runs=runs
    )
    click.echo(format_table(comparison))
    drop = 100 * (comparison.fp32.accuracy.top1 - comparison.quantized[0].accuracy.top1)
    verdict = "within" if drop <= MAX_DROP_POINTS else "OVER"
    click.echo(f"accuracy drop {drop:.2f} points: {verdict} the {MAX_DROP_POINTS}-point budget")
