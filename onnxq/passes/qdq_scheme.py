"""The integer scheme a QDQ graph uses: activation and weight types, symmetry, granularity.

``detect_scheme`` reads the activation Q/DQ nodes (non-constant input) and the weight DQs
(constant integers feeding a Conv/Gemm/MatMul/ConvTranspose weight input). A field is ``None``
where the graph has nothing to say (no weights) and the sorted list of types where it mixes
several.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.passes.qdq_nodes import constant_array, is_dq, is_q, qdq_of

WEIGHT_INPUTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
REDUCED_WEIGHT_PEAK = 64  # 7-bit weights: u8 x s8 pair sums fit int16


@dataclass(frozen=True)
class Scheme:
    """What the Q/DQ nodes of a graph hold (see module docstring)."""

    activation_types: tuple[str, ...]
    activation_symmetric: bool
    weight_types: tuple[str, ...]
    per_channel: bool
    weight_peak: int | None

    @property
    def activation_type(self) -> str | None:
        return self.activation_types[0] if len(self.activation_types) == 1 else None

    @property
    def weight_type(self) -> str | None:
        return self.weight_types[0] if len(self.weight_types) == 1 else None

    @property
    def reduce_range(self) -> bool:
        return self.weight_peak is not None and self.weight_peak <= REDUCED_WEIGHT_PEAK

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(activation_types=list(self.activation_types))
        out.update(weight_types=list(self.weight_types))
        return out


def weight_dqs(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node]]:
    """``(op, weight DQ)`` for every weighted op whose weight is DQ'd constant integers."""
    found = []
    for node in graph:
        index = WEIGHT_INPUTS.get(node.op_type)
        value = node.inputs[index] if index is not None and len(node.inputs) > index else None
        producer = value.producer() if value is not None else None
        if producer is not None and is_dq(producer):
            levels = constant_array(producer.inputs[0])
            if levels is not None and levels.dtype in (np.int8, np.uint8):
                found.append((node, producer))
    return found


def activation_qdqs(graph: ir.Graph) -> list[ir.Node]:
    """Every Q/DQ node of an activation (its input is not a constant)."""
    return [
        node
        for node in graph
        if (is_q(node) or is_dq(node)) and constant_array(node.inputs[0]) is None
    ]


def detect_scheme(graph: ir.Graph) -> Scheme:
    """The scheme of ``graph``'s main-graph Q/DQ nodes."""
    activations = [qdq_of(node) for node in activation_qdqs(graph)]
    weights = [(dq, qdq_of(dq)) for _, dq in weight_dqs(graph)]
    peaks = [
        int(np.abs(qdq.centered(constant_array(dq.inputs[0]))).max(initial=0))
        for dq, qdq in weights
    ]
    return Scheme(
        activation_types=tuple(sorted({q.zero_point.dtype.name for q in activations})),
        activation_symmetric=bool(activations)
        and all(q.zero_point.dtype.kind == "i" and not np.any(q.zero_point) for q in activations),
        weight_types=tuple(sorted({q.zero_point.dtype.name for _, q in weights})),
        per_channel=any(not q.per_tensor for _, q in weights),
        weight_peak=max(peaks) if peaks else None,
    )
