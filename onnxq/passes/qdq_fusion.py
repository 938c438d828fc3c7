"""Which ops of a QDQ graph meet ONNX Runtime's pattern for an int8 kernel, and why not.

A static reading of the file (``onnxq.inspect`` asks ORT itself). For each main-graph op with a
rule in ``op_rules.QUANTIZABLE_OPS``, the first broken condition is its reason:

1. every activation input comes from a DequantizeLinear (directly or through pass-through ops
   such as MaxPool, past which ORT moves the DQ);
2. the weight (Conv/Gemm input 1) comes from a DequantizeLinear of constant integers;
3. a bias, where present, comes from a DequantizeLinear of int32;
4. the output feeds only QuantizeLinear nodes, directly or through one Relu/Clip that changes
   no integer of that Q (ORT removes it at load), unless the kernel also has a float output
   (MatMul, Gemm).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.passes.op_rules import PASS_THROUGH_OPS, QUANTIZABLE_OPS, OpRule
from onnxq.passes.plan import NodeDecision
from onnxq.passes.qdq_nodes import (
    ACTIVATION_OPS,
    constant_array,
    is_dq,
    is_noop_under,
    is_q,
    label,
    qdq_of,
)


def fusion_decisions(graph: ir.Graph) -> list[NodeDecision]:
    """One decision per quantizable op of the main graph (rules in the module docstring)."""
    decisions = []
    for node in graph:
        rule = QUANTIZABLE_OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            continue
        reason = _blocker(node, rule)
        decisions.append(NodeDecision(label(node), node.op_type, not reason, reason or rule.kernel))
    return decisions


def _blocker(node: ir.Node, rule: OpRule) -> str:
    """Empty when ``node`` meets the pattern, else the first reason it does not."""
    special = {rule.weight_input, rule.bias_input}
    indices = range(len(node.inputs)) if rule.activation_inputs is None else rule.activation_inputs
    for index in indices:
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is not None and index not in special and not _from_dq(value):
            return f"input {value.name!r} does not come from a DequantizeLinear"
    if rule.weight_input is not None:
        weight = node.inputs[rule.weight_input]
        if not _from_dq(weight) or constant_array(weight.producer().inputs[0]) is None:
            return "weight is not integers behind a DequantizeLinear"
    index = rule.bias_input
    bias = node.inputs[index] if index is not None and len(node.inputs) > index else None
    if bias is not None:
        levels = constant_array(bias.producer().inputs[0]) if _from_dq(bias) else None
        if levels is None or levels.dtype != np.int32:
            return "bias is not int32 behind a DequantizeLinear"
    if rule.float_output_ok:
        return ""
    output = node.outputs[0]
    readers = [use.node for use in output.uses()]
    if len(readers) == 1 and readers[0].op_type in ACTIVATION_OPS:
        activation = readers[0]
        readers = [use.node for use in activation.outputs[0].uses()]
        quantized = readers and all(map(is_q, readers))
        if quantized and not is_noop_under(activation, qdq_of(readers[0])):
            return f"{activation.op_type} between it and its QuantizeLinear changes integers"
    if output.is_graph_output() or not readers or not all(map(is_q, readers)):
        return "output does not feed only QuantizeLinear nodes"
    return ""


def _from_dq(value: ir.Value | None) -> bool:
    """``value`` comes from a DQ, directly or through pass-through ops (MaxPool, Reshape, ...:
    ORT moves the DQ past them)."""
    producer = value.producer() if value is not None else None
    while producer is not None and producer.op_type in PASS_THROUGH_OPS and producer.inputs:
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is not None and is_dq(producer)
