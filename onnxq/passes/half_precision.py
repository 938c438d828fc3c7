"""float16 / bfloat16 models (mixed-precision exports) quantized through float32 compute.

ONNX Runtime's CPU int8 kernels (QLinearConv, QLinearMatMul, DynamicQuantizeMatMul) are fused
from float32 Q/DQ only, so a half-precision model is quantized as float32 inside an unchanged
interface, and what stays float is stored in half precision again:

``UpcastHalfPass`` (first prepare step) rules:

1. Every float16/bfloat16 main-graph input gets ``Cast(to=FLOAT)`` right after it; every such
   output is produced by ``Cast(to=<its type>)``: callers feed and read the same dtypes.
2. Every half-precision initializer, tensor attribute (``Constant``, ``ConstantOfShape``...)
   and value type becomes float32; ``to``/``dtype`` attributes naming a half type name FLOAT.
   Subgraphs included.
3. The names of the converted main-graph initializers are recorded in the model's
   ``metadata_props`` (``HALF_WEIGHTS``).

``store_half_weights`` (at the end) rule: each recorded initializer that is still float32 (a
weight left float) is stored in its half type again, read through a ``Cast`` that ONNX Runtime
folds at load; int8 weights and the Q/DQ scales (float32, as fused kernels need) are not touched.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from onnxq.passes.naming import unique_name

HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
HALF_WEIGHTS = "onnxq.half_weights"
DTYPE_ATTRIBUTES = ("to", "dtype")


class UpcastHalfPass(ir.passes.InPlacePass):
    """Rules 1-3 of the module docstring."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        converted: dict[str, str] = {}
        for name, value in graph.initializers.items():
            if value.const_value is not None and value.const_value.dtype in HALF:
                converted[name] = value.const_value.dtype.name
        modified = bool(converted) | _wrap_interface(graph)
        for sub in model.graphs():
            modified |= _upcast_graph(sub, main=sub is graph)
        if converted:
            model.metadata_props[HALF_WEIGHTS] = json.dumps(converted, sort_keys=True)
        return ir.passes.PassResult(model, modified)


def _wrap_interface(graph: ir.Graph) -> bool:
    """Rule 1: Casts at the main graph's half-precision inputs and outputs."""
    modified = False
    for value in list(graph.inputs):
        if not _is_half(value):
            continue
        widened = ir.Value(name=f"{value.name}_float", shape=value.shape)
        widened.type = ir.TensorType(ir.DataType.FLOAT)
        value.replace_all_uses_with(widened)
        cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, outputs=[widened])
        graph.insert_before(next(iter(graph)), cast)
        modified = True
    for index, value in enumerate(list(graph.outputs)):
        if not _is_half(value):
            continue
        dtype, name = value.dtype, value.name
        value.name = f"{name}_float"
        narrowed = ir.Value(name=name, shape=value.shape, type=ir.TensorType(dtype))
        graph.append(ir.node("Cast", [value], {"to": dtype}, outputs=[narrowed]))
        graph.outputs[index] = narrowed
        modified = True
    return modified


def _upcast_graph(graph: ir.Graph, *, main: bool) -> bool:
    """Rule 2 on one graph (the interface Casts of rule 1 keep their half types)."""
    modified = False
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype in HALF:
            value.const_value = ir.tensor(_float32(tensor), name=value.name)
            value.type = ir.TensorType(ir.DataType.FLOAT)
            modified = True
    interface = {id(v) for v in (*graph.inputs, *graph.outputs)} if main else set()
    for node in graph:
        for key, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype in HALF:
                node.attributes[key] = ir.AttrTensor(key, ir.tensor(_float32(attr.as_tensor())))
                modified = True
            elif _names_half(key, attr) and not _narrows_output(node, interface):
                node.attributes[key] = ir.AttrInt64(key, ir.DataType.FLOAT)
                modified = True
        for value in node.outputs:
            if _is_half(value) and id(value) not in interface:
                value.type = ir.TensorType(ir.DataType.FLOAT)
                modified = True
    for value in graph.inputs:
        if not main and _is_half(value):
            value.type = ir.TensorType(ir.DataType.FLOAT)
            modified = True
    return modified


def _names_half(key: str, attr: ir.Attr) -> bool:
    """A ``to``/``dtype`` attribute naming a half type."""
    return (
        key in DTYPE_ATTRIBUTES
        and attr.type == ir.AttributeType.INT
        and ir.DataType(attr.as_int()) in HALF
    )


def _narrows_output(node: ir.Node, interface: set[int]) -> bool:
    """The output Cast of rule 1."""
    return node.op_type == "Cast" and any(id(out) in interface for out in node.outputs)


def store_half_weights(model: ir.Model) -> None:
    """The closing rule of the module docstring; removes the record."""
    record = model.metadata_props.pop(HALF_WEIGHTS, None)
    if record is None:
        return
    graph = model.graph
    for name, dtype_name in json.loads(record).items():
        value = graph.initializers.get(name)
        if value is None or value.dtype != ir.DataType.FLOAT or not value.uses():
            continue
        dtype = ir.DataType[dtype_name]
        widened = ir.Value(name=unique_name(graph, f"{name}_float"), shape=value.shape)
        widened.type = ir.TensorType(ir.DataType.FLOAT)
        value.replace_all_uses_with(widened)
        del graph.initializers[name]
        value.name = unique_name(graph, f"{name}_float32")  # the detached float copy
        stored = ir.tensor(value.const_value.numpy().astype(dtype.numpy()), name=name)
        half = ir.Value(name=name, const_value=stored, type=ir.TensorType(dtype))
        half.shape = ir.Shape(stored.shape)
        graph.register_initializer(half)
        cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT}, outputs=[widened])
        graph.insert_before(next(iter(graph)), cast)


def _is_half(value: ir.Value) -> bool:
    return isinstance(value.type, ir.TensorType) and value.dtype in HALF


def _float32(tensor: ir.TensorProtocol) -> np.ndarray:
    return np.asarray(tensor.numpy(), dtype=np.float32)
