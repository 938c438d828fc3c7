"""Range coverage: how much of some data falls outside each activation's quantization range.

A ``QuantizeLinear`` with scale ``s``, zero point ``z`` and integer type ``[qmin, qmax]``
represents ``[(qmin - z) s, (qmax - z) s]``; a value more than half a step beyond that is
clipped. Calibration chooses the ranges and means to clip very little (``percentile`` 99.999
clips 1e-5 of the calibration values per side). Where other data clips far more, the calibration
data did not cover it (another region of the photos, other sentences, another sensor) and the
accuracy lost there is the ranges', not the scheme's: calibrate on data like it.

Any QDQ model (onnxq's or another tool's): every main-graph ``QuantizeLinear`` whose input is
computed and whose scale and zero point are constants (per tensor or per axis) is checked. A
range that starts at zero is a ReLU folded into the quantization (ONNX Runtime's quantizer
drops a Conv's Relu that way): values below zero are clamped by design and not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.calibration.collect import ShardObserver
from onnxq.calibration.observers import MinMaxObserver
from onnxq.calibration.readers import Feed
from onnxq.errors import CalibrationDataError, InvalidModelError, first_line
from onnxq.targets.check import QdqGraph

NOTE_FRACTION = 1e-3  # clipped share worth a note: 50x what percentile 99.999 clips by design


@dataclass(frozen=True)
class TensorCoverage:
    """One activation: its representable range, what the data spanned, how much was clipped."""

    tensor: str
    low: float
    high: float
    seen_min: float
    seen_max: float
    clipped: int
    count: int

    @property
    def fraction(self) -> float:
        """Share of the values seen that were clipped."""
        return self.clipped / self.count if self.count else 0.0

    def describe(self) -> str:
        return (
            f"{self.tensor}: {self.fraction:.2%} of values clipped (range "
            f"[{self.low:.4g}, {self.high:.4g}], data [{self.seen_min:.4g}, {self.seen_max:.4g}])"
        )


@dataclass(frozen=True)
class QuantRange:
    """What a ``QuantizeLinear`` represents, per tensor or per ``axis``: ``[low, high]`` in steps
    of ``scale``."""

    low: np.ndarray
    high: np.ndarray
    scale: np.ndarray
    axis: int | None

    def bounds(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """The clip thresholds (half a step beyond the range; none below a range that starts
        at zero), shaped to broadcast against a tensor of rank ``ndim``."""
        low = np.where(self.low == 0, -np.inf, self.low - self.scale / 2)
        high = self.high + self.scale / 2
        if self.axis is None:
            return low.reshape(()), high.reshape(())
        shape = [1] * ndim
        shape[self.axis % ndim] = -1
        return low.reshape(shape), high.reshape(shape)


class CoverageObserver:
    """Counts the finite values beyond a ``QuantRange``; ``seen`` keeps their min, max and
    count. Merges by sum."""

    def __init__(self, quant_range: QuantRange) -> None:
        self.range = quant_range
        self.seen = MinMaxObserver()
        self.clipped = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32)
        self.seen.update(values)
        low, high = self.range.bounds(values.ndim)
        beyond = ((values < low) | (values > high)) & np.isfinite(values)
        self.clipped += int(np.count_nonzero(beyond))

    def merge(self, other: CoverageObserver) -> None:
        self.seen.merge(other.seen)
        self.clipped += other.clipped


def activation_ranges(model: onnx.ModelProto) -> dict[str, QuantRange]:
    """Computed tensor -> the range its first ``QuantizeLinear`` represents, for every
    checkable node of the main graph."""
    graph = QdqGraph(model)
    ranges: dict[str, QuantRange] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in graph.constants:
            continue
        quant_range = _quant_range(node, graph)
        if quant_range is not None:
            ranges.setdefault(node.input[0], quant_range)
    return ranges


def _quant_range(node: onnx.NodeProto, graph: QdqGraph) -> QuantRange | None:
    """The node's range where its scale and zero point are constants (no blocked ones)."""
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    scale = graph.array(node.input[1]) if len(node.input) > 1 else None
    has_zero = len(node.input) > 2 and bool(node.input[2])
    zero = graph.array(node.input[2]) if has_zero else np.zeros(1)
    qtype = graph.qdq_type(node)
    if attrs.get("block_size") or scale is None or zero is None or qtype is None:
        return None
    qmin, qmax = qtype.bounds
    scale, zero = scale.astype(np.float64), zero.astype(np.float64)
    axis = int(attrs.get("axis", 1)) if scale.size > 1 else None
    return QuantRange(
        np.atleast_1d((qmin - zero) * scale),
        np.atleast_1d((qmax - zero) * scale),
        np.atleast_1d(scale),
        axis,
    )


class CoverageCheck:
    """Range coverage of one QDQ model, fed one batch at a time (``compare`` runs it beside its
    accuracy pass); runs the model's graph as written in ONNX Runtime CPU. A model that ONNX
    Runtime cannot run that way is left unchecked (``failure`` says why), never an error."""

    def __init__(self, model: onnx.ModelProto, *, threads: int | None = None) -> None:
        self.observers = {
            name: CoverageObserver(quant_range)
            for name, quant_range in activation_ranges(model).items()
        }
        self.failure: str | None = None
        self._shard: ShardObserver | None = None
        try:
            self._shard = ShardObserver(
                model, {name: [obs] for name, obs in self.observers.items()}, threads=threads
            )
        except InvalidModelError as exc:
            self.failure = first_line(exc)

    def update(self, index: int, feed: Feed) -> None:
        if self._shard is None or not self.observers:
            return
        try:
            self._shard.observe(index, feed)
        except CalibrationDataError as exc:
            self.failure, self._shard = str(exc), None

    def result(self) -> list[TensorCoverage]:
        """Every checked activation, the most clipped first."""
        coverages = [
            TensorCoverage(
                name,
                float(obs.range.low.min()),
                float(obs.range.high.max()),
                obs.seen.min,
                obs.seen.max,
                obs.clipped,
                obs.seen.count,
            )
            for name, obs in self.observers.items()
            if obs.seen.count and self.failure is None
        ]
        return sorted(coverages, key=lambda c: c.fraction, reverse=True)

    def note(self, name: str) -> str | None:
        """``coverage_note`` for model ``name``, or why its coverage was not measured."""
        if self.failure is not None:
            return f"{name}: range coverage not measured ({self.failure})"
        return coverage_note(name, self.result())


def range_coverage(model: onnx.ModelProto, feeds: Iterable[Feed]) -> list[TensorCoverage]:
    """Range coverage of ``model``'s activations over ``feeds``, the most clipped first
    (``CalibrationDataError`` where ONNX Runtime cannot run the graph as written)."""
    check = CoverageCheck(model)
    for index, feed in enumerate(feeds):
        check.update(index, feed)
    if check.failure is not None:
        raise CalibrationDataError(f"range coverage not measured: {check.failure}")
    return check.result()


def coverage_note(name: str, coverages: Sequence[TensorCoverage]) -> str | None:
    """One line where some activation clipped more than ``NOTE_FRACTION`` of the data, else
    ``None``."""
    over = [c for c in coverages if c.fraction > NOTE_FRACTION]
    if not over:
        return None
    return (
        f"{name}: the data exceeds the quantization ranges of {len(over)} of {len(coverages)} "
        f"activations (most: {over[0].describe()}); the calibration data does not cover this "
        "data: calibrate on data like it"
    )
