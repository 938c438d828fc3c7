"""``onnxq inspect``: which nodes ONNX Runtime runs as int8 kernels, which stayed float."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.options import provider_option
from onnxq.model_io import check_output_path


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@provider_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def command(model: Path, provider: str, json_path: Path | None) -> None:
    """Count what ORT runs for MODEL after its graph optimizations (int8 / float / Q/DQ)."""
    from onnxq.inspect import format_inspect, inspect_model
    from onnxq.model_io import write_json

    if json_path is not None:
        check_output_path(json_path, model)
    report = inspect_model(model, provider)
    click.echo(format_inspect(report))
    if json_path is not None:
        write_json(report.to_dict(), json_path)
        click.echo(f"wrote {json_path}")
