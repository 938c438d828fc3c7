"""Weight-only quantization: MatMul weights stored as blocked 4-bit (or 8-bit) integers.

Rewrite rules (``WeightOnlyPass``), main graph only:

1. ``MatMul(A, B)`` with ``A`` a float32 activation and ``B`` a float32 constant ``[K, N]`` that
   no other node reads becomes::

       MatMul(A, DequantizeLinear(B_q, scale, [zero_point], axis=0, block_size=bs))

   with ``B_q`` int4/uint4/int8/uint8 ``[K, N]`` and ``scale``/``zero_point``
   ``[ceil(K / bs), N]`` (``onnxq.blockwise``): signed types are symmetric and have no zero
   point, unsigned ones are affine. Integers are rounded by GPTQ, group-wise with every block's
   scale fixed first, where the node's input Hessian is given; to nearest otherwise.
2. ``Gemm(A, W, C)`` with ``transA = 0``, ``alpha = beta = 1`` and a constant ``W``: rule 1 on
   ``W`` (``W.T`` when ``transB = 1``) followed by ``Add(C)``.
3. Everything else stays float, with the reason in its decision.

What ONNX Runtime 1.32 runs (measured: CPU provider, optimised graph at ``extended`` level, as
``onnxq.inspect`` reads it): rule 1's ``DequantizeLinear -> MatMul`` fuses into
``com.microsoft.MatMulNBits`` (``bits`` 4 for int4/uint4, 8 for int8/uint8) for all four types,
with or without a zero point (a signed zero point fuses too), for any power-of-two block size
>= 16 (8, 24 and 48 stay ``DequantizeLinear`` + ``MatMul``), and for ``K`` not a multiple of the
block size. Blocked ``DequantizeLinear`` needs default-domain opset 21
(``WEIGHT_ONLY_OPSET``): ``prepare`` raises the model to it. ORT's CPU kernel then runs with
its session default ``session.qdq_matmulnbits_accuracy_level`` = 4: activations are quantized
to int8 per block at run time (about 0.5% relative error on a random layer; "0" keeps them
float and matches ``DequantizeLinear -> MatMul`` exactly). One measured exception: a MatMul
whose output goes through ``Relu`` into another MatMul stays ``DequantizeLinear`` + ``MatMul``
in ORT 1.32 (through Sigmoid, Tanh or GELU it fuses); ``onnxq inspect`` shows what fused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.blockwise import BlockQParams, block_qparams, quantize_blocks
from onnxq.config import QuantConfig, QuantType
from onnxq.gptq import HessianFactor, factor_hessian, gptq_round_groups
from onnxq.passes.fold_constants import remove_unused_initializers
from onnxq.passes.plan import NodeDecision, NodeSelection, is_constant, is_float32, node_label

WEIGHT_ONLY_OPSET = 21
"""Default-domain opset of blocked ``DequantizeLinear`` (and of int4/uint4 tensors)."""

WEIGHT_ONLY_TYPES = frozenset({QuantType.INT4, QuantType.UINT4, QuantType.INT8, QuantType.UINT8})
"""Weight types ONNX Runtime fuses into ``MatMulNBits``."""

WEIGHT_OPS = frozenset({"MatMul", "Gemm"})

_IR_TYPES = {
    QuantType.INT4: ir.DataType.INT4,
    QuantType.UINT4: ir.DataType.UINT4,
    QuantType.INT8: ir.DataType.INT8,
    QuantType.UINT8: ir.DataType.UINT8,
}


def weight_only_selection(config: QuantConfig) -> NodeSelection:
    """The MatMuls and Gemms the user's ``op_types`` and exclusions leave to this mode."""
    return NodeSelection.from_config(config, WEIGHT_OPS)


def candidate_reason(node: ir.Node, selection: NodeSelection) -> str:
    """Why ``node`` keeps a float weight (rules 1-3), or ``""`` when its weight is blocked."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS:
        return "not a MatMul or Gemm"
    declined = selection.declined(node)
    if declined:
        return declined
    if node.op_type == "Gemm":
        attrs = node.attributes
        if _int(attrs, "transA", 0) or _float(attrs, "alpha") != 1 or _float(attrs, "beta") != 1:
            return "Gemm with transA or alpha/beta != 1"
    activation, weight = node.inputs[0], node.inputs[1]
    if not is_constant(weight):
        return "no constant weight (activation x activation)"
    if not is_float32(weight) or len(weight.const_value.shape) != 2:
        return "weight is not a 2-D float32 constant"
    if not is_float32(activation) or is_constant(activation):
        return "left operand is not a float32 activation"
    if len(weight.uses()) != 1:
        return "weight shared with other nodes"
    return ""


def weight_only_inputs(model: ir.Model, config: QuantConfig) -> dict[str, str]:
    """Node name -> name of the activation its blocked weight multiplies (GPTQ's Hessians)."""
    selection = weight_only_selection(config)
    return {
        node.name: node.inputs[0].name
        for node in model.graph
        if node.op_type in WEIGHT_OPS and not candidate_reason(node, selection)
    }


@dataclass
class WeightOnlyPass(ir.passes.InPlacePass):
    """Apply the module's rules with a resolved ``config`` (``weight_type``, ``block_size``,
    ``weight_range``); ``hessians`` maps node names to ``[1, K, K]`` input Hessians (GPTQ).
    ``decisions`` records every MatMul and Gemm."""

    config: QuantConfig
    hessians: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()
        self.decisions: list[NodeDecision] = []
        self._factors: dict[int, HessianFactor] = {}  # by id: Q, K and V share one Hessian

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        selection = weight_only_selection(self.config)
        for index, node in enumerate(list(graph)):
            if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS:
                continue
            reason = candidate_reason(node, selection)
            quantized = not reason
            if quantized:
                reason = self._rewrite(graph, node)
            self.decisions.append(
                NodeDecision(node_label(node, index), node.op_type, quantized, reason)
            )
        remove_unused_initializers(model)
        return ir.passes.PassResult(model, modified=any(d.quantized for d in self.decisions))

    def _rewrite(self, graph: ir.Graph, node: ir.Node) -> str:
        weight = node.inputs[1]
        array = weight.const_value.numpy().astype(np.float32)
        if node.op_type == "Gemm" and _int(node.attributes, "transB", 0):
            array = np.ascontiguousarray(array.T)
        qtype, config = self.config.weight_type, self.config
        qp = block_qparams(
            array, qtype, config.block_size, symmetric=qtype.signed, method=config.weight_range
        )
        hessian = self.hessians.get(node.name)
        if hessian is None:
            levels = quantize_blocks(array, qp)
        else:
            factor = self._factors.get(id(hessian))
            if factor is None:
                factor = self._factors[id(hessian)] = factor_hessian(hessian[0])
            levels = _gptq(array, factor, qp)
        dequantized = self._emit_dequantize(graph, node, weight.name, levels, qp)
        if node.op_type == "MatMul":
            node.replace_input_with(1, dequantized)
        else:
            _gemm_to_matmul(graph, node, dequantized)
        rounding = "nearest" if hessian is None else "GPTQ"
        return f"blocked {qtype.value} (block {config.block_size}, {rounding}) weights"

    def _emit_dequantize(
        self, graph: ir.Graph, anchor: ir.Node, name: str, levels: np.ndarray, qp: BlockQParams
    ) -> ir.Value:
        dtype = _IR_TYPES[self.config.weight_type]
        inputs = [
            _constant(graph, f"{name}_quantized", levels, dtype),
            _constant(graph, f"{name}_scale", qp.scale.astype(np.float32)),
        ]
        if not self.config.weight_type.signed:  # affine: unsigned types carry a zero point
            inputs.append(_constant(graph, f"{name}_zero_point", qp.zero_point, dtype))
        out = ir.Value(
            name=f"{name}_dequantized",
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(levels.shape),
        )
        attributes = {"axis": 0, "block_size": self.config.block_size}
        graph.insert_before(
            anchor,
            ir.node(
                "DequantizeLinear", inputs, attributes, outputs=[out], name=f"{name}_dequantize"
            ),
        )
        return out


def quantize_weight_only_graph(
    model: ir.Model, config: QuantConfig, hessians: Mapping[str, np.ndarray] | None = None
) -> list[NodeDecision]:
    """Function twin of ``WeightOnlyPass``: rewrites in place, returns the decisions."""
    rewrite = WeightOnlyPass(config, hessians or {})
    rewrite(model)
    return rewrite.decisions


def _gptq(weight: np.ndarray, factor: HessianFactor, qp: BlockQParams) -> np.ndarray:
    """GPTQ integers of ``weight[K, N]`` on the fixed block grid: rows are output columns."""
    levels = gptq_round_groups(
        weight.T, factor, qp.scale.T, qp.zero_point.T, qp.block_size, qp.bounds
    )
    return np.ascontiguousarray(levels.T).astype(qp.zero_point.dtype)


def _gemm_to_matmul(graph: ir.Graph, gemm: ir.Node, weight: ir.Value) -> None:
    """Rule 2: ``MatMul(A, weight)`` (+ ``Add(C)``) takes the Gemm's place and output name."""
    output = gemm.outputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    product = ir.Value(name=f"{output.name}_matmul", type=output.type, shape=output.shape)
    nodes = [ir.node("MatMul", [gemm.inputs[0], weight], outputs=[product], name=gemm.name)]
    result = product
    if bias is not None:
        result = ir.Value(name=f"{output.name}_biased", type=output.type, shape=output.shape)
        nodes.append(ir.node("Add", [product, bias], outputs=[result], name=f"{gemm.name}_bias"))
    graph.insert_before(gemm, nodes)
    name = output.name
    output.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(gemm, safe=True)
    output.name = f"{name}_replaced"
    result.name = name


def _constant(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    tensor = ir.tensor(np.asarray(array), dtype=dtype, name=name)
    value = ir.Value(
        name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape)
    )
    graph.register_initializer(value)
    return value


def _int(attrs: Mapping[str, ir.Attr], name: str, default: int) -> int:
    return attrs[name].as_int() if name in attrs else default


def _float(attrs: Mapping[str, ir.Attr], name: str) -> float:
    return attrs[name].as_float() if name in attrs else 1.0
