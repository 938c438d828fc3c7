"""``onnxq check``: a QDQ model against a deployment target's rules; exit 1 on any violation."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.options import target_option
from onnxq.model_io import check_output_path


@click.command("check")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@target_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def command(model: Path, target: str, json_path: Path | None) -> None:
    """Check MODEL (onnxq's or another tool's QDQ model) against --target's rules: every
    violation is named with its node; exit code 1 if there is any."""
    from onnxq.model_io import write_json
    from onnxq.targets.check import check_model, format_check

    if json_path is not None:
        check_output_path(json_path, model)
    report = check_model(model, target)
    click.echo(format_check(report))
    if json_path is not None:
        write_json(report.to_dict(), json_path)
    if not report.ok:
        click.get_current_context().exit(1)
