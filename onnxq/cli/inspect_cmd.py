"""``onnxq inspect``: what the target's runtime runs as int8 on this machine, what stayed float.

The target's ``runtime`` picks the inspector: ONNX Runtime's optimized graph (int8 kernels by
op family) or OpenVINO's runtime model (each weighted layer's ``runtimePrecision``). Runtimes
that cannot run here (TensorRT, QNN) are named in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from onnxq.cli.options import provider_option, target_option
from onnxq.model_io import check_output_path
from onnxq.targets import get_target


def _onnxruntime(model: Path, provider: str) -> tuple[str, dict[str, Any]]:
    from onnxq.inspect import format_inspect, inspect_model

    report = inspect_model(model, provider)
    return format_inspect(report), report.to_dict()


def _openvino(model: Path, provider: str) -> tuple[str, dict[str, Any]]:
    from onnxq.targets.openvino import format_runtime, runtime_precisions

    report = runtime_precisions(model)
    return format_runtime(report), report.to_dict()


INSPECTORS: dict[str, Callable[[Path, str], tuple[str, dict[str, Any]]]] = {
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
}
"""Target runtime -> (text, JSON) of what it runs for a model here."""


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@target_option
@provider_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def command(model: Path, target: str, provider: str, json_path: Path | None) -> None:
    """Show what MODEL runs as int8 in the target's runtime (ONNX Runtime: after its graph
    optimizations, by op family; OpenVINO: each weighted layer's runtime precision)."""
    from onnxq.model_io import write_json

    runtime = get_target(target).runtime
    inspector = INSPECTORS.get(runtime)
    if inspector is None:
        runnable = ", ".join(INSPECTORS)
        click.echo(f"{runtime} does not run on this machine; inspect can ask {runnable}")
        return
    if json_path is not None:
        check_output_path(json_path, model)
    text, data = inspector(model, provider)
    click.echo(text)
    if json_path is not None:
        write_json(data, json_path)
        click.echo(f"wrote {json_path}")
