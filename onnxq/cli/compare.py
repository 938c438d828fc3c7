"""``onnxq compare``: fp32 against quantized models: accuracy, latency, throughput, size, memory."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from onnxq.cli.options import provider_option
from onnxq.model_io import check_output_path
from onnxq.targets import TARGETS


@click.command("compare")
@click.argument("fp32", type=click.Path(dir_okay=False, path_type=Path))
@click.argument(
    "quantized", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="Evaluation data: .npz file, or a folder of .npz / .npy / test_data_set_* feeds.",
)
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), help=".npy or .npz.")
@provider_option
@click.option(
    "--target",
    type=click.Choice(list(TARGETS)),
    default=None,
    help="Run the models in this target's runtime where it runs here (ONNX Runtime, .ort "
    "files, OpenVINO; else ONNX Runtime CPU, said so) and check each quantized model against "
    "its rules.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-samples", type=int, default=None)
@click.option("--runs", type=int, default=100, show_default=True, help="Timed batch-1 runs.")
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--throughput-batch", type=int, default=32, show_default=True)
@click.option("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's).")
@click.option("--memory/--no-memory", default=True, show_default=True, help="Peak memory probe.")
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help="Time budget per model for the timed runs (fewer runs when it is spent).",
)
@click.option("--min-cosine", type=float, help="Gate: mean cosine to fp32 >= this (else exit 1).")
@click.option("--min-sqnr", type=float, help="Gate: SQNR to fp32 >= this many dB (else exit 1).")
@click.option(
    "--max-drop",
    type=float,
    help="Gate: top-1 drops at most this many points (against --labels, else fp32's top-1).",
)
@click.option(
    "--max-latency-ratio", type=float, help="Gate: p50 latency / fp32 <= this (else exit 1)."
)
def command(
    fp32: Path,
    quantized: tuple[Path, ...],
    data: Path,
    labels: Path | None,
    provider: str,
    target: str | None,
    json_path: Path | None,
    plot_path: Path | None,
    batch_size: int,
    max_samples: int | None,
    runs: int,
    warmup: int,
    throughput_batch: int,
    threads: int | None,
    memory: bool,
    max_seconds: float | None,
    min_cosine: float | None,
    min_sqnr: float | None,
    max_drop: float | None,
    max_latency_ratio: float | None,
) -> None:
    """Measure FP32 and each QUANTIZED model on the same --data, on one execution provider.
    Exit code 1 when a gate (--min-cosine, --min-sqnr, --max-drop, --max-latency-ratio) fails,
    with the failing rows."""
    from tqdm import tqdm

    from onnxq.evaluate import compare
    from onnxq.gates import Gates, check_gates
    from onnxq.model_io import write_json
    from onnxq.report import format_table, plot
    from onnxq.runtime import check_provider

    check_provider(provider)  # fail before any work
    gates = Gates(min_cosine, min_sqnr, max_drop, max_latency_ratio)
    models = (fp32, *quantized)
    if json_path is not None:
        check_output_path(json_path, *models, data)
    if plot_path is not None:
        check_output_path(plot_path, *models, data, *([json_path] if json_path else []))
    bars = {
        "accuracy": tqdm(desc="accuracy", unit="sample", file=sys.stderr, disable=None),
        "timing": tqdm(desc="timing", unit="run", file=sys.stderr, disable=None),
    }

    def timed(model: str, done: int, total: int) -> None:
        bar = bars["timing"]
        bar.total = total
        bar.set_postfix_str(model, refresh=False)
        bar.update(done - bar.n)

    try:
        result = compare(
            fp32,
            quantized,
            data,
            labels=labels,
            provider=provider,
            batch_size=batch_size,
            max_samples=max_samples,
            latency_runs=runs,
            warmup=warmup,
            throughput_batch=throughput_batch,
            intra_op_threads=threads,
            measure_memory=memory,
            max_seconds=max_seconds,
            target=target,
            on_batch=lambda n: bars["accuracy"].update(n - bars["accuracy"].n),
            on_run=timed,
        )
    finally:
        for bar in bars.values():
            bar.close()
    click.echo(format_table(result))
    if json_path is not None:
        write_json(result.to_dict(), json_path)
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        plot(result, plot_path)
        click.echo(f"wrote {plot_path}")
    failures = check_gates(result, gates)
    for failure in failures:
        click.echo(f"FAIL {failure.describe()}")
    if failures:
        sys.exit(1)
    if gates.active:
        click.echo(f"all gates passed for {len(result.quantized)} model(s)")
