"""Decide what gets quantized: nodes, activation tensors, shared qparams, and why not.

``plan_quantization`` reads a prepared float graph and a ``QuantConfig`` and returns a
``QuantPlan``. It changes nothing. Rules, in order:

1. Only main-graph nodes of the default domain are candidates; subgraph bodies stay float.
2. A candidate needs a rule in ``op_rules.QUANTIZABLE_OPS``, must be one of the target's
   ``quantized_ops`` (its runtime has an int8 kernel) or of the config's ``op_types``, pass the
   node-name filters, and every activation input must be a non-constant float32 tensor
   (constants only where the rule takes a weight).
3. The quantization point of a node's output moves past a single follower the target's runtime
   fuses (``fold_activations``: Relu, Clip).
4. A node whose quantization point is a graph output declines unless its kernel also has a
   float output or ``quantize_outputs`` is set. Kernels with a float output (MatMul, Gemm, and
   every op of the target's ``float_output_ops``) get an output Q/DQ only where a quantized
   consumer reads it.
5. Ops with a constant weight (Conv, Gemm, weight MatMul) are anchors. Every other op
   (element-wise, pooling, Concat, MatMul of two activations) is quantized only inside an int8
   region: its inputs come from quantized outputs and a quantized op reads its output. So a
   residual Add into LayerNorm, or attention MatMuls fed by float bias Adds, stay float
   (``quantize_activation_matmuls`` makes MatMuls of two activations anchors too).
6. Pass-through ops (reshape, pooling by max, ...) whose data input is quantized share that
   input's qparams for their output, so chains of them stay int8.
7. Tensors in ``skip_tensors`` (e.g. no finite calibration values) are never quantized; nodes
   that need them decline.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.errors import ConfigError
from onnxq.passes.op_rules import (
    PASS_THROUGH_OPS,
    QUANTIZABLE_OPS,
    OpRule,
    clip_is_foldable,
)
from onnxq.targets import get_target


@dataclass(frozen=True)
class NodeDecision:
    """Whether a node was quantized, and why (or why not)."""

    name: str
    op_type: str
    quantized: bool
    reason: str


@dataclass
class QuantPlan:
    """What ``insert_qdq`` will do.

    ``activations`` maps each tensor that gets a Q/DQ pair to its *root*: the tensor whose
    calibrated range gives its qparams (itself, or a pass-through op's quantized input).
    ``nodes`` lists the quantized nodes with their rule. ``int8_produced`` names the tensors
    whose producer runs in int8 (a quantized node's output, an int8 pass-through's output): all
    their readers switch to the DQ output so the producer feeds only its Q and fuses. Other
    quantized tensors (e.g. a LayerNorm output read by MatMuls and a residual Add) keep their
    float readers on the exact float value.
    """

    nodes: list[tuple[ir.Node, OpRule]] = field(default_factory=list)
    activations: dict[str, str] = field(default_factory=dict)
    int8_produced: set[str] = field(default_factory=set)
    decisions: list[NodeDecision] = field(default_factory=list)

    @property
    def roots(self) -> list[str]:
        """Tensors that need calibrated ranges."""
        return sorted(set(self.activations.values()))


def is_float32(value: ir.Value | None) -> bool:
    """A float32 tensor (a sequence, map or optional of float32 is not one)."""
    return (
        value is not None
        and isinstance(value.type, ir.TensorType)
        and value.dtype == ir.DataType.FLOAT
    )


def is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def node_label(node: ir.Node, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


@dataclass(frozen=True)
class NodeSelection:
    """The user's choice of nodes: op types allowed (the config's ``op_types``, else
    ``default_ops``: the target's ``quantized_ops`` unless a mode gives its own), op types and
    node-name patterns excluded (rule 2)."""

    allowed_ops: frozenset[str]
    excluded_ops: frozenset[str]
    name_patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def from_config(
        cls, config: QuantConfig, default_ops: frozenset[str] | None = None
    ) -> NodeSelection:
        return cls(
            frozenset(config.op_types) or default_ops or get_target(config.target).quantized_ops,
            frozenset(config.exclude_op_types),
            tuple(re.compile(p) for p in config.exclude_nodes),
        )

    def declined(self, node: ir.Node) -> str | None:
        """Why the user's choice leaves ``node`` float, or ``None``."""
        if node.op_type not in self.allowed_ops:
            return "op type not selected"
        if node.op_type in self.excluded_ops:
            return "excluded by op type"
        name = node.name or ""
        matching = next((p.pattern for p in self.name_patterns if p.search(name)), None)
        return None if matching is None else f"excluded by name pattern {matching!r}"


def check_op_types(config: QuantConfig, rules: Collection[str], mode: str) -> None:
    """``config.op_types`` may name only op types ``mode`` has rules for: a typo (``matmul``)
    would quantize nothing, silently. A ``ConfigError`` lists the known ones."""
    unknown = sorted(set(config.op_types) - set(rules))
    if unknown:
        raise ConfigError(
            f"op_types: {mode} mode has no rule for {', '.join(unknown)} "
            f"(it has rules for {', '.join(sorted(rules))})"
        )


def plan_quantization(
    model: ir.Model, config: QuantConfig, *, skip_tensors: Iterable[str] = ()
) -> QuantPlan:
    """Apply the module's rules to the main graph of ``model``."""
    graph = model.graph
    skip = set(skip_tensors)
    target = get_target(config.target)
    selection = NodeSelection.from_config(config)
    plan = QuantPlan()
    decided: dict[int, NodeDecision] = {}
    needed: set[str] = set()
    points: set[str] = set()
    candidates: list[_Candidate] = []

    for index, node in enumerate(graph):
        label = node_label(node, index)

        def decline(reason: str, node: ir.Node = node, label: str = label) -> None:
            decided[id(node)] = NodeDecision(label, node.op_type, False, reason)

        rule = QUANTIZABLE_OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            continue
        if node.op_type in target.float_output_ops:
            rule = replace(rule, float_output_ok=True)
        reason = selection.declined(node) or _check_inputs(node, rule, skip)
        if reason:
            decline(reason)
            continue
        point = _output_point(node, target.fold_activations)
        if point is not None and (point.name in skip or not is_float32(point)):
            point = None
        if point is not None and point.is_graph_output() and not config.quantize_outputs:
            point = None
        if point is None and not rule.float_output_ok:
            decline(
                f"{rule.kernel} needs a quantized output (output is a graph output or "
                "cannot be quantized)"
            )
            continue
        forced = config.quantize_activation_matmuls and node.op_type == "MatMul"
        candidates.append(_Candidate(node, rule, point, label, forced))

    kept, pruned = _prune_followers(graph, candidates)
    for candidate, reason in pruned:
        decided[id(candidate.node)] = NodeDecision(
            candidate.label, candidate.node.op_type, False, reason
        )
    for candidate in kept:
        node, rule, point = candidate.node, candidate.rule, candidate.point
        plan.nodes.append((node, rule))
        decided[id(node)] = NodeDecision(candidate.label, node.op_type, True, rule.kernel)
        needed.update(v.name for v in _activation_inputs(node, rule))
        if point is not None:
            points.add(point.name)
            if not rule.float_output_ok or point.is_graph_output():
                needed.add(point.name)

    plan.activations, shared = _share_through_pass_through(graph, needed, points, skip, decided)
    plan.int8_produced = points | shared
    plan.decisions = [decided[id(n)] for n in graph if id(n) in decided]
    plan.decisions += subgraph_decisions(graph)
    return plan


def subgraph_decisions(graph: ir.Graph) -> list[NodeDecision]:
    """Every mode leaves If/Loop/Scan bodies float: one decision per quantizable op there."""
    return [
        NodeDecision(node_label(n, i), n.op_type, False, "inside a subgraph (If/Loop/Scan body)")
        for i, n in enumerate(_subgraph_nodes(graph))
        if n.op_type in QUANTIZABLE_OPS
    ]


@dataclass(frozen=True)
class _Candidate:
    node: ir.Node
    rule: OpRule
    point: ir.Value | None
    label: str
    forced_anchor: bool = False

    @property
    def anchor(self) -> bool:
        """Ops with a constant weight, or forced by the config: int8 on their own (rule 5)."""
        if self.forced_anchor or self.rule.weight_input is not None:
            return True
        return self.rule.constant_operands_ok and any(is_constant(v) for v in self.node.inputs)


def _prune_followers(
    graph: ir.Graph, candidates: list[_Candidate]
) -> tuple[list[_Candidate], list[tuple[_Candidate, str]]]:
    """Keep a follower (element-wise, pooling, Concat, activation-only MatMul) only inside an
    int8 region: every activation input comes from a kept node's quantized output (through
    pass-through ops), and, unless its kernel has a float output, a kept node reads its output.
    Greatest fixpoint: drop violators until none is left.
    """
    passes = [node for _, node in _pass_through_nodes(graph)]
    kept = list(candidates)
    pruned: list[tuple[_Candidate, str]] = []
    while True:
        sources = {c.point.name for c in kept if c.point is not None}
        for node in passes:
            if node.inputs and node.inputs[0] is not None and node.inputs[0].name in sources:
                sources.update(o.name for o in node.outputs)
        consumed = {v.name for c in kept for v in _activation_inputs(c.node, c.rule)}
        for node in reversed(passes):
            if any(o.name in consumed for o in node.outputs) and node.inputs[0] is not None:
                consumed.add(node.inputs[0].name)
        dropped = []
        for candidate in kept:
            if candidate.anchor:
                continue
            inputs = _activation_inputs(candidate.node, candidate.rule)
            floating = next((v.name for v in inputs if v.name not in sources), None)
            if floating is not None:
                dropped.append((candidate, f"input {floating!r} comes from a float op"))
            elif not candidate.rule.float_output_ok and (
                candidate.point is None or candidate.point.name not in consumed
            ):
                dropped.append((candidate, "output feeds only float ops"))
        if not dropped:
            return kept, pruned
        pruned += dropped
        gone = {id(c.node) for c, _ in dropped}
        kept = [c for c in kept if id(c.node) not in gone]


def _activation_inputs(node: ir.Node, rule: OpRule) -> list[ir.Value]:
    """The inputs that get a Q/DQ pair (not weights, biases or absent inputs)."""
    indices = range(len(node.inputs)) if rule.activation_inputs is None else rule.activation_inputs
    values = []
    for i in indices:
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is None or i in (rule.weight_input, rule.bias_input):
            continue
        if rule.constant_operands_ok and is_constant(value):
            continue  # MatMul's constant operand is a weight
        values.append(value)
    return values


def _check_inputs(node: ir.Node, rule: OpRule, skip: set[str]) -> str:
    """Empty when the node's inputs allow quantization, else the reason they do not."""
    if rule.weight_input is not None:
        weight = node.inputs[rule.weight_input] if len(node.inputs) > rule.weight_input else None
        if not is_constant(weight):
            return "weight is not a constant"
        if not is_float32(weight):
            return "weight is not float32"
    activations = _activation_inputs(node, rule)
    if not activations:
        return "no activation input"
    for value in activations:
        if not is_float32(value):
            return f"input {value.name!r} is not float32"
        if is_constant(value):
            return f"input {value.name!r} is a constant (no int8 gain)"
        if value.name in skip:
            return f"input {value.name!r} has no usable calibration range"
    if rule.constant_operands_ok:
        for value in node.inputs:
            if is_constant(value) and not is_float32(value):
                return f"input {value.name!r} is not float32"
    return ""


def _output_point(node: ir.Node, fold: frozenset[str]) -> ir.Value | None:
    """Where the node's output is quantized: after a sole follower in ``fold``, else the
    output."""
    if len(node.outputs) != 1:
        return None
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) == 1 and not output.is_graph_output():
        follower = uses[0].node
        if (
            follower.op_type in fold
            and follower.domain in ("", "ai.onnx")
            and uses[0].idx == 0
            and clip_is_foldable(follower)
            and follower.graph is node.graph
        ):
            return follower.outputs[0]
    return output


def _share_through_pass_through(
    graph: ir.Graph,
    needed: set[str],
    points: set[str],
    skip: set[str],
    decided: dict[int, NodeDecision],
) -> tuple[dict[str, str], set[str]]:
    """Map each quantized tensor to its root (rule 6); also return the outputs of the
    pass-through ops that now run on int8 data.

    Forward: a pass-through output has a quantized origin when its data input is a node's
    output quantization point or itself has one.
    Backward: a needed pass-through output pulls its data input in when that input has one,
    so chains like ``Q -> MaxPool -> Reshape -> DQ`` keep one scale end to end.
    """
    passes = _pass_through_nodes(graph)
    origin: set[str] = needed | points
    for _, node in passes:
        data = node.inputs[0] if node.inputs else None
        if data is not None and data.name in origin and not is_constant(data):
            origin.update(o.name for o in node.outputs if is_float32(o) and o.name not in skip)
    for _, node in reversed(passes):
        data = node.inputs[0] if node.inputs else None
        if data is None or data.name not in origin or is_constant(data):
            continue
        if any(o.name in needed for o in node.outputs):
            needed.add(data.name)
    roots: dict[str, str] = {}
    shared_outputs: set[str] = set()
    for index, node in passes:
        data = node.inputs[0] if node.inputs else None
        if data is None or data.name not in needed:
            continue
        shared = [o for o in node.outputs if o.name in needed]
        for output in shared:
            roots[output.name] = roots.get(data.name, data.name)
        if shared:
            shared_outputs.update(o.name for o in node.outputs)
            decided[id(node)] = NodeDecision(
                node_label(node, index), node.op_type, True, "int8 pass-through (shared qparams)"
            )
    return {name: roots.get(name, name) for name in sorted(needed)}, shared_outputs


def _pass_through_nodes(graph: ir.Graph) -> list[tuple[int, ir.Node]]:
    """``(index, node)`` of the graph's pass-through ops, in graph order."""
    return [
        (index, node)
        for index, node in enumerate(graph)
        if node.op_type in PASS_THROUGH_OPS and node.domain in ("", "ai.onnx")
    ]


def _subgraph_nodes(graph: ir.Graph) -> list[ir.Node]:
    nodes = []
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                nodes.extend(attr.as_graph().all_nodes())
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    nodes.extend(sub.all_nodes())
    return nodes


def non_tensor_note(model: ir.Model) -> list[str]:
    """A note naming the values that are not tensors (sequences, maps, optionals): no rule
    quantizes them, so they and the ops between them stay float."""
    found = [
        (value.name, type(value.type).__name__.removesuffix("Type").lower())
        for graph in model.graphs()
        for value in [*graph.inputs, *(out for node in graph for out in node.outputs)]
        if value.type is not None and not isinstance(value.type, ir.TensorType)
    ]
    if not found:
        return []
    shown = ", ".join(f"{name} ({kind})" for name, kind in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return [f"left float: {len(found)} non-tensor values, {shown}{more}"]
