"""Opset and domain passes: upgrade the default-domain opset, refuse unknown op domains."""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.errors import ConfigError, UnsupportedModelError, first_line
from onnxq.ir_io import from_proto, to_proto
from onnxq.passes.infer_shapes import infer_shapes

logger = logging.getLogger(__name__)

# Op domains onnxq (and ONNX Runtime's CPU provider) understand, besides the model's own functions.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

PRELU_NUMPY_BROADCAST = 7  # the opset where PRelu's slope broadcasts like numpy

# Initializers above this size travel beside the converter, not through it: they keep the proto
# small (a > 2 GB model cannot be serialised) and no upgrade adapter reads a weight's values.
_DETACH_BYTES = 1024


def default_opset(model: ir.Model) -> int | None:
    """The model's default-domain (``ai.onnx``) opset version, or ``None`` if it imports none."""
    version = model.opset_imports.get("")
    if version is None:
        version = model.opset_imports.get("ai.onnx")
    return version


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Convert the model to a newer default-domain opset with ``onnx.version_converter``.

    Cases:

    1. The default-domain opset is already ``>= min_opset`` (or absent): nothing changes. An opset
       is never lowered.
    2. Otherwise the model round-trips through a proto and ``convert_version(proto, min_opset)``;
       large initializers are detached for the trip (as graph inputs) and re-attached by name.
       The converted graph, opsets and IR version replace the model's own in place.
    3. Model-local functions importing the default domain below ``min_opset`` are inlined first
       (``InlinePass``): the converter does not convert function bodies, and ONNX Runtime would
       read them at the model's new opset. Other functions are kept as they are.
    4. The converter fails, or leaves the opset below ``min_opset``: ``UnsupportedModelError``
       with a one-line reason.
    5. An upgrade that would change the model's interface (a graph input's or output's type or
       fixed shape: the converter rewrites ``Scan``-8's batched inputs to ``Scan``-9's
       unbatched ones) is refused the same way: the model would no longer take its own data.
    6. ``PRelu`` below opset 7 broadcasts a 1-D slope over the channel axis (1), from 7 on from
       the last axis: such a constant slope is reshaped to ``[C, 1, ...]`` for the input's
       rank first; where that rank or the slope is unknown, the upgrade is refused.
    """

    def __init__(self, min_opset: int = 13) -> None:
        super().__init__()
        latest = onnx.defs.onnx_opset_version()
        if isinstance(min_opset, bool) or not isinstance(min_opset, int):
            raise ConfigError(f"min_opset must be an int, got {min_opset!r}")
        if not 1 <= min_opset <= latest:
            raise ConfigError(
                f"min_opset must be between 1 and {latest} (this onnx's newest opset), "
                f"got {min_opset}"
            )
        self.min_opset = min_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = default_opset(model)
        if current is None or current >= self.min_opset:
            return ir.passes.PassResult(model, False)
        target = self.min_opset

        def stale(function: ir.Function) -> bool:
            version = function.opset_imports.get("", function.opset_imports.get("ai.onnx"))
            return version is not None and version < target

        if any(stale(function) for function in model.functions.values()):
            common_passes.InlinePass(criteria=stale)(model)
        if current < PRELU_NUMPY_BROADCAST <= target:
            _channel_prelu_slopes(model)
        converted = _convert(model, current, target)
        model.graph = converted.graph
        model.ir_version = converted.ir_version
        logger.info("upgraded the default-domain opset from %d to %d", current, self.min_opset)
        return ir.passes.PassResult(model, True)


def _channel_prelu_slopes(model: ir.Model) -> None:
    """Case 6: 1-D ``PRelu`` slopes reshaped to broadcast on axis 1 under numpy rules."""
    nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "PRelu"]
    if not nodes:
        return
    infer_shapes(model)
    reshaped: dict[tuple[str | None, int], ir.Value] = {}
    for node in nodes:
        x, slope = node.inputs[0], node.inputs[1]
        if slope is None or x is None:
            continue
        tensor = slope.const_value
        rank = None if x.shape is None else len(x.shape)
        if tensor is not None and (
            tensor.size == 1 or len(tensor.shape) != 1 or (rank is not None and rank <= 2)
        ):
            continue  # a shared slope, or one already shaped: same meaning in both opsets
        if tensor is None or rank is None:
            raise UnsupportedModelError(
                f"cannot upgrade PRelu node {node.name or node.op_type!r} past opset 6: its "
                "slope broadcasts over channels there, and its slope or input rank is unknown; "
                "export the model at opset >= 7"
            )
        key = (slope.name, rank)
        if key not in reshaped:
            shaped = tensor.numpy().reshape((-1,) + (1,) * (rank - 2))
            name = f"{slope.name}_rank{rank}"
            value = ir.Value(name=name, const_value=ir.tensor(shaped, name=name))
            value.shape, value.dtype = ir.Shape(shaped.shape), tensor.dtype
            node.graph.register_initializer(value)
            reshaped[key] = value
        node.replace_input_with(1, reshaped[key])


def upgrade_opset(model: ir.Model, *, min_opset: int = 13) -> ir.Model:
    """Upgrade ``model`` in place to default-domain opset ``min_opset`` if older; return it."""
    return UpgradeOpsetPass(min_opset)(model).model


def _convert(model: ir.Model, current: int, target: int) -> ir.Model:
    graph = model.graph
    detached: dict[str, tuple[ir.Value, ir.TensorProtocol]] = {}
    original_inputs = list(graph.inputs)
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if value.is_graph_input() or tensor is None or tensor.nbytes <= _DETACH_BYTES:
            continue
        if value.shape is None:
            value.shape = tensor.shape  # type: ignore[assignment]
        if value.dtype is None:
            value.dtype = tensor.dtype
        detached[name] = (value, tensor)
        graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
    try:
        proto = to_proto(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(original_inputs)
        for value, tensor in detached.values():
            value.const_value = tensor
            graph.register_initializer(value)

    try:
        converted_proto = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {current} to {target}: {first_line(exc)}"
        ) from None
    reached = next(
        (op.version for op in converted_proto.opset_import if op.domain in ("", "ai.onnx")), None
    )
    if reached is None or reached < target:
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {current} to {target}: "
            f"the converter stopped at opset {reached}"
        )
    _check_interface(proto.graph, converted_proto.graph, current, target)
    min_ir = onnx.helper.find_min_ir_version_for(list(converted_proto.opset_import), True)
    converted_proto.ir_version = max(converted_proto.ir_version, min_ir)
    converted = from_proto(converted_proto)

    new_graph = converted.graph
    by_name = {value.name: value for value in new_graph.inputs}
    for name, (_, tensor) in detached.items():
        value = by_name.get(name)
        if value is None:  # The converter dropped an unused weight: nothing to restore.
            continue
        new_graph.inputs.remove(value)
        value.const_value = tensor
        new_graph.register_initializer(value)
    return converted


def _check_interface(
    before: onnx.GraphProto, after: onnx.GraphProto, current: int, target: int
) -> None:
    """Case 5: every graph input and output keeps its type and fixed shape."""
    new = {v.name: _signature(v.type) for v in (*after.input, *after.output)}
    for value in (*before.input, *before.output):
        old = _signature(value.type)
        if (
            value.name in new
            and None not in (old[1], new[value.name][1])
            and new[value.name] != old
        ):
            raise UnsupportedModelError(
                f"cannot upgrade the model from opset {current} to {target}: the converter "
                f"changes {value.name!r} from {_describe(old)} to {_describe(new[value.name])}, "
                "so the model would no longer take its own data; export it at a newer opset"
            )


def _signature(type_proto: onnx.TypeProto) -> tuple[int, tuple[int | None, ...] | None]:
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return tensor.elem_type, None
    return tensor.elem_type, tuple(
        d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
    )


def _describe(signature: tuple[int, tuple[int | None, ...] | None]) -> str:
    elem, shape = signature
    dims = "x".join("?" if d is None else str(d) for d in shape or ())
    return f"{onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else 'untyped'}[{dims}]"


class CheckDomainsPass(ir.passes.InPlacePass):
    """Refuse models with ops from domains onnxq does not know.

    Cases:

    1. A node (in the main graph, a subgraph or a model-local function) whose domain is one of
       ``""``, ``ai.onnx``, ``ai.onnx.ml``, ``com.microsoft``: accepted.
    2. A node that calls one of the model's own local functions: accepted (its body is checked).
    3. Any other node: ``UnsupportedModelError`` naming the node and its domain.

    The model is never modified.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        bodies: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        for body in bodies:
            for node in ir.traversal.RecursiveGraphIterator(body):
                if node.domain in KNOWN_DOMAINS or node.op_identifier() in model.functions:
                    continue
                label = node.name or node.op_type
                raise UnsupportedModelError(
                    f"node '{label}' uses op domain '{node.domain}' which onnxq does not know "
                    f"(op {node.op_type}); supported: ai.onnx, ai.onnx.ml, com.microsoft and "
                    "functions defined in the model"
                )
        return ir.passes.PassResult(model, False)


def check_domains(model: ir.Model) -> None:
    """Raise ``UnsupportedModelError`` if a node uses an op domain onnxq does not know."""
    CheckDomainsPass()(model)
