"""The trainable fake-quant module: onnxq's own QDQ graph, run by torch.

``QATModule`` is built from two graphs onnxq wrote for the same model: the prepared float graph
(BatchNorm folded, constants folded) and the static int8 QDQ graph the pipeline made from it.
Rules:

1. ``QuantizeLinear -> DequantizeLinear`` on an activation becomes one ``FakeQuantize`` per
   *root* tensor of the plan (``QuantPlan.activations``), so tensors that share qparams in the
   int8 model (pass-through chains) share one scale here too.
2. A ``DequantizeLinear`` of a constant integer weight ``q`` becomes a ``FakeQuantize`` of a
   trainable float weight. It starts from the prepared float graph's tensor ``w`` at the same
   node input (nodes keep their names through Q/DQ insertion), moved by whole steps into the
   bins of the stored levels: ``w + (q - clamp(round(w / s) + z)) * s``. It keeps its offset
   inside the bin (with nearest rounding it is ``w`` itself), and its fake quantization is
   exactly ``(q - z) * s``, GPTQ's levels included; an element float32 rounding would put
   elsewhere starts at ``(q - z) * s``. A weight shared by several DQs follows the first.
3. A ``DequantizeLinear`` of an int32 bias becomes a trainable float bias fake-quantized with
   ``scale = input_scale * weight_scale`` from the current scales.
4. Every other node runs its ``onnxq.qat.ops`` implementation; an op without one is refused
   (``UnsupportedModelError`` naming the op and node). Other constants stay fixed buffers:
   float ones, and int8 embedding tables with their row scales (``Gather -> Cast -> Mul``).
5. Initial scales and zero points are read from the QDQ graph: onnxq's post-training qparams.
6. A learnable activation scale of a Relu/Clip output is capped so its Q range stays inside
   the Clip's bounds (``fake_quant.clip_scale_ceiling``): ONNX Runtime then still drops the
   Clip and fuses the int8 kernel, as it does for the post-training model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxq.config import QuantConfig
from onnxq.errors import UnsupportedModelError
from onnxq.ir_io import to_proto
from onnxq.passes.op_rules import QUANTIZABLE_OPS
from onnxq.passes.plan import QuantPlan
from onnxq.qat.fake_quant import FakeQuantize, clip_scale_ceiling, fake_quantize_bias
from onnxq.qat.ops import OPS, OpFn
from onnxq.qparams import QParams, integer_bounds

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclass(frozen=True)
class _Step:
    """One node to run: an op (``fn``) or an activation fake quantization (``quantizer``)."""

    label: str
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]
    fn: OpFn | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    quantizer: int | None = None


@dataclass(frozen=True)
class _Bias:
    output: str
    latent: int
    activation: int
    weight: int


@dataclass(frozen=True)
class ExportSpec:
    """What ``export_qat`` needs besides the parameters: the prepared float model, the config
    it was quantized with, tensors the plan skipped, and which quantizer belongs where."""

    float_model: bytes
    config: QuantConfig
    skip_tensors: frozenset[str]
    roots: tuple[str, ...]
    latent_names: tuple[str, ...]
    weight_keys: dict[tuple[str, int], int]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


class QATModule(nn.Module):
    """Fake-quantized copy of a model (see module docstring); call it like the original.

    ``activation_quantizers[i]`` quantizes ``export_spec.roots[i]``; ``weights[i]`` is the float
    tensor ``export_spec.latent_names[i]`` of the prepared model.
    """

    def __init__(
        self,
        qdq: ir.Model,
        float_model: ir.Model,
        plan: QuantPlan,
        config: QuantConfig,
        *,
        skip_tensors: frozenset[str] = frozenset(),
        learn_scales: bool = False,
    ) -> None:
        super().__init__()
        builder = _Builder(float_model, plan, config, learn_scales)
        builder.read(qdq.graph)
        self.activation_quantizers = nn.ModuleList(builder.activation_fq)
        self.weight_quantizers = nn.ModuleList(builder.weight_fq)
        self.weights = nn.ParameterList(builder.latent)
        self._constant_names = list(builder.constants)
        for i, tensor in enumerate(builder.constants.values()):
            self.register_buffer(f"constant_{i}", tensor, persistent=False)
        self._weight_steps = builder.weight_steps
        self._biases = builder.biases
        self._steps = builder.steps
        graph = qdq.graph
        self.export_spec = ExportSpec(
            float_model=to_proto(float_model).SerializeToString(),
            config=config,
            skip_tensors=frozenset(skip_tensors),
            roots=tuple(builder.roots),
            latent_names=tuple(builder.latent_names),
            weight_keys=dict(builder.weight_keys),
            input_names=tuple(v.name for v in graph.inputs),
            output_names=tuple(v.name for v in graph.outputs),
        )
        self.signature = inspect.Signature(
            [
                inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                for name in self.export_spec.input_names
            ]
        )

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        env: dict[str, torch.Tensor] = dict(bound.arguments)
        for i, name in enumerate(self._constant_names):
            env[name] = getattr(self, f"constant_{i}")
        for name, weight in zip(self.export_spec.latent_names, self.weights, strict=True):
            env[name] = weight
        for output, quantizer, latent in self._weight_steps:
            env[output] = self.weight_quantizers[quantizer](self.weights[latent])
        for bias in self._biases:
            env[bias.output] = fake_quantize_bias(
                self.weights[bias.latent],
                self.activation_quantizers[bias.activation].scale,
                self.weight_quantizers[bias.weight].scale,
            )
        for step in self._steps:
            inputs = [None if name is None else env[name] for name in step.inputs]
            if step.quantizer is not None:
                result: Any = self.activation_quantizers[step.quantizer](inputs[0])
            else:
                result = step.fn(inputs, step.attrs)
            results = result if isinstance(result, (tuple, list)) else (result,)
            env.update(zip(step.outputs, results, strict=False))
        outputs = tuple(env[name] for name in self.export_spec.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def scale_parameters(self) -> list[nn.Parameter]:
        """The learnable scale parameters (empty unless ``learn_scales``)."""
        quantizers = [*self.activation_quantizers, *self.weight_quantizers]
        return [fq.log_gain for fq in quantizers if fq.learn_scale]

    def scales(self) -> dict[str, QParams]:
        """Current activation qparams per root tensor."""
        return {
            root: fq.qparams()
            for root, fq in zip(self.export_spec.roots, self.activation_quantizers, strict=True)
        }


class _Builder:
    """Reads a QDQ graph into the steps, quantizers and parameters of a ``QATModule``."""

    def __init__(
        self, float_model: ir.Model, plan: QuantPlan, config: QuantConfig, learn_scales: bool
    ) -> None:
        self.float_nodes = {node.name: node for node in float_model.graph}
        self.plan = plan
        self.config = config
        self.learn_scales = learn_scales
        self.activation_fq: list[FakeQuantize] = []
        self.roots: list[str] = []
        self.weight_fq: list[FakeQuantize] = []
        self.weight_keys: dict[tuple[str, int], int] = {}
        self.latent: list[nn.Parameter] = []
        self.latent_names: list[str] = []
        self.constants: dict[str, torch.Tensor] = {}
        self.weight_steps: list[tuple[str, int, int]] = []
        self.biases: list[_Bias] = []
        self.steps: list[_Step] = []
        self.dequantized: dict[str, int] = {}  # activation DQ output -> activation quantizer
        self.weight_outputs: dict[str, int] = {}  # weight DQ output -> weight quantizer
        self.aligned: set[int] = set()  # latent weights moved into their levels' bins

    def read(self, graph: ir.Graph) -> None:
        nodes = list(graph)
        skipped: set[int] = set()
        bias_nodes = []
        for node in nodes:
            if _is_qdq(node, "DequantizeLinear") and _is_constant(node.inputs[0]):
                skipped.add(id(node))
                if node.inputs[0].const_value.dtype == ir.DataType.INT32:
                    bias_nodes.append(node)
                else:
                    self._weight(node)
        for node in nodes:  # topological order: a Q comes before its DQ
            if id(node) in skipped:
                continue
            if _is_qdq(node, "QuantizeLinear"):
                skipped.add(id(self._activation(node)))
            elif _is_qdq(node, "DequantizeLinear"):
                raise UnsupportedModelError(
                    f"QAT: DequantizeLinear node {node.name!r} does not follow a QuantizeLinear"
                )
            else:
                self._op(node)
        for node in bias_nodes:
            self._bias(node)
        used = {name for step in self.steps for name in step.inputs if name is not None}
        used |= {v.name for v in graph.outputs}
        for name, value in graph.initializers.items():
            if name in used and name not in self.latent_names:
                self.constants[name] = _to_torch(value.const_value)

    # -- activations -------------------------------------------------------------------------
    def _activation(self, q: ir.Node) -> ir.Node:
        """``Q -> DQ`` of an activation: one step through the root's quantizer (rule 1)."""
        uses = list(q.outputs[0].uses())
        dq = uses[0].node if len(uses) == 1 else None
        if dq is None or not _is_qdq(dq, "DequantizeLinear"):
            raise UnsupportedModelError(
                f"QAT: QuantizeLinear node {q.name!r} does not feed exactly one DequantizeLinear"
            )
        name = q.inputs[0].name
        root = self.plan.activations.get(name)
        if root is None:
            raise UnsupportedModelError(f"QAT: tensor {name!r} is quantized but not in the plan")
        if root not in self.roots:
            qp = _qparams(q)
            qmin, qmax = (int(b) for b in _type_bounds(qp.zero_point.dtype))
            low, high = self._clip_bounds(root)
            ceiling = clip_scale_ceiling(low, high, qmin, qmax, int(qp.zero_point))
            self.roots.append(root)
            self.activation_fq.append(
                FakeQuantize(qp, qmin, qmax, learn_scale=self.learn_scales, max_scale=ceiling)
            )
        index = self.roots.index(root)
        output = dq.outputs[0].name
        self.dequantized[output] = index
        self.steps.append(_Step(q.name, (name,), (output,), quantizer=index))
        return dq

    def _clip_bounds(self, root: str) -> tuple[float | None, float | None]:
        """Constant bounds of the Relu/Clip that produces ``root`` in the float graph (rule 6),
        or ``(None, None)``."""
        value = next(
            (o for node in self.float_nodes.values() for o in node.outputs if o.name == root),
            None,
        )
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type not in ("Relu", "Clip"):
            return None, None
        if producer.op_type == "Relu":
            return 0.0, None
        bounds = [
            float(v.const_value.numpy()) if _is_constant(v) else None
            for v in [*producer.inputs[1:3], None, None][:2]
        ]
        return bounds[0], bounds[1]

    # -- weights and biases ------------------------------------------------------------------
    def _float_constant(self, dq: ir.Node) -> tuple[str, list[tuple[str, int]]]:
        """The prepared float tensor behind a constant DQ, and its readers (node, input)."""
        readers = [(use.node.name, use.idx) for use in dq.outputs[0].uses()]
        names = set()
        for node_name, index in readers:
            node = self.float_nodes.get(node_name)
            value = node.inputs[index] if node is not None and index < len(node.inputs) else None
            if value is None or not _is_constant(value):
                raise UnsupportedModelError(
                    f"QAT: no float weight for input {index} of node {node_name!r}"
                )
            names.add(value.name)
            if value.name not in self.latent_names:
                self.latent_names.append(value.name)
                self.latent.append(nn.Parameter(_to_torch(value.const_value).float()))
        if len(names) != 1:
            raise UnsupportedModelError(f"QAT: {dq.name!r} dequantizes several float weights")
        return names.pop(), readers

    def _weight(self, dq: ir.Node) -> None:
        """Rule 2."""
        name, readers = self._float_constant(dq)
        qtype = self.config.weight_type
        qmin, qmax = integer_bounds(
            qtype, symmetric=qtype.signed, reduce_range=bool(self.config.reduce_range)
        )
        qp = _qparams(dq)
        narrowed = (qmin, qmax) if (qmin, qmax) != _type_bounds(qp.zero_point.dtype) else None
        qp = QParams(qp.scale, qp.zero_point, qp.axis, narrowed)
        index = len(self.weight_fq)
        quantizer = FakeQuantize(qp, qmin, qmax, learn_scale=self.learn_scales)
        self.weight_fq.append(quantizer)
        latent = self.latent_names.index(name)
        if latent not in self.aligned:
            self.aligned.add(latent)
            _align_to_levels(self.latent[latent], quantizer, _to_torch(dq.inputs[0].const_value))
        for reader in readers:
            self.weight_keys[reader] = index
        self.weight_outputs[dq.outputs[0].name] = index
        self.weight_steps.append((dq.outputs[0].name, index, latent))

    def _bias(self, dq: ir.Node) -> None:
        """Rule 3: the reader's input 0 is an activation DQ, its weight input a weight DQ."""
        name, readers = self._float_constant(dq)
        (node_name, _), *_ = readers
        node = next(use.node for use in dq.outputs[0].uses())
        rule = QUANTIZABLE_OPS.get(node.op_type)
        weight = node.inputs[rule.weight_input] if rule and rule.weight_input is not None else None
        activation = self.dequantized.get(node.inputs[0].name)
        weight_fq = self.weight_outputs.get(weight.name) if weight is not None else None
        if len(readers) != 1 or activation is None or weight_fq is None:
            raise UnsupportedModelError(
                f"QAT: int32 bias of node {node_name!r} has no quantized input and weight"
            )
        self.biases.append(
            _Bias(dq.outputs[0].name, self.latent_names.index(name), activation, weight_fq)
        )

    # -- float ops ---------------------------------------------------------------------------
    def _op(self, node: ir.Node) -> None:
        """Rule 4 (``Constant`` nodes become fixed buffers)."""
        label = node.name or node.op_type
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS | {"Constant": None}:
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            raise UnsupportedModelError(
                f"QAT does not support op {domain}{node.op_type} (node {label!r})"
            )
        attrs = {}
        for key, attr in node.attributes.items():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise UnsupportedModelError(
                    f"QAT does not support control flow: op {node.op_type} (node {label!r})"
                )
            value = attr.value
            attrs[key] = _to_torch(value) if isinstance(value, ir.TensorProtocol) else value
        if node.op_type == "Constant":
            if "value" not in attrs:
                raise UnsupportedModelError(f"QAT: Constant node {label!r} has no tensor value")
            self.constants[node.outputs[0].name] = attrs["value"]
            return
        self.steps.append(
            _Step(
                label,
                tuple(None if v is None else v.name for v in node.inputs),
                tuple(v.name for v in node.outputs),
                fn=OPS[node.op_type],
                attrs=attrs,
            )
        )


def _align_to_levels(weight: nn.Parameter, quantizer: FakeQuantize, levels: torch.Tensor) -> None:
    """Move ``weight`` in place by whole steps so ``quantizer(weight)`` dequantizes ``levels``
    (rule 2)."""
    with torch.no_grad():
        scale = quantizer.broadcast(quantizer.scale, weight.ndim)
        zero = quantizer.broadcast(quantizer.zero_point, weight.ndim)
        target = (levels.float() - zero) * scale
        nearest = torch.clamp(torch.round(weight / scale) + zero, quantizer.qmin, quantizer.qmax)
        moved = weight + (levels.float() - nearest) * scale
        weight.copy_(torch.where(quantizer(moved) == target, moved, target))


def _is_qdq(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in _QDQ_DOMAINS


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    return torch.from_numpy(np.array(tensor.numpy(), copy=True))


def _type_bounds(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _qparams(node: ir.Node) -> QParams:
    """Scale, zero point and axis of a Q or DQ node with constant qparams."""
    scale_value, zero_value = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if not _is_constant(scale_value) or not _is_constant(zero_value):
        raise UnsupportedModelError(f"QAT: {node.op_type} {node.name!r} has non-constant qparams")
    scale = np.asarray(scale_value.const_value.numpy(), dtype=np.float32)
    zero = np.asarray(zero_value.const_value.numpy())
    axis = None
    if scale.ndim:
        axis = node.attributes.get_int("axis", 1)
    return QParams(scale, zero, axis)
