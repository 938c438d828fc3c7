"""SmoothQuant (Xiao et al., 2023): move activation outlier channels into the weights.

For weight MatMuls ``Y = X W`` sharing one input ``X`` (e.g. query/key/value), a per-channel
factor ``s_k = amax(X_k)^a / amax(W_k,:)^(1 - a)`` gives ``Y = (X / s)(s W)`` exactly in float,
with ``X / s`` far easier to quantize per tensor. Rules (``SmoothQuantPass``):

1. Groups: weight MatMuls (2-D float32 constant right operand) reading the same float ``X``.
2. ``a`` (migration strength) is one number for the model, 0.7 by default: on
   all-MiniLM-L6-v2 it beat 0.5 and 0.9 for both static and dynamic int8, and a per-group
   search on a local error proxy picked larger values that were worse end to end.
3. ``1 / s`` is folded into ``X``'s producer when nothing else reads ``X`` (``Shape`` and
   ``Size`` readers aside): a LayerNormalization (scale and bias), or a weight MatMul,
   optionally followed by a bias Add (columns and bias). Either may also sit behind ops that
   commute with a positive per-channel factor, each read only by the next: Reshape,
   Transpose, Relu, and MatMul with the path as its right operand (``P (V / s) = (P V) / s``:
   attention's value projection feeds the attention output this way). Such a longer route is
   taken only when ``verified_routes`` names ``X`` (``onnxq.smoothing`` checks it
   numerically: a Reshape may reorder channels).
   Otherwise a ``Mul(X, 1 / s)`` feeds the group only (reported), or, with ``fold_only``,
   the group is not smoothed. In a post-LN encoder (BERT) every LayerNorm output also feeds
   a residual Add and the FFN's second input follows GELU: no exact fold exists there.
4. ``s`` is folded into the rows of every ``W`` of the group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.passes.plan import is_constant, is_float32


def smoothing_groups(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    """Rule 1: activation tensor name -> the weight MatMuls that read it."""
    groups: dict[str, list[ir.Node]] = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        x, w = node.inputs
        if x is None or is_constant(x) or not is_float32(x):
            continue
        if is_constant(w) and is_float32(w) and len(w.const_value.shape) == 2:
            groups.setdefault(x.name, []).append(node)
    return groups


class ChannelStatsObserver:
    """Per-channel (last axis) max ``|x|`` over every finite row seen; merges by maximum."""

    def __init__(self) -> None:
        self.amax: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        rows = np.asarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
        rows = rows[np.isfinite(rows).all(axis=1)]
        if len(rows):
            batch_max = np.abs(rows).max(axis=0)
            self.amax = batch_max if self.amax is None else np.maximum(self.amax, batch_max)

    def merge(self, other: ChannelStatsObserver) -> None:
        if other.amax is not None:
            self.amax = other.amax if self.amax is None else np.maximum(self.amax, other.amax)


def smoothing_scale(amax: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """``s_k = amax(X_k)^a / amax(W_k,:)^(1 - a)``, kept in ``[1e-4, 1e4]``."""
    w_max = np.maximum(np.abs(weights).max(axis=1), 1e-8)
    scale = np.maximum(amax, 1e-8) ** alpha / w_max ** (1 - alpha)
    return np.clip(scale, 1e-4, 1e4).astype(np.float64)


@dataclass(frozen=True)
class FoldRoute:
    """Where ``1 / s`` can go: a LayerNormalization, or a weight MatMul (with its bias Add)
    reached through ``hops`` channel-commuting ops."""

    target: ir.Node
    bias_add: tuple[ir.Node, int] | None = None
    hops: int = 0


COMMUTING_OPS = frozenset({"Reshape", "Transpose", "Relu"})
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def fold_route(x: ir.Value, group: list[ir.Node]) -> FoldRoute | None:
    """Rule 3's route from ``x`` back to the node that can absorb ``1 / s``, if any."""
    if {id(node) for node in _value_readers(x)} != {id(n) for n in group} or x.is_graph_output():
        return None
    producer, hops = x.producer(), 0
    while producer is not None and _commutes(producer):
        upstream = producer.inputs[1 if producer.op_type == "MatMul" else 0]
        if upstream is None or len(_value_readers(upstream)) != 1 or upstream.is_graph_output():
            return None
        producer, hops = upstream.producer(), hops + 1
    if producer is None:
        return None
    if producer.op_type == "LayerNormalization":
        axis = producer.attributes.get("axis")
        last = axis is None or axis.as_int() in (-1, len(x.shape or ()) - 1)
        return FoldRoute(producer, hops=hops) if last and _constants(producer, (1, 2)) else None
    matmul, bias_add = producer, None
    if producer.op_type == "Add":
        bias_index = next((i for i, v in enumerate(producer.inputs) if is_constant(v)), None)
        other = producer.inputs[1 - bias_index] if bias_index is not None else None
        if other is None or other.producer() is None or len(_value_readers(other)) != 1:
            return None
        matmul, bias_add = other.producer(), (producer, bias_index)
    if matmul.op_type != "MatMul" or not _constants(matmul, (1,)):
        return None
    weight = matmul.inputs[1].const_value
    if len(weight.shape) != 2:
        return None
    if bias_add is not None:
        node, index = bias_add
        if tuple(node.inputs[index].const_value.shape)[-1:] != tuple(weight.shape)[1:]:
            return None
    return FoldRoute(matmul, bias_add, hops)


def _commutes(node: ir.Node) -> bool:
    """``node(v * f) = node(v) * f'`` for a positive per-channel ``f`` (``f'`` may be ``f``
    reordered, which is why routes through these are verified)."""
    if node.op_type == "MatMul":
        left, right = node.inputs
        return not is_constant(left) and not is_constant(right)
    return node.op_type in COMMUTING_OPS and node.domain in ("", "ai.onnx")


@dataclass
class SmoothQuantPass(ir.passes.InPlacePass):
    """Apply rules 2-4 with per-activation statistics; ``applied`` names what was done.

    ``verified_routes``: activations whose route through commuting ops may be used
    (``None``: every such route, for a trial run). ``fold_only``: never insert a ``Mul``.
    """

    stats: dict[str, ChannelStatsObserver]
    alpha: float = 0.7
    verified_routes: frozenset[str] | None = frozenset()
    fold_only: bool = False
    applied: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for name, nodes in smoothing_groups(graph).items():
            observer = self.stats.get(name)
            if observer is None or observer.amax is None:
                continue
            scale = self.scale(name, nodes)
            activation = nodes[0].inputs[0]
            route = fold_route(activation, nodes)
            if route is not None and route.hops and self.verified_routes is not None:
                route = route if name in self.verified_routes else None
            if route is None and self.fold_only:
                continue
            if route is None:
                how = _insert_mul(graph, activation, nodes, 1.0 / scale)
            else:
                how = _fold(route, 1.0 / scale)
            for node in nodes:
                _set_constant(node, 1, node.inputs[1].const_value.numpy() * scale[:, None])
            self.applied.append((name, how))
        return ir.passes.PassResult(model, modified=bool(self.applied))

    def scale(self, name: str, nodes: list[ir.Node]) -> np.ndarray:
        """Rule 2's ``s`` for the group of ``nodes`` reading activation ``name``."""
        weights = np.concatenate([n.inputs[1].const_value.numpy() for n in nodes], axis=1)
        return smoothing_scale(self.stats[name].amax, weights, self.alpha)


def _fold(route: FoldRoute, inverse: np.ndarray) -> str:
    """Multiply the route's target by ``1 / s``: LayerNorm scale and bias, or MatMul columns."""
    node = route.target
    if node.op_type == "LayerNormalization":
        for index in (1, 2):
            if len(node.inputs) > index and node.inputs[index] is not None:
                _set_constant(node, index, node.inputs[index].const_value.numpy() * inverse)
        return f"folded into LayerNormalization{_through(route)}"
    _set_constant(node, 1, node.inputs[1].const_value.numpy() * inverse[None, :])
    if route.bias_add is not None:
        add, index = route.bias_add
        _set_constant(add, index, add.inputs[index].const_value.numpy() * inverse)
    return f"folded into the preceding MatMul{_through(route)}"


def _through(route: FoldRoute) -> str:
    return f" through {route.hops} channel-wise ops" if route.hops else ""


def _insert_mul(graph: ir.Graph, x: ir.Value, group: list[ir.Node], inverse: np.ndarray) -> str:
    name = f"{x.name}_smooth"
    factor = ir.Value(
        name=f"{name}_factor",
        const_value=ir.tensor(inverse.astype(np.float32), name=f"{name}_factor"),
    )
    factor.type, factor.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(inverse.shape)
    graph.register_initializer(factor)
    smoothed = ir.Value(name=name, shape=x.shape, type=x.type)
    mul = ir.node("Mul", [x, factor], outputs=[smoothed], name=f"{name}_Mul")
    graph.insert_before(group[0], mul)
    for node in group:
        node.replace_input_with(0, smoothed)
    return "Mul inserted (producer is read elsewhere or cannot absorb it)"


def _value_readers(value: ir.Value) -> list[ir.Node]:
    """The nodes that read ``value``'s numbers (``Shape`` and ``Size`` read only its shape)."""
    return [use.node for use in value.uses() if use.node.op_type not in SHAPE_ONLY_OPS]


def _constants(node: ir.Node, indices: tuple[int, ...]) -> bool:
    """The inputs at ``indices`` (those present) are float32 constants: a fold replaces them
    for this node only, so they may be shared."""
    present = [node.inputs[i] for i in indices if i < len(node.inputs) and node.inputs[i]]
    return bool(present) and all(is_constant(v) and is_float32(v) for v in present)


def _set_constant(node: ir.Node, index: int, array: np.ndarray) -> None:
    """Replace a node's constant input by a new initializer (the old one may be shared)."""
    old = node.inputs[index]
    graph = node.graph
    name, copies = f"{old.name}_smoothed", 1
    while name in graph.initializers:  # a shared constant scaled for another reader
        name, copies = f"{old.name}_smoothed{copies}", copies + 1
    value = ir.Value(
        name=name, const_value=ir.tensor(np.asarray(array, dtype=np.float32), name=name)
    )
    value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
    graph.register_initializer(value)
    node.replace_input_with(index, value)
    if not old.uses() and old.name in graph.initializers:
        del graph.initializers[old.name]
