"""Constant folding: every value computable without the model's inputs becomes an initializer."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx.reference import ReferenceEvaluator

from onnxq.errors import ConfigError
from onnxq.passes.infer_shapes import InferShapesPass
from onnxq.passes.opset import default_opset

logger = logging.getLogger(__name__)

# 64 Mi elements (256 MiB of float32): large enough for any real weight, small enough to stop an
# ``Expand``/``ConstantOfShape`` of a broadcast activation from bloating the file.
DEFAULT_MAX_SIZE = 1 << 26

# Ops whose result is not a function of their inputs.
_NONDETERMINISTIC = frozenset(
    {
        "Bernoulli",
        "Dropout",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
# Ops that carry quantization intent: a DQ of int8 weights stays as it is.
_KEEP = frozenset({"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"})

_MAX_ROUNDS = 16


class FoldConstantsPass(ir.passes.InPlacePass):
    """Replace every node computable from constants by initializers, to a fixpoint.

    A *constant* is an initializer that is not also a graph input (such an initializer is only a
    default the caller may override), or the output of a ``Constant`` node. Graphs are visited in
    topological order, the main graph first, then every subgraph (If/Loop/Scan bodies); a folded
    value lands as an initializer of the graph the node was in.

    Cases:

    1. ``Constant`` node (``value`` or any ``value_*`` attribute): becomes an initializer.
    2. ``Shape`` (``start``/``end`` honoured) or ``Size`` of a value whose shape is fully static
       (known ints, from the model or from shape inference): an int64 initializer, even when the
       value itself is computed from the model's inputs.
    3. Any other default-domain node whose present inputs are all constants: evaluated with
       ``onnx.reference.ReferenceEvaluator`` at the model's opset; each used output becomes an
       initializer (same name) and the node is removed.
    4. Shape inference and folding alternate until nothing changes, so ``Reshape`` targets,
       ``ConstantOfShape -> Mul -> Conv.W`` chains and ``Transpose(W) -> MatMul.B`` all end up as
       plain initializers feeding their consumer directly.
    5. Nodes and initializers left without users are removed (``RemoveUnusedNodesPass`` for the
       main graph, the same rule for subgraph initializers).

    Declines (the node stays, with the reason logged at debug level): a node with an output that
    is a graph output; a node outside the default domain; a random op or ``Dropout``; a
    Quantize/DequantizeLinear (quantization intent); a node with a subgraph attribute; an output
    that is not a tensor or is a string; an output with more than ``max_size`` elements (checked
    before evaluation where the size is predictable: ``ConstantOfShape``, ``Expand``, ``Tile``,
    ``Range``, inferred static shapes); an evaluator error; a result whose dtype disagrees with
    the inferred one. Nodes inside model-local functions are not folded.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE, *, infer_shapes: bool = True) -> None:
        super().__init__()
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ConfigError(f"max_size must be a positive int, got {max_size!r}")
        self.max_size = max_size
        self.infer_shapes = infer_shapes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = default_opset(model)
        if opset is None:
            return ir.passes.PassResult(model, False)
        folded = 0
        shapes_changed = False
        for _ in range(_MAX_ROUNDS):
            if self.infer_shapes:
                shapes_changed |= shape_inference_pass()(model).modified
            count = sum(self._fold_graph(graph, opset) for graph in list(model.graphs()))
            folded += count
            if not count:
                break
        if folded:
            logger.info("folded %d constant nodes", folded)
            common_passes.RemoveUnusedNodesPass()(model)
            remove_unused_initializers(model)
        return ir.passes.PassResult(model, bool(folded) or shapes_changed)

    def _fold_graph(self, graph: ir.Graph, opset: int) -> int:
        count = 0
        for node in list(graph):
            if node.graph is not graph:
                continue
            arrays = self._evaluate(node, opset)
            if arrays is None:
                continue
            _replace_with_initializers(graph, node, arrays)
            count += 1
        return count

    def _evaluate(self, node: ir.Node, opset: int) -> list[np.ndarray | None] | None:
        """The node's output arrays (``None`` for unused outputs), or ``None`` to decline."""
        reason = _static_decline_reason(node)
        if reason is not None:
            logger.debug("not folding %s: %s", _label(node), reason)
            return None
        if node.op_type in ("Shape", "Size"):
            arrays = _fold_shape(node)
            if arrays is not None:
                return arrays
        inputs: list[np.ndarray | None] = []
        for value in node.inputs:
            if value is None:
                inputs.append(None)
                continue
            tensor = constant_tensor(value)
            if tensor is None:
                return None
            inputs.append(tensor.numpy())
        if not inputs and node.op_type != "Constant":
            return None
        predicted = _predicted_size(node, inputs)
        if predicted is not None and predicted > self.max_size:
            logger.debug("not folding %s: output would have %d elements", _label(node), predicted)
            return None
        return self._run(node, inputs, opset)

    def _run(
        self, node: ir.Node, inputs: list[np.ndarray | None], opset: int
    ) -> list[np.ndarray | None] | None:
        if node.op_type == "Constant" and "value" in node.attributes:
            results: Sequence[object] = [node.attributes["value"].as_tensor().numpy()]
        else:
            feeds = {
                value.name: array
                for value, array in zip(node.inputs, inputs, strict=True)
                if value is not None and array is not None
            }
            try:
                evaluator = ReferenceEvaluator(ir.serde.serialize_node(node), opsets={"": opset})
                with np.errstate(all="ignore"):
                    results = evaluator.run(None, feeds)
            except Exception as exc:
                logger.debug("not folding %s: the evaluator failed: %s", _label(node), exc)
                return None
        arrays: list[np.ndarray | None] = []
        for output, result in zip(node.outputs, results, strict=False):
            if not output.uses():
                arrays.append(None)
                continue
            if isinstance(result, np.generic):
                result = np.asarray(result)
            if not isinstance(result, np.ndarray) or result.dtype.kind in "OSU":
                logger.debug("not folding %s: output is not a numeric tensor", _label(node))
                return None
            if result.size > self.max_size:
                logger.debug("not folding %s: output has %d elements", _label(node), result.size)
                return None
            if output.dtype is not None and ir.DataType.from_numpy(result.dtype) != output.dtype:
                logger.debug(
                    "not folding %s: evaluator gave %s, graph says %s",
                    _label(node),
                    result.dtype,
                    output.dtype,
                )
                return None
            arrays.append(result)
        if len(results) < len(node.outputs) or all(array is None for array in arrays):
            return None
        return arrays


def fold_constants(
    model: ir.Model, *, max_size: int = DEFAULT_MAX_SIZE, infer_shapes: bool = True
) -> ir.Model:
    """Fold constant subgraphs of ``model`` into initializers, in place; return the model.

    ``max_size`` bounds the element count of a folded tensor; ``infer_shapes`` runs ONNX shape
    inference between rounds so ``Shape`` of statically shaped values folds too.
    """
    return FoldConstantsPass(max_size, infer_shapes=infer_shapes)(model).model


def shape_inference_pass() -> ir.passes.PassBase:
    """ONNX shape inference that never raises and keeps every value type
    (``onnxq.passes.infer_shapes``)."""
    return InferShapesPass()


def constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` if it is a constant: a non-input initializer or a Constant."""
    if value.is_graph_input():
        return None
    if value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain != "":
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def remove_unused_initializers(model: ir.Model) -> int:
    """Drop initializers nothing reads from every graph, subgraphs included; return the count."""
    count = 0
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if value.uses() or value.is_graph_input() or value.is_graph_output():
                continue
            del graph.initializers[name]
            count += 1
    return count


def _static_decline_reason(node: ir.Node) -> str | None:
    if node.domain != "":
        return f"op domain '{node.domain}' is not evaluated"
    if node.op_type in _NONDETERMINISTIC:
        return "the op is not deterministic"
    if node.op_type in _KEEP:
        return "quantization ops are kept"
    if not any(output.uses() for output in node.outputs):
        return "no output is used"
    if any(output.is_graph_output() for output in node.outputs):
        return "an output is a graph output"
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return "the node holds a subgraph"
        if attr.is_ref():
            return "the node has a reference attribute"
    return None


def _fold_shape(node: ir.Node) -> list[np.ndarray | None] | None:
    value = node.inputs[0] if node.inputs else None
    if value is None:
        return None
    shape = value.shape
    if shape is None or not shape.is_static():
        return None
    dims = [int(dim) for dim in shape]  # type: ignore[arg-type]
    if node.op_type == "Size":
        return [np.array(math.prod(dims), dtype=np.int64)]
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return [np.array(dims[start:end], dtype=np.int64)]


def _predicted_size(node: ir.Node, inputs: list[np.ndarray | None]) -> int | None:
    """Element count of the largest output, when it can be known before evaluating."""
    try:
        if node.op_type == "ConstantOfShape" and inputs[0] is not None:
            return math.prod(int(d) for d in inputs[0].reshape(-1))
        if node.op_type == "Expand" and inputs[0] is not None and inputs[1] is not None:
            target = tuple(int(d) for d in inputs[1].reshape(-1))
            return math.prod(np.broadcast_shapes(inputs[0].shape, target))
        if node.op_type == "Tile" and inputs[0] is not None and inputs[1] is not None:
            repeats = [int(r) for r in inputs[1].reshape(-1)]
            return math.prod(d * r for d, r in zip(inputs[0].shape, repeats, strict=True))
        if node.op_type == "Range" and all(array is not None for array in inputs[:3]):
            start, limit, delta = (float(array) for array in inputs[:3])  # type: ignore[arg-type]
            return max(math.ceil((limit - start) / delta), 0)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, IndexError):
        return None
    sizes = []
    for output in node.outputs:
        if output.shape is None or not output.shape.is_static():
            return None
        sizes.append(math.prod(int(d) for d in output.shape))  # type: ignore[arg-type]
    return max(sizes, default=None)


def _replace_with_initializers(
    graph: ir.Graph, node: ir.Node, arrays: Sequence[np.ndarray | None]
) -> None:
    replacements = []
    for output, array in zip(node.outputs, arrays, strict=True):
        if array is None:
            continue
        tensor = ir.Tensor(array, name=output.name)
        constant = ir.Value(
            name=output.name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        output.replace_all_uses_with(constant)
        replacements.append(constant)
    graph.remove(node, safe=True)
    for constant in replacements:
        graph.register_initializer(constant)
    logger.debug("folded %s into %d initializer(s)", _label(node), len(replacements))


def _label(node: ir.Node) -> str:
    return f"{node.op_type} node '{node.name}'" if node.name else f"{node.op_type} node"
