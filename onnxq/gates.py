"""Tolerance gates for users' CI: each quantized model against fp32, pass or fail per metric.

Rules, one per gate (``GATE_RULES``, data, not branches):

1. ``min_cosine``: mean per-sample cosine of the first output >= the limit.
2. ``min_sqnr``: SQNR (dB) over all float outputs >= the limit.
3. ``max_drop``: top-1 drop in points <= the limit: against ``labels`` where given, else the
   share of samples whose top-1 differs from fp32's. Classifier-shaped outputs only.
4. ``max_latency_ratio``: p50 batch-1 latency / fp32's <= the limit.

A gate whose metric was not measured (top-1 of a saliency map) fails and says why: a CI gate
must never pass by default.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, fields

from onnxq.errors import ConfigError
from onnxq.evaluate import AccuracyMetrics, ComparisonResult


@dataclass(frozen=True)
class Gates:
    """The limits to enforce; ``None`` turns a gate off."""

    min_cosine: float | None = None
    min_sqnr: float | None = None
    max_drop: float | None = None
    max_latency_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        for name in ("max_drop", "max_latency_ratio"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


@dataclass(frozen=True)
class Measured:
    """What the gates read for one quantized model."""

    fp32: AccuracyMetrics
    accuracy: AccuracyMetrics
    latency_ratio: float | None = None


@dataclass(frozen=True)
class GateRule:
    """A gate's metric, how to read it, and how it must compare with the limit."""

    gate: str
    metric: str
    value: Callable[[Measured], float | None]
    passes: Callable[[float, float], bool]
    symbol: str
    unmeasured: str = "no float output to compare"


def _drop(m: Measured) -> float | None:
    if m.accuracy.top1 is not None and m.fp32.top1 is not None:
        return 100.0 * (m.fp32.top1 - m.accuracy.top1)
    return None if m.accuracy.agreement is None else 100.0 * (1.0 - m.accuracy.agreement)


GATE_RULES = (
    GateRule("min_cosine", "cosine mean", lambda m: m.accuracy.cosine_mean, operator.ge, ">="),
    GateRule("min_sqnr", "SQNR dB", lambda m: m.accuracy.sqnr_db, operator.ge, ">="),
    GateRule(
        "max_drop", "top-1 drop (points)", _drop, operator.le, "<=",
        "the first output is not classifier-shaped [N, C]",
    ),
    GateRule(
        "max_latency_ratio", "p50 latency / fp32", lambda m: m.latency_ratio, operator.le, "<=",
        "no fp32 latency",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class GateFailure:
    """One model failing one gate."""

    model: str
    metric: str
    value: float | None
    limit: float
    rule: GateRule

    def describe(self) -> str:
        """E.g. ``int8: cosine mean 0.9312, required >= 0.99``."""
        if self.value is None:
            return f"{self.model}: {self.metric} not measured ({self.rule.unmeasured})"
        required = f"required {self.rule.symbol} {self.limit}"
        return f"{self.model}: {self.metric} {self.value:.6g}, {required}"


def gate_failures(name: str, measured: Measured, gates: Gates) -> list[GateFailure]:
    """Every gate ``measured`` fails (a NaN fails too)."""
    failures = []
    for rule in GATE_RULES:
        limit = getattr(gates, rule.gate)
        if limit is None:
            continue
        value = rule.value(measured)
        if value is None or math.isnan(value) or not rule.passes(value, limit):
            failures.append(GateFailure(name, rule.metric, value, limit, rule))
    return failures


def check_gates(result: ComparisonResult, gates: Gates) -> list[GateFailure]:
    """``gate_failures`` of every quantized row of a comparison."""
    return [
        failure
        for row in result.quantized
        for failure in gate_failures(
            row.name,
            Measured(result.fp32.accuracy, row.accuracy, result.ratios(row)["p50"]),
            gates,
        )
    ]
