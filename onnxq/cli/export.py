"""``onnxq export``: a PyTorch module to ONNX, checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.model_io import check_output_path


@click.command("export")
@click.argument("factory")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--opset", type=int, default=None, help="Default: 17 (torchscript), 18 (dynamo).")
@click.option(
    "--exporter",
    type=click.Choice(["torchscript", "dynamo"]),
    default="torchscript",
    show_default=True,
)
@click.option("--static-batch", is_flag=True, help="Do not mark axis 0 as a dynamic batch.")
@click.option(
    "--dynamic-axis",
    "dynamic_axis",
    multiple=True,
    metavar="INPUT:AXIS:NAME",
    help="Another symbolic input axis, e.g. input:1:sequence (inputs are named input, "
    "input_1, ...); repeatable.",
)
def command(
    factory: str,
    output: Path,
    opset: int | None,
    exporter: str,
    static_batch: bool,
    dynamic_axis: tuple[str, ...],
) -> None:
    """Export FACTORY (``package.module:function`` returning ``(module, example_inputs)``)."""
    from onnxq.export import export_torch, load_factory

    check_output_path(output)
    axes: dict[str, dict[int, str]] = {}
    for spec in dynamic_axis:
        parts = spec.split(":")
        if len(parts) != 3 or not (parts[0] and parts[1].isdigit() and parts[2]):
            raise click.BadParameter(
                f"{spec!r}: expected INPUT:AXIS:NAME", param_hint="--dynamic-axis"
            )
        name, axis, dim = parts
        axes.setdefault(name, {})[int(axis)] = dim
    built = load_factory(factory)
    if not isinstance(built, tuple) or len(built) != 2:
        raise click.UsageError(f"{factory} must return (module, example_inputs)")
    module, example = built
    result = export_torch(
        module,
        example,
        output,
        opset=opset,
        exporter=exporter,
        dynamic_batch=not static_batch,
        dynamic_axes=axes,
    )
    click.echo(
        f"wrote {result.path} (ONNX Runtime matches PyTorch: max abs error "
        f"{result.max_abs_error:.2e}, tolerance rtol={result.tolerance[0]}, "
        f"atol={result.tolerance[1]})"
    )
