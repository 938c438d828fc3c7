"""Rewrite a float graph into a QDQ graph following a ``QuantPlan``.

Rewrite rules (``InsertQDQPass``):
1. Activation ``t`` -> ``QuantizeLinear(t) -> DequantizeLinear``. When ``t``'s producer runs
   in int8, every reader of ``t`` switches to the DQ output (the producer then feeds only the Q
   and ORT fuses it); otherwise only quantized readers do and float readers keep the exact
   value. Graph outputs keep the float tensor unless ``quantize_outputs``.
2. Weight ``W`` -> int8 (or uint8) initializer -> ``DequantizeLinear`` (``axis`` when
   per-channel and the target allows it for the op). The float initializer is dropped once
   nothing else reads it, so the file shrinks about 4x. Weight qparams given by the caller
   (``weight_qparams``: scales learned by QAT) replace the computed min-max/MSE ones.
3. Conv/Gemm bias ``b`` -> int32 initializer with ``scale = input_scale * weight_scale``,
   zero point 0 -> ``DequantizeLinear``, where the target's bias form is int32 (else it stays
   float). Weight scales are raised first where the int32 bias would overflow.
4. Scale and zero-point initializers are shared by every Q/DQ of the same root tensor.
5. Q/DQ of 16-bit activations below opset 21 are written in the ``com.microsoft`` domain
   (the target's ``wide_qdq_domain``), which ONNX Runtime runs at any opset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.passes.naming import add_initializer
from onnxq.passes.op_rules import OpRule, weight_axis
from onnxq.passes.opset import default_opset
from onnxq.passes.plan import QuantPlan, is_constant, is_float32
from onnxq.passes.weight_rounding import layer_weight_qparams, round_weight, rounding_hessian
from onnxq.qparams import QParams, fit_weight_scale_to_bias, quantize_bias
from onnxq.targets import BiasForm, get_target

WIDE_QDQ_OPSET = 21  # 16-bit (and 4-bit) Q/DQ in the default domain


class InsertQDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ pairs and quantized initializers (see module docstring); ``config`` is
    resolved (``QuantConfig.resolved``)."""

    def __init__(
        self,
        plan: QuantPlan,
        activation_qparams: Mapping[str, QParams],
        config: QuantConfig,
        *,
        hessians: Mapping[str, np.ndarray] | None = None,
        rounded: dict | None = None,
        weight_qparams: Mapping[tuple[str, int], QParams] | None = None,
    ) -> None:
        super().__init__()
        self.weight_qparams = weight_qparams or {}
        self.rounded = {} if rounded is None else rounded
        self.plan = plan
        self.activation_qparams = activation_qparams
        self.config = config
        self.hessians = hessians or {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        wide = (self.config.activation_type.bits > 8) and (
            (default_opset(model) or WIDE_QDQ_OPSET) < WIDE_QDQ_OPSET
        )
        activation_domain = get_target(self.config.target).wide_qdq_domain if wide else ""
        if activation_domain:
            model.opset_imports.setdefault(activation_domain, 1)
        rewriter = _Rewriter(
            model.graph,
            self.activation_qparams,
            self.config,
            self.hessians,
            self.rounded,
            activation_domain,
            self.weight_qparams,
        )
        int8_readers = {id(node) for node, _ in self.plan.nodes} | {
            id(node)
            for node in model.graph
            if any(o.name in self.plan.int8_produced for o in node.outputs)
        }
        for name, root in self.plan.activations.items():
            readers = None if name in self.plan.int8_produced else int8_readers
            rewriter.quantize_activation(name, root, readers)
        for node, rule in self.plan.nodes:
            rewriter.quantize_constants(node, rule)
        rewriter.drop_unused_initializers()
        model.graph.sort()
        return ir.passes.PassResult(model, modified=bool(self.plan.activations or self.plan.nodes))


def insert_qdq(
    model: ir.Model,
    plan: QuantPlan,
    activation_qparams: Mapping[str, QParams],
    config: QuantConfig,
    *,
    hessians: Mapping[str, np.ndarray] | None = None,
    rounded: dict | None = None,
    weight_qparams: Mapping[tuple[str, int], QParams] | None = None,
) -> ir.Model:
    """Function twin of ``InsertQDQPass`` (rewrites ``model`` in place and returns it).

    ``hessians`` maps node names to ``E[x x^T]`` of their input; those nodes' weights get
    GPTQ rounding (``onnxq.passes.weight_rounding``) when the config asks for it, the rest
    round to nearest, and MSE weight ranges weigh each weight by its input's ``E[x**2]``.
    ``rounded``, when given, memoises the integer weights across calls (variants of one model).
    ``weight_qparams`` maps ``(node name, input index)`` to the qparams that weight must use
    (e.g. scales learned by quantization-aware training) instead of its own min-max or MSE ones.
    """
    insert = InsertQDQPass(
        plan,
        activation_qparams,
        config,
        hessians=hessians,
        rounded=rounded,
        weight_qparams=weight_qparams,
    )
    return insert(model).model


class _Rewriter:
    """Graph edits for one pass run; caches shared initializers and weight DQs."""

    def __init__(
        self,
        graph: ir.Graph,
        activation_qparams: Mapping[str, QParams],
        config: QuantConfig,
        hessians: Mapping[str, np.ndarray],
        rounded: dict,
        activation_domain: str = "",
        weight_qparams: Mapping[tuple[str, int], QParams] | None = None,
    ) -> None:
        self.graph = graph
        self.given_weight_qparams = weight_qparams or {}
        self.hessians = hessians
        self.rounded = rounded
        self.activation_qparams = activation_qparams
        self.config = config
        self.target = get_target(config.target)
        self.reduce_range = bool(config.reduce_range)
        self.activation_domain = activation_domain
        self.values = {v.name: v for v in _all_values(graph)}
        self.qparam_inputs: dict[tuple[str, bytes, bytes], tuple[ir.Value, ir.Value]] = {}
        self.weight_dq: dict[tuple[str, int | None, bytes], tuple[ir.Value, QParams]] = {}
        self.dequantized_roots: dict[int, str] = {}  # id(DQ output value) -> root tensor

    # -- activations -------------------------------------------------------------------------
    def quantize_activation(self, name: str, root: str, readers: set[int] | None) -> None:
        """Q/DQ pair on ``name``; ``readers`` (node ids) switch to the DQ output, or every
        reader when ``None``."""
        value = self.values[name]
        qp = self.activation_qparams[root]
        scale, zero_point = self._qparam_values(root, qp)
        quantized = ir.Value(name=f"{name}_quantized")
        dequantized = ir.Value(
            name=f"{name}_dequantized", shape=value.shape, type=ir.TensorType(ir.DataType.FLOAT)
        )
        q_node = ir.Node(
            self.activation_domain,
            "QuantizeLinear",
            [value, scale, zero_point],
            outputs=[quantized],
            name=f"{name}_QuantizeLinear",
        )
        dq_node = ir.Node(
            self.activation_domain,
            "DequantizeLinear",
            [quantized, scale, zero_point],
            outputs=[dequantized],
            name=f"{name}_DequantizeLinear",
        )
        self.dequantized_roots[id(dequantized)] = root
        for use in list(value.uses()):
            if use.node is not q_node and (readers is None or id(use.node) in readers):
                use.node.replace_input_with(use.idx, dequantized)
        if value.is_graph_output() and self.config.quantize_outputs:
            self._move_graph_output(value, dequantized)
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, [q_node, dq_node])
        else:
            self.graph.insert_before(next(iter(self.graph)), [q_node, dq_node])

    def _move_graph_output(self, value: ir.Value, dequantized: ir.Value) -> None:
        """The graph output keeps its name and now carries the DQ output."""
        outputs = self.graph.outputs
        name = value.name
        value.name = f"{name}_float"
        dequantized.name = name
        for i, out in enumerate(outputs):
            if out is value:
                outputs[i] = dequantized

    # -- weights and biases ------------------------------------------------------------------
    def quantize_constants(self, node: ir.Node, rule: OpRule) -> None:
        weight_indices = [rule.weight_input] if rule.weight_input is not None else []
        if rule.constant_operands_ok:
            weight_indices = [i for i, v in enumerate(node.inputs) if is_constant(v)]
        bias = None
        if rule.bias_input is not None and len(node.inputs) > rule.bias_input:
            bias = node.inputs[rule.bias_input]
        for index in weight_indices:
            weight = node.inputs[index]
            if weight is None or not is_float32(weight):
                continue
            bias_ok = index == rule.weight_input and self._bias_quantizable(node, bias)
            dq, qp = self._weight(node, index, weight, bias if bias_ok else None)
            node.replace_input_with(index, dq)
            if bias_ok:
                self._quantize_bias(node, rule.bias_input, bias, qp)

    def _bias_quantizable(self, node: ir.Node, bias: ir.Value | None) -> bool:
        """A bias is int32-quantized only where the target stores int32 biases, when it is a 1-D
        float constant of a node whose input is quantized (and, for Gemm, ``alpha == beta ==
        1``)."""
        if self.target.bias is not BiasForm.INT32:
            return False
        if bias is None or not is_constant(bias) or not is_float32(bias):
            return False
        if len(bias.const_value.shape) != 1 or self._input_qparams(node) is None:
            return False
        return all(
            node.attributes[attr].as_float() == 1.0
            for attr in ("alpha", "beta")
            if attr in node.attributes
        )

    def _weight(
        self, node: ir.Node, index: int, weight: ir.Value, bias: ir.Value | None
    ) -> tuple[ir.Value, QParams]:
        array = weight.const_value.numpy().astype(np.float32)
        per_channel = self.config.per_channel and node.op_type in self.target.per_channel_ops
        axis = weight_axis(node, index, array.ndim) if per_channel else None
        symmetric = self.config.weight_type.signed
        hessian = self.hessians.get(node.name) if index == 1 else None
        kw = {"symmetric": symmetric, "reduce_range": self.reduce_range}
        qp = self.given_weight_qparams.get((node.name, index)) or layer_weight_qparams(
            self.config, node, array, hessian, qtype=self.config.weight_type, axis=axis, **kw
        )
        if bias is not None:
            input_scale = self._input_scale(node)
            bias_array = bias.const_value.numpy()
            if qp.axis is not None and qp.scale.shape != bias_array.shape:
                qp = layer_weight_qparams(
                    self.config, node, array, None, qtype=self.config.weight_type, axis=None, **kw
                )
            limit = np.abs(bias_array).max() if qp.axis is None else np.abs(bias_array)
            scale = fit_weight_scale_to_bias(qp.scale, input_scale, np.asarray(limit))
            qp = replace(qp, scale=scale.reshape(qp.scale.shape))
        hessian = rounding_hessian(self.config, hessian)
        key = (weight.name, qp.axis, qp.scale.tobytes())
        if key not in self.weight_dq:
            memo = (node.name, weight.name, qp.scale.tobytes(), hessian is not None)
            levels = self.rounded.get(memo)
            if levels is None:
                levels = self.rounded[memo] = round_weight(node, array, qp, hessian)
            dq = self._dequantized_constant(node, weight.name, levels, qp, weight.shape)
            self.weight_dq[key] = (dq, qp)
        return self.weight_dq[key]

    def _quantize_bias(self, node: ir.Node, index: int, bias: ir.Value, weight_qp: QParams) -> None:
        q_bias, qp = quantize_bias(
            bias.const_value.numpy(), self._input_scale(node), weight_qp.scale
        )
        dq = self._dequantized_constant(node, f"{bias.name}_{node.name}", q_bias, qp, bias.shape)
        node.replace_input_with(index, dq)

    def _input_qparams(self, node: ir.Node) -> QParams | None:
        """QParams of the node's first input when it reads one of our DQ outputs."""
        root = self.dequantized_roots.get(id(node.inputs[0]))
        return None if root is None else self.activation_qparams[root]

    def _input_scale(self, node: ir.Node) -> float:
        return float(self._input_qparams(node).scale)

    # -- helpers -----------------------------------------------------------------------------
    def _dequantized_constant(
        self, node: ir.Node, name: str, levels: np.ndarray, qp: QParams, shape: ir.Shape | None
    ) -> ir.Value:
        """Integer initializer ``{name}_quantized`` -> DequantizeLinear, placed before ``node``."""
        quantized = add_initializer(self.graph, f"{name}_quantized", levels)
        scale, zero_point = self._qparam_values(name, qp)
        dq = ir.Value(
            name=f"{name}_dequantized", shape=shape, type=ir.TensorType(ir.DataType.FLOAT)
        )
        attributes = {"axis": qp.axis} if qp.axis is not None else {}
        self.graph.insert_before(
            node,
            ir.node(
                "DequantizeLinear",
                [quantized, scale, zero_point],
                attributes,
                outputs=[dq],
                name=f"{name}_DequantizeLinear",
            ),
        )
        return dq

    def _qparam_values(self, owner: str, qp: QParams) -> tuple[ir.Value, ir.Value]:
        key = (owner, qp.scale.tobytes(), qp.zero_point.tobytes())
        if key not in self.qparam_inputs:
            self.qparam_inputs[key] = (
                add_initializer(self.graph, f"{owner}_scale", qp.scale),
                add_initializer(self.graph, f"{owner}_zero_point", qp.zero_point),
            )
        return self.qparam_inputs[key]

    def drop_unused_initializers(self) -> None:
        for name, value in list(self.graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                del self.graph.initializers[name]


def _all_values(graph: ir.Graph) -> list[ir.Value]:
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in graph:
        values.extend(node.outputs)
    return values
