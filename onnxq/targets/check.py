"""Check any QDQ model (onnxq's or another tool's) against a target's rules.

Each rule reads the target's fields and names every node that breaks it. A rule applies to a
target when its ``applies`` predicate holds (rules as data, in ``RULES``):

1. ``forbidden-op``: no op of ``forbidden_ops`` (TensorRT, OpenVINO and QNN take Q/DQ around
   float ops, not ONNX Runtime's ``QLinear*`` / ``MatMulInteger`` kernels).
2. ``activation-type``: every activation Q/DQ uses the target's activation type.
3. ``activation-zero-point``: symmetric targets need activation zero points of 0.
4. ``weight-type``: every weight behind a DQ uses the target's weight type, zero point 0 for
   signed weights, and the narrow range ``[-qmax, qmax]`` where activations are symmetric
   (TensorRT).
5. ``weight-bits``: 7-bit targets keep ``|w| <= 64``, so ``u8 x s8`` pair sums fit int16.
6. ``per-channel-axis``: a per-channel weight scale runs along the op's output-channel axis,
   and only for op types the target quantizes per channel.
7. ``half-quantized``: a weighted op (Conv, Gemm, MatMul, ConvTranspose) with a DQ weight also
   reads its activation through a DQ, and the other way round.
8. ``bias``: int32-bias targets: the bias of a quantized Conv/Gemm is int32 behind a DQ with
   ``scale = input_scale * weight_scale``; float-bias targets: the bias stays float.
9. ``residual-add``: an Add of two activations with one from a DQ reads the other from a DQ
   too (an Add with a constant operand is a bias, which the runtime fuses).
10. ``opset``: the default-domain opset is at least the target's ``min_opset``; 16-bit Q/DQ in
    the default domain need opset 21.
11. ``control-flow``: no node is If/Loop/Scan (QNN compiles a static graph; its fixed input
    shapes are set at deployment, e.g. with ``onnxruntime.tools.make_dynamic_shape_fixed``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.config import QuantType
from onnxq.model_io import model_proto
from onnxq.targets import BiasForm, Target, get_target
from onnxq.targets.catalog import WEIGHTED_OPS

Q_OPS = frozenset({"QuantizeLinear"})
DQ_OPS = frozenset({"DequantizeLinear"})
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
WIDE_QDQ_OPSET = 21
BIAS_SCALE_RTOL = 1e-5

_ONNX_TYPES = {
    onnx.TensorProto.UINT8: QuantType.UINT8,
    onnx.TensorProto.INT8: QuantType.INT8,
    onnx.TensorProto.UINT16: QuantType.UINT16,
    onnx.TensorProto.INT16: QuantType.INT16,
    onnx.TensorProto.UINT4: QuantType.UINT4,
    onnx.TensorProto.INT4: QuantType.INT4,
}


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node."""

    rule: str
    node: str
    op_type: str
    message: str

    def describe(self) -> str:
        return f"{self.node} ({self.op_type}): {self.message} [{self.rule}]"


@dataclass(frozen=True)
class CheckReport:
    """Every violation of ``target``'s rules in the model at ``path``."""

    path: str
    target: str
    rules: tuple[str, ...]
    violations: tuple[Violation, ...]

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "target": self.target,
            "rules": list(self.rules),
            "ok": self.ok,
            "violations": [v.__dict__ | {"text": v.describe()} for v in self.violations],
        }


class QdqGraph:
    """Producers, consumers and constants of a main graph, by tensor name, and the integer
    types of its Q/DQ nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.constants = {init.name: init for init in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute:
                attr = node.attribute[0]
                if attr.type == onnx.AttributeProto.TENSOR:
                    self.constants[node.output[0]] = attr.t

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def dq_of(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing ``name``, looking through a weight's Transpose or
        Reshape (some exporters put one between the DQ and the op)."""
        node = self.producer.get(name)
        if node is not None and node.op_type in {"Transpose", "Reshape"} and node.input:
            inner = self.producer.get(node.input[0])
            if inner is not None and inner.op_type in DQ_OPS and self.is_constant_dq(inner):
                return inner
        return node if node is not None and node.op_type in DQ_OPS else None

    def is_constant_dq(self, node: onnx.NodeProto) -> bool:
        return node.input[0] in self.constants

    def qdq_type(self, node: onnx.NodeProto) -> QuantType | None:
        """Integer type of a Q/DQ: the zero point's type, else the DQ input's, else uint8."""
        if len(node.input) > 2 and node.input[2] in self.constants:
            return _ONNX_TYPES.get(self.constants[node.input[2]].data_type)
        if node.op_type in DQ_OPS and node.input[0] in self.constants:
            return _ONNX_TYPES.get(self.constants[node.input[0]].data_type)
        if node.op_type in Q_OPS:
            for attr in node.attribute:
                if attr.name == "output_dtype" and attr.i:
                    return _ONNX_TYPES.get(attr.i)
        return QuantType.UINT8

    @cached_property
    def opset(self) -> int:
        for entry in self.model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return entry.version
        return 0

    def weight_dq(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            return None
        dq = self.dq_of(node.input[index])
        return dq if dq is not None and self.is_constant_dq(dq) else None

    def activation_dq(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        dq = self.dq_of(node.input[0]) if node.input else None
        return dq if dq is not None and not self.is_constant_dq(dq) else None


Rule = Callable[[QdqGraph, Target], Iterator[tuple[onnx.NodeProto, str]]]


def _forbidden_op(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in g.graph.node:
        if node.op_type in target.forbidden_ops:
            yield node, f"{target.runtime} takes Q/DQ around float ops, not {node.op_type}"


def _activation_qdq(g: QdqGraph) -> Iterator[onnx.NodeProto]:
    """Q/DQ nodes of activations (not of constant weights or biases)."""
    for node in g.graph.node:
        is_qdq = node.op_type in Q_OPS or node.op_type in DQ_OPS
        if is_qdq and node.input[0] not in g.constants:
            yield node


def _activation_type(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in _activation_qdq(g):
        qtype = g.qdq_type(node)
        if qtype is not target.activation_type:
            shown = qtype.value if qtype else "an unknown type"
            yield node, f"activation is {shown}, {target.name} runs {target.activation_type.value}"


def _activation_zero_point(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in _activation_qdq(g):
        zero_point = g.array(node.input[2]) if len(node.input) > 2 else None
        if zero_point is not None and np.any(zero_point != 0):
            yield node, f"activation zero point {zero_point.ravel()[:4].tolist()} is not 0"


def _weights(g: QdqGraph) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto, np.ndarray]]:
    """``(op, weight DQ, integer weight)`` of every weighted op with a quantized weight."""
    for node in g.graph.node:
        dq = g.weight_dq(node)
        if dq is not None:
            yield node, dq, g.array(dq.input[0])


def _weight_type(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node, dq, levels in _weights(g):
        qtype = g.qdq_type(dq)
        if qtype is not target.weight_type:
            shown = qtype.value if qtype else "an unknown type"
            yield node, f"weight is {shown}, {target.name} runs {target.weight_type.value}"
            continue
        zero_point = g.array(dq.input[2]) if len(dq.input) > 2 else None
        if qtype.signed and zero_point is not None and np.any(zero_point != 0):
            yield node, "signed weight with a non-zero zero point (must be symmetric)"
        narrow = target.activation_symmetric and qtype.signed and levels.size
        if narrow and int(levels.min()) == qtype.bounds[0]:
            yield node, f"weight uses {qtype.bounds[0]}; symmetric range is +-{qtype.bounds[1]}"


def _weight_bits(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node, _, levels in _weights(g):
        peak = int(np.abs(levels.astype(np.int32)).max()) if levels.size else 0
        if levels.dtype == np.int8 and peak > 64:
            yield (
                node,
                (
                    f"weight reaches |{peak}| > 64: u8 x s8 pair sums can saturate int16 on x86 "
                    "without VNNI (7-bit weights avoid it)"
                ),
            )


def _per_channel_axis(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node, dq, levels in _weights(g):
        scale = g.array(dq.input[1])
        if scale is None or scale.size <= 1:
            continue
        if node.op_type not in target.per_channel_ops:
            yield node, f"per-channel weight scales on {node.op_type}: {target.name} needs one"
            continue
        axis = _attr(dq, "axis", 1) % max(levels.ndim, 1)
        expected = _output_axis(node, levels.ndim)
        if expected is not None and axis != expected:
            yield node, f"per-channel axis {axis}, the output channels are axis {expected}"


def _half_quantized(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in g.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.op_type not in WEIGHT_INPUT:
            continue
        weight, activation = g.weight_dq(node), g.activation_dq(node)
        if weight is not None and activation is None:
            yield node, "weight is quantized but the activation input is float"
        elif activation is not None and weight is None and _has_constant_weight(g, node):
            yield node, "activation is quantized but the weight is float"


def _bias(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in g.graph.node:
        index = BIAS_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index or not node.input[index]:
            continue
        weight, activation = g.weight_dq(node), g.activation_dq(node)
        if weight is None or activation is None:
            continue
        bias_dq = g.dq_of(node.input[index])
        if target.bias is BiasForm.FLOAT:
            if bias_dq is not None:
                yield node, f"bias is quantized; {target.runtime} takes a float bias"
            continue
        bias_levels = g.constants.get(bias_dq.input[0]) if bias_dq is not None else None
        if bias_levels is None or bias_levels.data_type != onnx.TensorProto.INT32:
            yield node, "bias is not int32 behind a DequantizeLinear (no int8 kernel fuses)"
            continue
        expected = np.float32(g.array(activation.input[1])) * g.array(weight.input[1])
        scale = g.array(bias_dq.input[1])
        if scale is None or not np.allclose(scale, expected, rtol=BIAS_SCALE_RTOL, atol=0):
            yield node, "bias scale is not input_scale * weight_scale"


def _residual_add(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in g.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        dqs = [g.dq_of(name) for name in node.input]
        constant = [
            name in g.constants or (dq is not None and g.is_constant_dq(dq))
            for name, dq in zip(node.input, dqs, strict=True)
        ]
        if any(constant):
            continue  # a bias Add: the runtime fuses a constant operand, quantized or not
        from_dq = [dq is not None for dq in dqs]
        if any(from_dq) and not all(from_dq):
            floating = node.input[from_dq.index(False)]
            yield node, f"input {floating!r} is float while the other is quantized"


def _opset(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    if g.opset < target.min_opset:
        placeholder = onnx.helper.make_node("Identity", [], [], name="<model>")
        yield placeholder, f"opset {g.opset} < {target.min_opset}, which {target.name} needs"
    if g.opset >= WIDE_QDQ_OPSET:
        return
    for node in g.graph.node:
        if node.op_type in Q_OPS | DQ_OPS and node.domain in ("", "ai.onnx"):
            qtype = g.qdq_type(node)
            if qtype is not None and qtype.bits != 8:
                yield node, f"{qtype.value} Q/DQ in the default domain need opset 21"


def _control_flow(g: QdqGraph, target: Target) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in g.graph.node:
        if node.op_type in CONTROL_FLOW:
            yield node, f"{target.runtime} runs no control flow ({node.op_type})"


RULES: dict[str, tuple[Rule, Callable[[Target], bool]]] = {
    "forbidden-op": (_forbidden_op, lambda t: bool(t.forbidden_ops)),
    "activation-type": (_activation_type, lambda t: True),
    "activation-zero-point": (_activation_zero_point, lambda t: t.activation_symmetric),
    "weight-type": (_weight_type, lambda t: True),
    "weight-bits": (_weight_bits, lambda t: t.reduce_range),
    "per-channel-axis": (_per_channel_axis, lambda t: True),
    "half-quantized": (_half_quantized, lambda t: True),
    "bias": (_bias, lambda t: True),
    "residual-add": (_residual_add, lambda t: t.residual_add_inputs),
    "opset": (_opset, lambda t: True),
    "control-flow": (_control_flow, lambda t: t.static_shapes),
}
"""Rule name -> (check, applies to a target)."""


def check_model(
    model: str | os.PathLike[str] | onnx.ModelProto, target: str | Target
) -> CheckReport:
    """Every violation of ``target``'s rules in ``model`` (a path or a proto)."""
    target = get_target(target)
    proto = model_proto(model)
    graph = QdqGraph(proto)
    applied = tuple(name for name, (_, applies) in RULES.items() if applies(target))
    violations = [
        Violation(
            name,
            node.name or f"{node.op_type}:{node.output[0] if node.output else ''}",
            node.op_type,
            message,
        )
        for name in applied
        for node, message in RULES[name][0](graph, target)
    ]
    path = str(model) if not isinstance(model, onnx.ModelProto) else "<model>"
    return CheckReport(path, target.name, applied, tuple(violations))


def format_check(report: CheckReport) -> str:
    """One line per violation, then a verdict line."""
    lines = [f"  {v.describe()}" for v in report.violations]
    verdict = (
        f"{report.path}: meets every {report.target} rule ({len(report.rules)} rules)"
        if report.ok
        else f"{report.path}: {len(report.violations)} violation(s) of {report.target} rules"
    )
    return "\n".join([verdict, *lines])


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _output_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The weight's output-channel axis (Conv 0, ConvTranspose 1, Gemm by transB, MatMul last)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return None


def _has_constant_weight(g: QdqGraph, node: onnx.NodeProto) -> bool:
    index = WEIGHT_INPUT[node.op_type]
    return len(node.input) > index and node.input[index] in g.constants
