"""No silent collapse: the quantized model's outputs against fp32 on data the run already has.

Rules:

1. The float outputs of both models are compared over at most ``QUALITY_BATCHES`` batches:
   SQNR (dB) and cosine, all outputs and samples joined.
2. Below either floor of ``QualityFloor`` the model has collapsed. The suspects are then the
   first quantized anchors (Conv, Gemm, MatMul, topological order) whose own output falls
   below the SQNR floor: error starts there and everything after inherits it. One extra run
   of each model on one batch; no rebuilds.
3. The warning is one line: the figures, the suspects, and the options that fix it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx

from onnxq.calibration.collect import augment_outputs, graph_session
from onnxq.evaluate import sqnr_db
from onnxq.passes.plan import NodeDecision
from onnxq.runtime import make_session, run_float_outputs

QUALITY_BATCHES = 4
ANCHORS = frozenset({"Conv", "Gemm", "MatMul"})
MAX_SUSPECTS = 3
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class QualityFloor:
    """Below either value a quantized model counts as collapsed. Zoo models sit far above
    (ResNet-18 ~30 dB, MiniLM cosine > 0.99); a broken model sits far below."""

    min_sqnr_db: float = 15.0
    min_cosine: float = 0.98


@dataclass(frozen=True)
class OutputQuality:
    """How close the quantized outputs are to fp32 on ``batches`` batches, and who is to blame."""

    sqnr_db: float
    cosine: float
    batches: int
    floor: QualityFloor = field(default_factory=QualityFloor)
    suspects: tuple[str, ...] = ()

    @property
    def collapsed(self) -> bool:
        return self.sqnr_db < self.floor.min_sqnr_db or self.cosine < self.floor.min_cosine

    def warning(self) -> str | None:
        """One line when collapsed, else ``None``."""
        if not self.collapsed:
            return None
        blame = f"; most responsible: {', '.join(self.suspects)}" if self.suspects else ""
        exclude = f" or --exclude-nodes {','.join(self.suspects)}" if self.suspects else ""
        return (
            f"quantized output collapsed against fp32 on the calibration data: SQNR "
            f"{self.sqnr_db:.1f} dB, cosine {self.cosine:.4f} (floor {self.floor.min_sqnr_db:g} dB"
            f", {self.floor.min_cosine:g}){blame}; fix: --min-cosine "
            f"{max(self.floor.min_cosine, 0.99):g}{exclude}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "sqnr_db": self.sqnr_db,
            "cosine": self.cosine,
            "batches": self.batches,
            "floor": {"sqnr_db": self.floor.min_sqnr_db, "cosine": self.floor.min_cosine},
            "collapsed": self.collapsed,
            "suspects": list(self.suspects),
        }


def measure_quality(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feeds: Iterable[Feed],
    decisions: Sequence[NodeDecision],
    floor: QualityFloor | None = None,
) -> OutputQuality | None:
    """Rules 1-2 over the first ``QUALITY_BATCHES`` of ``feeds``; ``None`` without data or
    without float outputs. ``reference`` is the prepared float model the decisions name."""
    floor = floor or QualityFloor()
    batches = list(islice(feeds, QUALITY_BATCHES))
    if not batches:
        return None
    ref, out = (_float_outputs(model, batches) for model in (reference, quantized))
    if not ref:
        return None
    quality = OutputQuality(sqnr_db(ref, out), _cosine(ref, out), len(batches), floor)
    if not quality.collapsed:
        return quality
    suspects = _suspects(reference, quantized, batches[0], decisions, floor)
    return OutputQuality(quality.sqnr_db, quality.cosine, len(batches), floor, suspects)


def _float_outputs(model: onnx.ModelProto, batches: list[Feed]) -> list[np.ndarray]:
    session = make_session(model)
    return [out.astype(np.float64) for feed in batches for out in run_float_outputs(session, feed)]


def _cosine(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    ref = np.concatenate([r.ravel() for r in reference])
    out = np.concatenate([a.ravel() for a in actual])
    norms = np.linalg.norm(ref) * np.linalg.norm(out)
    if norms == 0:
        return 1.0 if not ref.any() and not out.any() else 0.0
    return float(ref @ out / norms)


def _suspects(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feed: Feed,
    decisions: Sequence[NodeDecision],
    floor: QualityFloor,
) -> tuple[str, ...]:
    """Rule 2: the first quantized anchors whose output is below the SQNR floor."""
    outputs = {n.name: n.output[0] for n in reference.graph.node if n.name}
    present = {o for n in quantized.graph.node for o in n.output}
    anchors = [
        (d.name, outputs[d.name])
        for d in decisions
        if d.quantized and d.op_type in ANCHORS and outputs.get(d.name) in present
    ]
    if not anchors:
        return ()
    names = [tensor for _, tensor in anchors]
    ref, out = (
        run_float_outputs(graph_session(augment_outputs(m, names)), feed, names)
        for m in (reference, quantized)
    )
    order = {n.name: i for i, n in enumerate(reference.graph.node)}
    low = [
        name
        for (name, _), r, o in zip(anchors, ref, out, strict=True)
        if sqnr_db(r, o) < floor.min_sqnr_db
    ]
    return tuple(sorted(low, key=order.__getitem__)[:MAX_SUSPECTS])
