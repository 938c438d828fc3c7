"""Fold per-channel affine ops after a Conv/Gemm with a quantized weight into its qparams.

torch.ao's fused ``ConvBn`` QAT modules export ``Conv(x, DQ(W)) -> Div(c) -> Add(b) ->
BatchNormalization -> ...``: the Conv's output feeds float arithmetic, not a Q, so ONNX Runtime
cannot fuse it. Every op of the chain is ``y = m * x + a`` per output channel, so the chain
folds into the Conv: the weight's integer levels stay, its scale becomes ``scale * m`` (per
channel), and the bias becomes ``m * bias + a``. Exact up to float32 rounding of the new scale.

Cases (``fold_affine_chain``), on ops whose weight is a DequantizeLinear of constant integers:

1. ``Conv`` (output channels on axis 1) and ``Gemm`` with ``alpha == beta == 1`` (last axis).
2. The op's output, then each op of the chain, has one reader and is no graph output.
3. Chain ops, each with a constant operand broadcasting along the channel axis only:
   ``Mul`` (either side), ``Div`` (divisor), ``Add`` (either side), ``Sub`` (subtrahend),
   inference ``BatchNormalization`` with constant parameters.
4. Declines with a reason: a factor ``m`` that is not positive and finite (the levels would
   have to flip sign), a bias that is not a float constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.passes.naming import add_initializer
from onnxq.passes.qdq_nodes import constant_array, is_dq, label, qdq_of

Affine = tuple[np.ndarray, np.ndarray]  # (m, a): y = m * x + a per channel, float64


@dataclass(frozen=True)
class Channels:
    """The output channels of the op: ``count`` of them on axis 1 of a rank-``rank`` output."""

    count: int
    rank: int

    def vector(self, array: np.ndarray) -> np.ndarray | None:
        """``array`` as a float64 channel vector when it broadcasts along the channel axis only
        (a scalar repeats), else ``None``."""
        if array.size == 1:
            return np.full(self.count, array.reshape(()).item(), dtype=np.float64)
        if array.ndim > self.rank:
            return None
        shape = (1,) * (self.rank - array.ndim) + array.shape
        others = [d for i, d in enumerate(shape) if i != 1]
        if shape[1] != self.count or any(d != 1 for d in others):
            return None
        return array.reshape(self.count).astype(np.float64)


Step = Callable[[ir.Node, int, Channels], Affine | None]


def _binary(node: ir.Node, x_index: int, channels: Channels) -> tuple[np.ndarray, bool] | None:
    """The constant operand of a binary op as a channel vector, and whether ``x`` is first."""
    other = node.inputs[1 - x_index]
    array = constant_array(other)
    vector = None if array is None or not _is_float(array) else channels.vector(array)
    return None if vector is None else (vector.astype(np.float64), x_index == 0)


def _mul(node: ir.Node, x_index: int, channels: Channels) -> Affine | None:
    found = _binary(node, x_index, channels)
    return None if found is None else (found[0], np.zeros_like(found[0]))


def _div(node: ir.Node, x_index: int, channels: Channels) -> Affine | None:
    found = _binary(node, x_index, channels)
    if found is None or not found[1]:
        return None
    return 1.0 / found[0], np.zeros_like(found[0])


def _add(node: ir.Node, x_index: int, channels: Channels) -> Affine | None:
    found = _binary(node, x_index, channels)
    return None if found is None else (np.ones_like(found[0]), found[0])


def _sub(node: ir.Node, x_index: int, channels: Channels) -> Affine | None:
    found = _binary(node, x_index, channels)
    if found is None or not found[1]:
        return None
    return np.ones_like(found[0]), -found[0]


def _batchnorm(node: ir.Node, x_index: int, channels: Channels) -> Affine | None:
    if x_index != 0 or len(node.outputs) != 1 or len(node.inputs) != 5:
        return None
    if node.attributes.get_int("training_mode", 0):
        return None
    params = [constant_array(value) for value in node.inputs[1:]]
    if any(p is None or p.ndim != 1 or not _is_float(p) for p in params):
        return None
    if any(p.shape != (channels.count,) for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    k = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    return k, beta - mean * k


CHAIN_OPS: dict[str, Step] = {
    "Mul": _mul,
    "Div": _div,
    "Add": _add,
    "Sub": _sub,
    "BatchNormalization": _batchnorm,
}
"""Per-channel affine ops a chain may hold, each returning its ``(m, a)`` or ``None``."""


def fold_affine_chain(graph: ir.Graph, op: ir.Node) -> tuple[list[str], str | None]:
    """Fold the affine chain after ``op`` (cases in the module docstring). Returns the folded
    ops' labels and, when a chain was found but could not fold, the reason."""
    layout = _layout(op)
    if layout is None:
        return [], None
    weight_dq, count, weight_axis, rank = layout
    channels = Channels(count, rank)
    m, a = np.ones(count), np.zeros(count)
    chain: list[ir.Node] = []
    out = op.outputs[0]
    while len(out.uses()) == 1 and not out.is_graph_output():
        use = next(iter(out.uses()))
        step = CHAIN_OPS.get(use.node.op_type) if use.node.domain in ("", "ai.onnx") else None
        found = None if step is None else step(use.node, use.idx, channels)
        if found is None:
            break
        m, a = m * found[0], a * found[0] + found[1]
        chain.append(use.node)
        out = use.node.outputs[0]
    if not chain:
        return [], None
    names = [label(node) for node in chain]
    if not np.all(np.isfinite(m) & (m > 0)) or not np.all(np.isfinite(a)):
        return [], f"{', '.join(names)} after {label(op)!r}: a per-channel factor is not positive"
    bias = _bias(op, count)
    if bias is None:
        return [], f"{', '.join(names)} after {label(op)!r}: its bias is not a float constant"
    _rewrite(graph, op, weight_dq, weight_axis, m, m * bias + a, chain)
    return names, None


def _layout(op: ir.Node) -> tuple[ir.Node, int, int, int] | None:
    """``(weight DQ, output channels, weight's channel axis, output rank)``; the output's
    channels are on its axis 1."""
    if op.domain not in ("", "ai.onnx") or len(op.inputs) < 2 or len(op.outputs) != 1:
        return None
    weight = op.inputs[1]
    dq = weight.producer() if weight is not None else None
    if dq is None or not is_dq(dq) or constant_array(dq.inputs[0]) is None:
        return None
    levels = constant_array(dq.inputs[0])
    if op.op_type == "Conv" and levels.ndim >= 3:
        return dq, levels.shape[0], 0, levels.ndim
    if op.op_type == "Gemm" and levels.ndim == 2:
        if any(op.attributes.get_float(k, 1.0) != 1.0 for k in ("alpha", "beta")):
            return None
        if op.attributes.get_int("transA", 0):
            return None
        trans_b = op.attributes.get_int("transB", 0)
        return dq, levels.shape[0 if trans_b else 1], 0 if trans_b else 1, 2
    return None


def _bias(op: ir.Node, channels: int) -> np.ndarray | None:
    """The op's float bias as a channel vector (zeros without one), else ``None``."""
    if len(op.inputs) < 3 or op.inputs[2] is None:
        return np.zeros(channels)
    array = constant_array(op.inputs[2])
    if array is None or not _is_float(array) or array.size not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(np.float64)


def _rewrite(
    graph: ir.Graph,
    op: ir.Node,
    weight_dq: ir.Node,
    weight_axis: int,
    m: np.ndarray,
    bias: np.ndarray,
    chain: list[ir.Node],
) -> None:
    """A new weight DQ (scale ``scale * m`` per channel) and a float bias on ``op``; the chain
    removed, its output's readers reading ``op``'s output (which takes the chain's name)."""
    qdq = qdq_of(weight_dq)
    channels = m.shape[0]
    scale = (np.broadcast_to(qdq.scale.reshape(-1), (channels,)) * m).astype(np.float32)
    zero = np.broadcast_to(qdq.zero_point.reshape(-1), (channels,)).copy()
    base = weight_dq.inputs[0].name
    new_dq = ir.node(
        "DequantizeLinear",
        [
            weight_dq.inputs[0],
            add_initializer(graph, f"{base}_scale_folded", scale),
            add_initializer(graph, f"{base}_zero_point_folded", zero),
        ],
        {"axis": weight_axis},
        name=f"{label(weight_dq)}_folded",
    )
    new_dq.outputs[0].name = f"{op.inputs[1].name}_folded"
    new_dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.insert_before(op, new_dq)
    op.replace_input_with(1, new_dq.outputs[0])
    if len(op.inputs) < 3:
        op.resize_inputs(3)
    bias_value = add_initializer(graph, f"{label(op)}_bias_folded", bias.astype(np.float32))
    op.replace_input_with(2, bias_value)
    last = chain[-1].outputs[0]
    name = last.name
    out = op.outputs[0]
    last.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(list(reversed(chain)), safe=True)
    out.name = name
    if not weight_dq.outputs[0].uses():
        graph.remove(weight_dq, safe=True)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)
