"""Deployment targets: the runtime (and CPU class) a quantized model is written for.

``get_target(name)`` looks one up; ``resolve_scheme(config)`` fills the scheme fields a
``QuantConfig`` leaves unset from its target. See ``spec`` for what a target holds and
``catalog`` for the targets and the measurements behind them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxq.config import QuantMode, QuantType
from onnxq.errors import ConfigError
from onnxq.targets.catalog import DEFAULT_TARGET, TARGETS
from onnxq.targets.spec import BiasForm, Target

SMOOTH_ALPHA = {8: {7: 0.6, 8: 0.7}, 16: {7: 0.1, 8: 0.1}}
"""SmoothQuant strength by activation bits, then weight bits: the coarser side takes less of the
range. all-MiniLM-L6-v2, mean cosine to fp32 on held-out sentences:
dynamic (8-bit activations), no data, 200 sentences, alpha 0.6 / 0.65 / 0.7: 7-bit weights
0.9953 / 0.9948 / 0.9942; 8-bit 0.9958 at 0.7. Static ``qnn`` (16-bit activations, per-tensor
8-bit MatMul weights, nearest rounding, 32 calibration sentences), alpha 0.1 / 0.2 / 0.3 / 0.5 /
0.7: 0.9987 / 0.9984 / 0.9974 / 0.9876 / 0.893 (0.9730 unsmoothed)."""

if TYPE_CHECKING:
    from onnxq.config import QuantConfig

__all__ = [
    "DEFAULT_TARGET",
    "TARGETS",
    "BiasForm",
    "Target",
    "check_activation_type",
    "check_mode",
    "get_target",
    "resolve_scheme",
    "target_names",
]


def target_names() -> list[str]:
    """Every known target name, the default first."""
    return [DEFAULT_TARGET, *sorted(set(TARGETS) - {DEFAULT_TARGET})]


def get_target(name: str | Target) -> Target:
    """The target called ``name``; an unknown name is a ``ConfigError`` listing the known ones."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown target {name!r}; known targets: {', '.join(target_names())}"
        ) from None


def resolve_scheme(config: QuantConfig) -> QuantConfig:
    """``config`` with every unset scheme field taken from its target.

    A field the target fixes (its runtime accepts nothing else) may be set only to the target's
    own value; anything else is a ``ConfigError`` naming the field and the target.
    """
    target = get_target(config.target)
    changes = {}
    for name, value in target.scheme().items():
        current = getattr(config, name)
        if current is None:
            changes[name] = value
        elif name in target.fixed and current != value:
            shown = getattr(value, "value", value)
            raise ConfigError(
                f"target {target.name} needs {name}={shown} ({target.summary}); "
                f"got {getattr(current, 'value', current)}"
            )
    if config.smooth_alpha is None:
        reduced = changes.get("reduce_range", config.reduce_range)
        activations = changes.get("activation_type", config.activation_type)
        changes["smooth_alpha"] = SMOOTH_ALPHA[activations.bits][7 if reduced else 8]
    return config.replace(**changes) if changes else config


def check_mode(target: Target, mode: QuantMode) -> None:
    """A mode the target's runtime cannot run is a ``ConfigError`` naming the ones it can."""
    if mode not in target.modes:
        modes = ", ".join(sorted(m.value for m in target.modes))
        raise ConfigError(f"target {target.name} supports --mode {modes}, not {mode.value}")


FIXED_ACTIVATIONS: dict[QuantMode, tuple[QuantType | None, str]] = {
    QuantMode.DYNAMIC: (
        QuantType.UINT8,
        "quantizes activations to uint8 at run time (DynamicQuantizeLinear)",
    ),
    QuantMode.WEIGHT_ONLY: (None, "keeps activations float"),
}
"""Modes whose activation type is fixed whatever the target's (``None``: float), and how."""


def check_activation_type(config: QuantConfig, mode: QuantMode) -> QuantType | None:
    """The activation type ``mode`` fixes (``None``: the target's, or float); a different one
    set in ``config`` is a ``ConfigError``."""
    fixed, rule = FIXED_ACTIVATIONS.get(mode, (None, ""))
    if rule and config.activation_type not in (None, fixed):
        raise ConfigError(
            f"--mode {mode.value} {rule}: --activation-type {config.activation_type.value} "
            "does not apply"
        )
    return fixed
