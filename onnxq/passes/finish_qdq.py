"""Finish a QDQ model written by another tool, keeping its own qparams.

QAT exporters (torch.ao, pt2e, ModelOpt) write Q/DQ pairs that say what to quantize, but the
file is not what ONNX Runtime fuses into int8 kernels: weights stay float behind a
QuantizeLinear, biases float, BatchNorm arithmetic or a Relu sits between an op and its Q.
``FinishQDQPass`` rewrites the main graph without inventing a qparam. Rewrite rules, in order
(``REWRITES``):

1. ``validate``: every Q/DQ has constant qparams; activation Q/DQ are uint8/int8; a float tensor
   read by several Qs, or a Q's integers read by a DQ, use one set of qparams. Otherwise
   ``UnsupportedModelError`` naming the node.
2. ``fold-weight``: ``Q(float constant W)`` becomes the integer initializer it computes
   (round half to even, saturated): the DQ reads int8 levels, the file shrinks about 4x. Exact.
3. ``integer-clip``: an integer ``Clip`` of constant levels is folded into them; ``Q -> Clip ->
   DQ`` on an activation (torch's ``(0, 127)`` reduce-range fake quant) becomes a float ``Clip``
   to ``(level - zero_point) * scale`` before the Q: ``Q(clip(x)) == clip(Q(x))``. Exact.
4. ``weight-clip``: ``DQ(levels) -> Clip`` on a weight is folded into the levels when the
   clipped values lie on the DQ's grid (exact), else kept with a reason.
5. ``requantize``: ``DQ -> Q`` with the same qparams is the identity on integers, also with
   Relu/Clips between them that change no integer of the Q (below): the Q reads the DQ's
   input, so ``Q -> DQ -> Relu -> Q -> DQ`` chains collapse. Exact.
6. ``fold-affine``: per-channel Mul/Div/Add/Sub/BatchNormalization after a Conv/Gemm with a DQ
   weight fold into its weight scale and a float bias (``onnxq.passes.fold_qdq_affine``).
   Exact up to float32 rounding.
7. ``activation-before-q``: a Relu/Clip between an op and its Q stays where it is. Where the Q
   alone writes the same integers (``Q(low) == qmin`` and ``Q(high) == qmax``: a Relu before a Q
   whose zero point is its type's minimum), ONNX Runtime removes it at load and fuses the op,
   as it does in onnxq's own models. Otherwise (a Relu before a symmetric int8 Q, a ReLU6 or
   torch's reduce-range Clip inside the Q's range) dropping it is not exact: the reason is
   recorded.
8. ``int32-bias`` (where the target stores int32 biases): the float constant bias of a Conv/Gemm
   reading a DQ activation (directly or through pass-through ops such as MaxPool, which keep
   its qparams) and a DQ weight becomes int32 with ``scale = input_scale *
   weight_scale``, zero point 0, behind a DQ. The bias rounds to its scale (at most half of one
   accumulator unit); a bias that overflows int32 stays float, with the reason.
9. Nodes and initializers left without readers are removed.

What was folded or repaired goes to ``FinishLog.changes`` (rule -> node labels), what could not
be to ``FinishLog.blocked`` (one line each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.errors import UnsupportedModelError
from onnxq.passes.fold_constants import remove_unused_initializers
from onnxq.passes.fold_qdq_affine import fold_affine_chain
from onnxq.passes.naming import add_initializer
from onnxq.passes.op_rules import PASS_THROUGH_OPS, QUANTIZABLE_OPS
from onnxq.passes.qdq_nodes import (
    ACTIVATION_OPS,
    QDQ,
    activation_qdq,
    clip_bounds,
    constant_array,
    is_dq,
    is_noop_under,
    is_q,
    label,
    qdq_of,
)
from onnxq.qparams import INT32_MAX, dequantize, quantize

BIASED_OPS = {"Conv": 2, "Gemm": 2}
"""Ops with an int32 bias in ONNX Runtime's int8 kernels, and their bias input."""


@dataclass
class FinishLog:
    """What ``FinishQDQPass`` changed (``changes``: rule -> node labels) and what it could not
    (``blocked``: one line each)."""

    changes: dict[str, list[str]] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)

    def changed(self, rule: str, node: str) -> None:
        self.changes.setdefault(rule, []).append(node)

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": {rule: list(nodes) for rule, nodes in self.changes.items()},
            "blocked": list(self.blocked),
        }


class FinishQDQPass(ir.passes.InPlacePass):
    """Rewrite a QDQ model's main graph so ONNX Runtime fuses its int8 kernels (module
    docstring); ``int32_bias``: rule 8 applies (the target stores int32 biases)."""

    def __init__(self, *, int32_bias: bool = True, log: FinishLog | None = None) -> None:
        super().__init__()
        self.int32_bias = int32_bias
        self.log = FinishLog() if log is None else log

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before = {rule: len(nodes) for rule, nodes in self.log.changes.items()}
        for rule, rewrite in REWRITES:
            if rule != "int32-bias" or self.int32_bias:
                rewrite(graph, self.log)
        common_passes.RemoveUnusedNodesPass()(model)
        remove_unused_initializers(model)
        after = {rule: len(nodes) for rule, nodes in self.log.changes.items()}
        return ir.passes.PassResult(model, modified=after != before)


def finish_qdq_graph(model: ir.Model, *, int32_bias: bool = True) -> FinishLog:
    """Function twin of ``FinishQDQPass``: rewrites ``model`` in place, returns the log."""
    log = FinishLog()
    FinishQDQPass(int32_bias=int32_bias, log=log)(model)
    return log


def _validate(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 1."""
    quantized: dict[int, tuple[ir.Node, QDQ]] = {}  # float tensor -> its first Q
    for node in graph:
        if is_q(node):
            source = node.inputs[0]
            if constant_array(source) is not None:
                qdq = qdq_of(node)
                _require_8bit(node, qdq)
                continue
            qdq = activation_qdq(node)
            first = quantized.setdefault(id(source), (node, qdq))
            if not first[1].same_as(qdq):
                raise UnsupportedModelError(
                    f"node {label(node)!r} quantizes {source.name!r} with other qparams than "
                    f"node {label(first[0])!r}; onnxq finishes one scheme per tensor"
                )
        elif is_dq(node):
            if constant_array(node.inputs[0]) is not None:
                qdq_of(node)
                continue
            qdq = activation_qdq(node)
            producer = node.inputs[0].producer()
            if producer is not None and is_q(producer) and not qdq_of(producer).same_as(qdq):
                raise UnsupportedModelError(
                    f"node {label(node)!r} dequantizes {node.inputs[0].name!r} with other "
                    f"qparams (scale or zero point) than node {label(producer)!r} quantized it"
                )


def _require_8bit(node: ir.Node, qdq: QDQ) -> None:
    if qdq.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        raise UnsupportedModelError(
            f"node {label(node)!r} (QuantizeLinear) quantizes a weight to "
            f"{qdq.dtype.name.lower()}; onnxq finishes uint8/int8 Q/DQ models only"
        )


def _fold_weight(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 2."""
    for node in list(graph):
        weight = constant_array(node.inputs[0]) if is_q(node) else None
        if weight is None or not np.issubdtype(weight.dtype, np.floating):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        levels = quantize(weight.astype(np.float32), qdq_of(node).qparams)
        value = add_initializer(graph, f"{node.inputs[0].name}_quantized", levels)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        log.changed("fold-weight", label(node))


def _integer_clip(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 3."""
    for clip in list(graph):
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx"):
            continue
        source = clip.inputs[0]
        bounds = clip_bounds(clip)
        if source is None or bounds is None:
            continue
        levels = constant_array(source)
        producer = source.producer()
        if levels is not None and np.issubdtype(levels.dtype, np.integer):
            clipped = np.clip(levels, *bounds).astype(levels.dtype)
            clip.outputs[0].replace_all_uses_with(
                add_initializer(graph, f"{source.name}_clipped", clipped)
            )
            graph.remove(clip, safe=True)
            log.changed("integer-clip", label(clip))
            continue
        if levels is not None or producer is None or not is_q(producer):
            continue
        reason = _move_integer_clip(graph, clip, bounds)
        if reason:
            log.blocked.append(reason)
        else:
            log.changed("integer-clip", label(clip))


def _move_integer_clip(graph: ir.Graph, clip: ir.Node, bounds: tuple[float, float]) -> str:
    """``Q -> Clip -> DQ`` becomes ``Clip(float) -> Q -> DQ``; the reason when it cannot."""
    q = clip.inputs[0].producer()
    if len(clip.inputs[0].uses()) != 1:
        return f"integer Clip {label(clip)!r}: its Q has other readers: kept"
    qdq = qdq_of(q)
    if not qdq.per_tensor:
        return f"integer Clip {label(clip)!r} after a per-channel Q: kept"
    info = np.iinfo(qdq.zero_point.dtype)
    low, high = (qdq.float_at(np.clip(b, info.min, info.max)) for b in bounds)
    expected = (max(bounds[0], info.min), min(bounds[1], info.max))
    if (qdq.integer_at(low), qdq.integer_at(high)) != expected:
        return f"integer Clip {label(clip)!r}: its bounds are not levels of the Q: kept"
    low_value, high_value = (
        add_initializer(graph, f"{label(clip)}_{end}", np.asarray(bound, np.float32).reshape(()))
        for end, bound in (("min", low), ("max", high))
    )
    float_clip = ir.node("Clip", [q.inputs[0], low_value, high_value], name=f"{label(clip)}_float")
    float_clip.outputs[0].name = f"{q.inputs[0].name}_clipped"
    float_clip.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.insert_before(q, float_clip)
    q.replace_input_with(0, float_clip.outputs[0])
    clip.outputs[0].replace_all_uses_with(q.outputs[0], replace_graph_outputs=True)
    graph.remove(clip, safe=True)
    return ""


def _weight_clip(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 4."""
    for clip in list(graph):
        dq = clip.inputs[0].producer() if clip.op_type == "Clip" and clip.inputs else None
        if dq is None or not is_dq(dq) or constant_array(dq.inputs[0]) is None:
            continue
        bounds = clip_bounds(clip)
        if bounds is None or len(dq.outputs[0].uses()) != 1:
            continue
        qparams = qdq_of(dq).qparams
        levels = constant_array(dq.inputs[0])
        clipped = np.clip(dequantize(levels, qparams), *bounds)
        refit = quantize(clipped, qparams)
        if not np.array_equal(dequantize(refit, qparams), clipped):
            log.blocked.append(
                f"Clip {label(clip)!r} after weight DQ {label(dq)!r} clips off the integer "
                "grid: kept"
            )
            continue
        dq.replace_input_with(0, add_initializer(graph, f"{dq.inputs[0].name}_clipped", refit))
        clip.outputs[0].replace_all_uses_with(dq.outputs[0], replace_graph_outputs=True)
        graph.remove(clip, safe=True)
        log.changed("weight-clip", label(clip))


def _requantize(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 5."""
    for q in list(graph):
        if not is_q(q) or q.inputs[0] is None or q.outputs[0].is_graph_output():
            continue
        qdq = qdq_of(q)
        value = q.inputs[0]
        while (producer := value.producer()) is not None and is_noop_under(producer, qdq):
            if len(value.uses()) != 1:
                break
            value = producer.inputs[0]
        dq = value.producer()
        if dq is None or not is_dq(dq) or not qdq_of(dq).same_as(qdq):
            continue
        q.outputs[0].replace_all_uses_with(dq.inputs[0])
        graph.remove(q, safe=True)
        log.changed("requantize", label(q))


def _fold_affine(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 6."""
    for op in list(graph):
        if op.op_type not in BIASED_OPS:
            continue
        folded, reason = fold_affine_chain(graph, op)
        for name in folded:
            log.changed("fold-affine", name)
        if reason:
            log.blocked.append(reason)


def _activation_before_q(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 7."""
    for node in graph:
        if node.op_type not in ACTIVATION_OPS or node.domain not in ("", "ai.onnx"):
            continue
        readers = [use.node for use in node.outputs[0].uses()]
        if not readers or not all(map(is_q, readers)):
            continue
        qdq = qdq_of(readers[0])
        if is_noop_under(node, qdq) or not qdq.per_tensor:
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        while producer is not None and producer.op_type in ACTIVATION_OPS:
            producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        if producer is None or producer.op_type not in QUANTIZABLE_OPS:
            continue
        bounds = (0.0, np.inf) if node.op_type == "Relu" else clip_bounds(node)
        shown = "" if bounds is None else f" clips to [{bounds[0]:.4g}, {bounds[1]:.4g}],"
        low, high = qdq.integer_range()
        log.blocked.append(
            f"{node.op_type} {label(node)!r} after {producer.op_type} {label(producer)!r}"
            f"{shown} inside its Q's range [{low:.4g}, {high:.4g}]: dropping it is not exact, "
            f"so ORT runs {label(producer)!r} in float"
        )


def _int32_bias(graph: ir.Graph, log: FinishLog) -> None:
    """Rule 8."""
    for op in list(graph):
        index = BIASED_OPS.get(op.op_type)
        if index is None or len(op.inputs) <= index or op.inputs[index] is None:
            continue
        bias = constant_array(op.inputs[index])
        scales = _input_and_weight_scales(op)
        if bias is None or scales is None or not np.issubdtype(bias.dtype, np.floating):
            continue
        if bias.ndim != 1 or any(op.attributes.get_float(k, 1.0) != 1.0 for k in ("alpha", "beta")):
            log.blocked.append(f"{label(op)!r}: bias is not 1-D (or Gemm alpha/beta != 1): float")
            continue
        scale = np.asarray(np.float32(scales[0]) * scales[1], dtype=np.float32)
        ratio = np.abs(bias.astype(np.float64) / scale.astype(np.float64))
        if not np.all(ratio <= INT32_MAX):
            log.blocked.append(
                f"{label(op)!r}: bias overflows int32 at scale input_scale * weight_scale: "
                "kept float, ORT runs it in float"
            )
            continue
        levels = np.rint(bias.astype(np.float64) / scale.astype(np.float64)).astype(np.int32)
        name = op.inputs[index].name
        dq = ir.node(
            "DequantizeLinear",
            [
                add_initializer(graph, f"{name}_int32", levels),
                add_initializer(graph, f"{name}_int32_scale", scale),
                add_initializer(graph, f"{name}_int32_zero_point", np.zeros_like(scale, np.int32)),
            ],
            {"axis": 0} if scale.size > 1 else {},
            name=f"{name}_DequantizeLinear",
        )
        dq.outputs[0].name = f"{name}_dequantized"
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(op, dq)
        op.replace_input_with(index, dq.outputs[0])
        log.changed("int32-bias", label(op))


def _input_and_weight_scales(op: ir.Node) -> tuple[float, np.ndarray] | None:
    """The per-tensor scale of ``op``'s DQ input and its DQ weight's scale(s), when both
    come from DQs (the weight of constant integers)."""
    producers = [_through_pass_through(value) for value in op.inputs[:2]]
    if len(producers) < 2 or not all(p is not None and is_dq(p) for p in producers):
        return None
    activation, weight = producers
    if constant_array(activation.inputs[0]) is not None:
        return None
    if constant_array(weight.inputs[0]) is None:
        return None
    input_qdq, weight_qdq = qdq_of(activation), qdq_of(weight)
    if not input_qdq.per_tensor:
        return None
    weight_scale = weight_qdq.scale.reshape(() if weight_qdq.per_tensor else -1)
    return float(input_qdq.scale.reshape(())), weight_scale


def _through_pass_through(value: ir.Value | None) -> ir.Node | None:
    """The producer of ``value``, looking through ops that only move values (MaxPool,
    Reshape, ...: ORT moves the DQ past them with the same qparams)."""
    producer = value.producer() if value is not None else None
    while producer is not None and producer.op_type in PASS_THROUGH_OPS and producer.inputs:
        source = producer.inputs[0]
        producer = source.producer() if source is not None else None
    return producer


REWRITES: tuple[tuple[str, Callable[[ir.Graph, FinishLog], None]], ...] = (
    ("validate", _validate),
    ("fold-weight", _fold_weight),
    ("integer-clip", _integer_clip),
    ("weight-clip", _weight_clip),
    ("requantize", _requantize),
    ("fold-affine", _fold_affine),
    ("activation-before-q", _activation_before_q),
    ("int32-bias", _int32_bias),
)
"""The rules of the module docstring, in the order they run."""
