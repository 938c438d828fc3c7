"""Which ops onnxq quantizes, and how, so ONNX Runtime's CPU optimizer fuses them to int8 kernels.

ORT fuses ``DQ -> op -> Q`` into an int8 kernel only when every float input comes from a
DequantizeLinear and the output feeds only QuantizeLinear. A rule says which inputs are
activations (Q/DQ pairs), which is a constant weight (int8 initializer + DQ, per-channel along
``weight_axis``), which is a bias (int32, ``scale = input_scale * weight_scale``) and whether the
kernel also exists with a float output (``float_output_ok``: MatMul -> MatMulIntegerToFloat,
Gemm -> QGemm with float output).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized (see module docstring)."""

    kernel: str
    activation_inputs: tuple[int, ...] | None = (0,)  # None: every input
    weight_input: int | None = None
    bias_input: int | None = None
    float_output_ok: bool = False
    constant_operands_ok: bool = False


QUANTIZABLE_OPS: dict[str, OpRule] = {
    "Conv": OpRule("QLinearConv", weight_input=1, bias_input=2),
    "ConvTranspose": OpRule("QLinearConvTranspose", weight_input=1, bias_input=2),
    "Gemm": OpRule("QGemm", weight_input=1, bias_input=2, float_output_ok=True),
    "MatMul": OpRule(
        "QLinearMatMul", activation_inputs=(0, 1), float_output_ok=True, constant_operands_ok=True
    ),
    "Add": OpRule("QLinearAdd", activation_inputs=(0, 1)),
    "Mul": OpRule("QLinearMul", activation_inputs=(0, 1)),
    "AveragePool": OpRule("QLinearAveragePool"),
    "GlobalAveragePool": OpRule("QLinearGlobalAveragePool"),
    "Sigmoid": OpRule("QLinearSigmoid"),
    "LeakyRelu": OpRule("QLinearLeakyRelu"),
    "Concat": OpRule("QLinearConcat", activation_inputs=None),
}
"""Ops onnxq knows how to quantize; a target's ``quantized_ops`` (or the config's ``op_types``)
selects among them."""

PASS_THROUGH_OPS = frozenset(
    {
        "MaxPool",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Resize",
        "Gather",
        "Slice",
        "Split",
        "Identity",
        "DepthToSpace",
        "SpaceToDepth",
        "Expand",
        "Tile",
    }
)
"""Ops that only move or select values (input 0): their output shares their input's qparams,
so ORT drops the surrounding DQ/Q and runs them on int8 data."""


def weight_axis(node: ir.Node, weight_index: int, rank: int) -> int | None:
    """The output-channel axis of a weight: Conv 0, ConvTranspose 1, Gemm by ``transB``,
    MatMul's right operand its last axis. ``None``: per-channel does not apply."""
    op = node.op_type
    if op == "Conv" and rank >= 3:
        return 0
    if op == "ConvTranspose" and rank >= 3:
        group = node.attributes.get("group")
        return 1 if group is None or group.as_int() == 1 else None
    if op == "Gemm" and rank == 2:
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    if op == "MatMul" and weight_index == 1 and rank >= 2:
        return rank - 1
    return None


def clip_is_foldable(node: ir.Node) -> bool:
    """A Clip folds into the Q before it only with constant (or absent) bounds."""
    if node.op_type == "Relu":
        return True
    return all(value is None or value.const_value is not None for value in node.inputs[1:3])
