"""Options several commands share, defined once."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from onnxq.config import CalibrationMethod
from onnxq.executor import ENGINES, open_executor
from onnxq.runtime import Provider
from onnxq.targets import DEFAULT_TARGET, TARGETS

CALIB_HELP = ".npz file, or a folder of .npz / .npy / test_data_set_* feeds."


PLAN_FILTERS = (
    "op_types",
    "exclude_op_types",
    "exclude_nodes",
    "quantize_outputs",
    "quantize_activation_matmuls",
    "merge_matmuls",
)


def plan_filters(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--op-types``, ``--exclude-op-types``, ``--exclude-nodes``, ``--quantize-outputs``,
    ``--quantize-activation-matmuls``, ``--no-merge-matmuls``, handed to ``command`` as one
    ``plan`` dict of ``QuantConfig`` fields."""

    @functools.wraps(command)
    def with_plan(**kwargs: Any) -> Any:
        plan = {name: kwargs.pop(name) for name in PLAN_FILTERS}
        for name in ("op_types", "exclude_op_types"):
            plan[name] = split_list(plan[name])
        return command(plan=plan, **kwargs)

    for option in reversed(
        [
            click.option(
                "--op-types", multiple=True, help="Only quantize these op types (comma-separated)."
            ),
            click.option("--exclude-op-types", multiple=True, help="Op types left in float."),
            click.option(
                "--exclude-nodes", multiple=True, help="Regex on node names left in float."
            ),
            click.option("--quantize-outputs", is_flag=True, help="Also quantize graph outputs."),
            click.option(
                "--quantize-activation-matmuls",
                is_flag=True,
                help="Static: also quantize MatMuls of two activations (attention) on their own.",
            ),
            click.option(
                "--merge-matmuls/--no-merge-matmuls",
                default=True,
                show_default=True,
                help="Merge the weight MatMuls reading one input (query/key/value) into one "
                "MatMul and a Split where weights are per channel (exact): one int8 GEMM.",
            ),
        ]
    ):
        with_plan = option(with_plan)
    return with_plan


def engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers``, ``--engine`` and ``--ray-address``, handed to ``command`` as one open
    ``executor`` (closed when the command ends; Ray is contacted only when work is sent)."""

    @functools.wraps(command)
    def with_executor(**kwargs: Any) -> Any:
        chosen = (kwargs.pop(name) for name in ("engine", "workers", "ray_address"))
        with open_executor(*chosen) as executor:
            return command(executor=executor, **kwargs)

    for option in reversed(
        [
            click.option(
                "--workers",
                type=click.IntRange(min=1),
                default=None,
                help="Workers that calibration batches (batch i goes to worker i mod N; same "
                "statistics) and per-layer variants are shared out to. Default: 1; with "
                "--engine ray, one per cluster CPU.",
            ),
            click.option(
                "--engine",
                type=click.Choice(list(ENGINES)),
                default="local",
                show_default=True,
                help="Where sharded work runs: local (this process, or --workers processes) or "
                'ray (Ray actors on this machine or a cluster; pip install "onnxq[ray]").',
            ),
            click.option(
                "--ray-address",
                default=None,
                help="With --engine ray: the cluster to join (host:port, or set RAY_ADDRESS); "
                "default: a local Ray instance sized to this machine.",
            ),
        ]
    ):
        with_executor = option(with_executor)
    return with_executor


method_option = click.option(
    "--method",
    type=click.Choice([m.value for m in CalibrationMethod]),
    default=CalibrationMethod.PERCENTILE.value,
    show_default=True,
    help="Activation range from the calibration statistics.",
)
"""``--method``: the activation range method (``QuantConfig.method``)."""


def _target_help() -> str:
    from onnxq.targets import TARGETS, target_names

    return "Deployment target (default ort-cpu): " + "; ".join(
        f"{name}: {TARGETS[name].summary}" for name in target_names()
    )


target_option = click.option(
    "--target",
    type=click.Choice(list(TARGETS)),
    default=DEFAULT_TARGET,
    show_default=True,
    help=_target_help(),
)
"""``--target``: the runtime the model is written for; it picks the integer scheme."""


provider_option = click.option(
    "--provider",
    type=click.Choice([p.value for p in Provider]),
    default=Provider.CPU.value,
    show_default=True,
    help="ONNX Runtime execution provider (cuda needs the onnxruntime-gpu build).",
)
"""``--provider``: where ONNX Runtime runs the models; no silent fall-back."""


def batching(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--batch-size`` and ``--max-samples``."""
    command = click.option("--max-samples", type=int, default=None)(command)
    return click.option("--batch-size", type=int, default=8, show_default=True)(command)


def split_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """Options given several times or comma-separated: ``-x Add,Mul -x Concat``."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())
