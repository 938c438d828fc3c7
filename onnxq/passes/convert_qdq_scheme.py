"""Convert a QDQ graph to a target's integer scheme where that is exact, and say where not.

Rules (``ConvertSchemePass``):

1. Activations: a Q and the DQs reading its integers change type together. uint8 <-> int8 with
   the zero point shifted by 128 holds the same real values: exact. A symmetric target also
   needs the shifted zero point to be 0. Declined with a reason: another target type (16-bit),
   a zero point the shift cannot make 0, a Q whose integers feed more than DQs, a DQ of an
   integer graph input (its type is the model's interface).
2. Weights (DQ of constant integers on a weighted op's weight input): uint8 levels with zero
   point 128 become int8 levels with zero point 0: exact. Every other difference (asymmetric
   int8, 8-bit levels for a 7-bit target, -128 for a narrow-range target, per-channel scales
   where the target runs per-tensor) needs requantizing, which is not exact: one line each.
3. Biases: a float-bias target gets each int32 Conv/Gemm bias DQ as the float values it
   computes: exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.passes.finish_qdq import BIASED_OPS, FinishLog
from onnxq.passes.fold_constants import remove_unused_initializers
from onnxq.passes.naming import add_initializer
from onnxq.passes.qdq_nodes import QDQ, constant_array, is_dq, is_q, label, qdq_of
from onnxq.passes.qdq_scheme import REDUCED_WEIGHT_PEAK, weight_dqs
from onnxq.qparams import dequantize
from onnxq.targets import BiasForm, Target

SHIFT = {
    (np.dtype(np.uint8), np.dtype(np.int8)): -128,
    (np.dtype(np.int8), np.dtype(np.uint8)): 128,
}
"""Zero-point shift between the 8-bit types: the same reals, other integers."""


class ConvertSchemePass(ir.passes.InPlacePass):
    """Convert the main graph to ``target``'s scheme (module docstring); changes go to
    ``log.changes``, what cannot be converted exactly to ``log.blocked``."""

    def __init__(self, target: Target, log: FinishLog) -> None:
        super().__init__()
        self.target = target
        self.log = log

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(len(nodes) for nodes in self.log.changes.values())
        for rule in CONVERSIONS:
            rule(model.graph, self.target, self.log)
        common_passes.RemoveUnusedNodesPass()(model)
        remove_unused_initializers(model)
        after = sum(len(nodes) for nodes in self.log.changes.values())
        return ir.passes.PassResult(model, modified=after != before)


def _activations(graph: ir.Graph, target: Target, log: FinishLog) -> None:
    """Rule 1."""
    wanted = np.dtype(target.activation_type.value)
    reasons: dict[str, list[str]] = {}
    for node in list(graph):
        if not (is_q(node) or is_dq(node)) or constant_array(node.inputs[0]) is not None:
            continue
        qdq = qdq_of(node)
        if qdq.zero_point.dtype == wanted:
            continue
        if is_dq(node):
            producer = node.inputs[0].producer()
            if producer is None or not is_q(producer):
                reasons.setdefault("it dequantizes an integer graph input", []).append(label(node))
            continue
        reason = _convert_activation(graph, node, wanted, target.activation_symmetric)
        if reason:
            reasons.setdefault(reason, []).append(label(node))
        else:
            log.changed("convert-activation", label(node))
    for reason, nodes in reasons.items():
        symmetric = " symmetric" if target.activation_symmetric else ""
        log.blocked.append(
            f"{len(nodes)} activation Q/DQ kept {_shown(nodes)}: {reason} "
            f"({target.name} runs {wanted.name}{symmetric})"
        )


def _convert_activation(graph: ir.Graph, q: ir.Node, wanted: np.dtype, symmetric: bool) -> str:
    """Shift one Q and its DQs to ``wanted``; the reason when that is not exact."""
    qdq = qdq_of(q)
    shift = SHIFT.get((qdq.zero_point.dtype, wanted))
    if shift is None:
        return f"{qdq.zero_point.dtype.name} -> {wanted.name} needs requantizing (not exact)"
    readers = [use.node for use in q.outputs[0].uses()]
    if q.outputs[0].is_graph_output() or not all(map(is_dq, readers)):
        return "its integers feed more than DequantizeLinear nodes"
    zero_point = (qdq.zero_point.astype(np.int32) + shift).astype(wanted)
    if symmetric and np.any(zero_point):
        shown = int(zero_point.reshape(-1)[0])
        return f"the zero point shifts to {shown}, not 0 (requantizing is not exact)"
    value = add_initializer(graph, f"{label(q)}_zero_point_{wanted.name}", zero_point)
    for node in (q, *readers):
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
    q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(wanted))
    return ""


def _weights(graph: ir.Graph, target: Target, log: FinishLog) -> None:
    """Rule 2."""
    wanted = np.dtype(target.weight_type.value)
    reasons: dict[str, list[str]] = {}
    for op, dq in weight_dqs(graph):
        qdq = qdq_of(dq)
        levels = constant_array(dq.inputs[0])
        shift = SHIFT.get((levels.dtype, wanted))
        if shift == -128 and np.all(qdq.zero_point == 128):  # a shared DQ converts once
            name = dq.inputs[0].name
            dq.replace_input_with(0, add_initializer(graph, f"{name}_{wanted}", _shifted(levels)))
            zero_point = _shifted(qdq.zero_point)
            dq.replace_input_with(2, add_initializer(graph, f"{name}_zero_point", zero_point))
            log.changed("convert-weight", label(op))
            continue
        for reason, broken in _weight_rules(target, op, qdq, levels, wanted):
            if broken:
                reasons.setdefault(reason, []).append(label(op))
    for reason, nodes in reasons.items():
        log.blocked.append(
            f"{len(nodes)} weights kept {_shown(nodes)}: {reason}; requantizing weights is not "
            "exact"
        )


def _weight_rules(
    target: Target, op: ir.Node, qdq: QDQ, levels: np.ndarray, wanted: np.dtype
) -> list[tuple[str, bool]]:
    """``(reason, broken)`` for each thing a weight must be on ``target`` (rule 2)."""
    typed = levels.dtype == wanted
    signed = typed and wanted.kind == "i"
    peak = int(np.abs(qdq.centered(levels)).max(initial=0))
    return [
        (f"{levels.dtype.name} weights, {target.name} runs {wanted.name}", not typed),
        (
            f"non-zero zero point, {target.name} runs symmetric weights",
            signed and bool(np.any(qdq.zero_point)),
        ),
        (
            f"levels beyond +-{REDUCED_WEIGHT_PEAK}, {target.name} runs 7-bit weights",
            target.reduce_range and peak > REDUCED_WEIGHT_PEAK,
        ),
        (
            f"level -128 used, {target.name} runs the narrow range +-127",
            target.activation_symmetric and signed and int(levels.min(initial=0)) == -128,
        ),
        (
            f"per-channel scales on {op.op_type}, {target.name} runs it per-tensor",
            not qdq.per_tensor and op.op_type not in target.per_channel_ops,
        ),
    ]


def _biases(graph: ir.Graph, target: Target, log: FinishLog) -> None:
    """Rule 3."""
    if target.bias is not BiasForm.FLOAT:
        return
    for op in list(graph):
        index = BIASED_OPS.get(op.op_type)
        bias = op.inputs[index] if index is not None and len(op.inputs) > index else None
        dq = bias.producer() if bias is not None else None
        levels = constant_array(dq.inputs[0]) if dq is not None and is_dq(dq) else None
        if levels is None or levels.dtype != np.int32:
            continue
        values = dequantize(levels, qdq_of(dq).qparams)
        op.replace_input_with(index, add_initializer(graph, f"{bias.name}_float", values))
        log.changed("float-bias", label(op))


def _shifted(levels: np.ndarray) -> np.ndarray:
    return (levels.astype(np.int32) - 128).astype(np.int8)


def _shown(nodes: list[str]) -> str:
    more = f" and {len(nodes) - 2} more" if len(nodes) > 2 else ""
    return f"({', '.join(repr(n) for n in nodes[:2])}{more})"


CONVERSIONS: tuple[Callable[[ir.Graph, Target, FinishLog], None], ...] = (
    _activations,
    _weights,
    _biases,
)
"""The rules of the module docstring, in order."""
