"""Dynamic quantization: int8 weights in the file, activations quantized at run time.

Rewrite rules (``DynamicQuantizePass``):
1. ``MatMul(A, W)`` with a float32 constant 2-D ``W`` becomes::

       DynamicQuantizeLinear(A) -> MatMulInteger(A_u8, W_s8, a_zero_point) -> Cast(float)
       -> Mul(a_scale * w_scale)

   with ``w_scale`` per output column (or per tensor), from the config's weight range
   (min-max or MSE-clipped). ``W`` is rounded with GPTQ where a Hessian of ``A`` is given,
   else to nearest. ORT fuses the chain into ``DynamicQuantizeMatMul``.
2. ``Gemm(A, W, C)`` with constant ``W``, ``transA = 0`` and ``alpha = beta = 1`` is rule 1 on
   ``W`` (transposed first when ``transB = 1``) followed by ``Add(C)``.
3. ``LSTM`` (forward/reverse/bidirectional, ``layout = 0``, no ``input_forget``) with constant
   ``W``/``R`` becomes ``com.microsoft.DynamicQuantizeLSTM`` with ``W``, ``R`` transposed to
   ``[directions, in, 4*hidden]`` and quantized per gate column.
4. A weight read by several nodes (an LSTM unrolled into per-step Gemms sharing ``W_hh``) is
   quantized once and every reader takes the same integer weight; GPTQ rounds it with the
   mean of its readers' Hessians (nearest rounding when a reader has none).
5. Everything else stays float; Conv among them (ConvInteger is not faster than fp32 on CPU),
   and every node inside an If/Loop/Scan body (as in static mode: ``subgraph_decisions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.config import QuantConfig, QuantType
from onnxq.passes.fold_constants import remove_unused_initializers
from onnxq.passes.naming import add_initializer
from onnxq.passes.plan import (
    NodeDecision,
    NodeSelection,
    is_constant,
    is_float32,
    node_label,
)
from onnxq.passes.weight_rounding import layer_weight_qparams, round_weight, rounding_hessian
from onnxq.qparams import QParams, quantize

MS_DOMAIN = "com.microsoft"
FLOAT = ir.DataType.FLOAT
DYNAMIC_OPS = frozenset({"MatMul", "Gemm", "LSTM"})  # rewritten unless ``op_types`` says
NO_DYNAMIC_KERNEL = {  # op types considered and left float whatever is selected (rule 5)
    "Conv": "dynamic Conv (ConvInteger) is not faster than fp32 on CPU; use static",
    "GRU": "ONNX Runtime has no int8 GRU kernel",
}


@dataclass
class DynamicQuantizePass(ir.passes.InPlacePass):
    """Apply the module's rules (weights as a resolved ``config`` says: per-channel, 7-bit);
    ``hessians`` maps MatMul node names to ``E[x x^T]`` of their input (GPTQ rounding);
    ``decisions`` records every candidate node."""

    config: QuantConfig
    hessians: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()
        self.decisions: list[NodeDecision] = []
        self._weights: dict[tuple[str, bool], tuple[ir.Value, ir.Value, ir.Value]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        selection = NodeSelection.from_config(self.config, DYNAMIC_OPS)
        rewrites = {"MatMul": self._matmul, "Gemm": self._gemm, "LSTM": self._lstm}
        known = rewrites.keys() | NO_DYNAMIC_KERNEL.keys()  # other selected types: no rule
        considered = known & (set(self.config.op_types) or known)
        for index, node in enumerate(list(graph)):
            if node.domain not in ("", "ai.onnx") or node.op_type not in considered:
                continue
            label = node_label(node, index)
            reason = NO_DYNAMIC_KERNEL.get(node.op_type) or selection.declined(node)
            if not reason:
                reason = rewrites[node.op_type](graph, node)
            quantized = reason.startswith("int8")
            self.decisions.append(NodeDecision(label, node.op_type, quantized, reason))
        remove_unused_initializers(model)
        return ir.passes.PassResult(model, modified=any(d.quantized for d in self.decisions))

    # -- rule 1 -------------------------------------------------------------------------------
    def _matmul(self, graph: ir.Graph, node: ir.Node) -> str:
        activation, weight = node.inputs
        if not is_constant(weight):
            return "no constant weight (activation x activation)"
        if not is_float32(weight) or len(weight.shape) != 2:
            return "weight is not a 2-D float32 constant"
        if not is_float32(activation) or is_constant(activation):
            return "left operand is not a float32 activation"
        output = node.outputs[0]
        hessian = self._shared_hessian(weight)
        result = self._emit_matmul(graph, node, activation, weight, transposed=False)
        _take_over(graph, node, output, result)
        gptq = rounding_hessian(self.config, hessian) is not None
        return "int8 DynamicQuantizeMatMul" + (" (GPTQ rounding)" if gptq else "")

    def _shared_hessian(self, weight: ir.Value) -> np.ndarray | None:
        """Mean Hessian of the MatMuls reading ``weight`` (``None`` if one has none)."""
        found = [self.hessians.get(use.node.name) for use in weight.uses()]
        if not found or any(h is None for h in found):
            return None
        return np.mean(found, axis=0)

    def _integer_weight(
        self, graph: ir.Graph, anchor: ir.Node, weight: ir.Value, transposed: bool
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``weight`` (transposed first if asked) as int8 levels, zero point and scale,
        made once per weight and reused by every reader (rule 4)."""
        key = (weight.name, transposed)
        if key not in self._weights:
            array = weight.const_value.numpy().astype(np.float32)
            if transposed:
                array = np.ascontiguousarray(array.T)
            hessian = None if transposed else self._shared_hessian(weight)
            axis = 1 if self.config.per_channel else None
            qp = self._weight_qparams(array, axis, anchor, hessian)
            levels = round_weight(anchor, array, qp, rounding_hessian(self.config, hessian))
            self._weights[key] = (
                add_initializer(graph, f"{weight.name}_quantized", levels),
                add_initializer(graph, f"{weight.name}_zero_point", qp.zero_point),
                add_initializer(graph, f"{weight.name}_scale", qp.scale),
            )
        return self._weights[key]

    def _emit_matmul(
        self,
        graph: ir.Graph,
        anchor: ir.Node,
        activation: ir.Value,
        weight: ir.Value,
        *,
        transposed: bool,
    ) -> ir.Value:
        """Insert rule 1's chain before ``anchor``; returns its float output."""
        w_q, w_zp, w_scale = self._integer_weight(graph, anchor, weight, transposed)
        name = anchor.name or weight.name
        a_q, a_scale, a_zp = (
            _typed(f"{name}_input_{part}", dtype)
            for part, dtype in (("q", ir.DataType.UINT8), ("s", FLOAT), ("zp", ir.DataType.UINT8))
        )
        product = _typed(f"{name}_int32", ir.DataType.INT32)
        as_float, scale, out = (
            _typed(f"{name}_{part}", FLOAT) for part in ("float", "out_scale", "matmul")
        )
        graph.insert_before(
            anchor,
            [
                ir.node("DynamicQuantizeLinear", [activation], outputs=[a_q, a_scale, a_zp]),
                ir.node("MatMulInteger", [a_q, w_q, a_zp, w_zp], outputs=[product]),
                ir.node("Cast", [product], {"to": ir.DataType.FLOAT}, outputs=[as_float]),
                ir.node("Mul", [a_scale, w_scale], outputs=[scale]),
                ir.node("Mul", [as_float, scale], outputs=[out]),
            ],
        )
        return out

    # -- rule 2 -------------------------------------------------------------------------------
    def _gemm(self, graph: ir.Graph, node: ir.Node) -> str:
        attrs = node.attributes
        if _int(attrs, "transA") or _float(attrs, "alpha") != 1 or _float(attrs, "beta") != 1:
            return "Gemm with transA or alpha/beta != 1"
        activation, weight = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if not (is_constant(weight) and is_float32(weight)) or not is_float32(activation):
            return "weight is not a float32 constant"
        if len(weight.shape) != 2:
            return "weight is not a 2-D float32 constant"
        output = node.outputs[0]
        transposed = bool(_int(attrs, "transB"))
        result = self._emit_matmul(graph, node, activation, weight, transposed=transposed)
        if bias is not None:
            biased = _typed(f"{node.name or weight.name}_biased", FLOAT)
            graph.insert_before(node, ir.node("Add", [result, bias], outputs=[biased]))
            result = biased
        _take_over(graph, node, output, result)
        return "int8 DynamicQuantizeMatMul"

    # -- rule 3 -------------------------------------------------------------------------------
    def _lstm(self, graph: ir.Graph, node: ir.Node) -> str:
        attrs = node.attributes
        if _int(attrs, "layout") or _int(attrs, "input_forget"):
            return "LSTM with layout=1 or input_forget has no int8 kernel"
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        w, r = inputs[1], inputs[2]
        if not all(is_constant(v) and is_float32(v) for v in (w, r)):
            return "LSTM weights are not float32 constants"
        quantized, scales = [], []
        for value in (w, r):
            array = np.ascontiguousarray(
                value.const_value.numpy().astype(np.float32).transpose(0, 2, 1)
            )  # [dirs, in, 4H]
            per_direction = [
                self._weight_qparams(a, 1 if self.config.per_channel else None) for a in array
            ]
            levels = np.stack([quantize(a, qp) for a, qp in zip(array, per_direction, strict=True)])
            scale = np.stack(
                [np.broadcast_to(qp.scale, per_direction[0].scale.shape) for qp in per_direction]
            )
            zero = np.zeros_like(scale, dtype=np.int8)
            quantized.append(add_initializer(graph, f"{value.name}_quantized", levels))
            scales += [
                add_initializer(graph, f"{value.name}_scale", scale.astype(np.float32)),
                add_initializer(graph, f"{value.name}_zero_point", zero),
            ]
        new_inputs = [inputs[0], quantized[0], quantized[1], *inputs[3:8], *scales]
        copied = {k: v for k, v in attrs.items() if k != "layout"}
        replacement = ir.Node(
            MS_DOMAIN,
            "DynamicQuantizeLSTM",
            new_inputs,
            copied.values(),
            num_outputs=len(node.outputs),
            name=node.name,
        )
        graph.insert_before(node, replacement)
        for old, new in zip(node.outputs, replacement.outputs, strict=True):
            _take_over(graph, None, old, new)
        graph.remove(node, safe=True)
        _ensure_opset(graph, MS_DOMAIN)
        return "int8 DynamicQuantizeLSTM"

    def _weight_qparams(
        self,
        array: np.ndarray,
        axis: int | None,
        anchor: ir.Node | None = None,
        hessian: np.ndarray | None = None,
    ) -> QParams:
        return layer_weight_qparams(
            self.config,
            anchor,
            array,
            hessian,
            qtype=QuantType.INT8,
            axis=axis,
            symmetric=True,
            reduce_range=bool(self.config.reduce_range),
        )


def quantize_dynamic_graph(
    model: ir.Model, config: QuantConfig, hessians: dict[str, np.ndarray] | None = None
) -> list[NodeDecision]:
    """Function twin of ``DynamicQuantizePass``: rewrites in place, returns the decisions."""
    rewrite = DynamicQuantizePass(config, hessians or {})
    rewrite(model)
    return rewrite.decisions


def _take_over(graph: ir.Graph, node: ir.Node | None, old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, keeps its name; ``node`` (if given) is removed."""
    name = old.name
    new.type, new.shape = old.type or new.type, old.shape or new.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if node is not None:
        graph.remove(node, safe=True)
    old.name = f"{name}_replaced"
    new.name = name


def _typed(name: str, dtype: ir.DataType) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype))


def _ensure_opset(graph: ir.Graph, domain: str) -> None:
    graph.opset_imports.setdefault(domain, 1)


def _int(attrs: dict, name: str) -> int:
    return attrs[name].as_int() if name in attrs else 0


def _float(attrs: dict, name: str) -> float:
    return attrs[name].as_float() if name in attrs else 1.0
