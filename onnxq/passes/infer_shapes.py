"""ONNX shape inference merged into an IR model, every value type kept (sequences, maps,
optionals), models over 2 GB included."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import onnx_ir as ir

from onnxq.ir_io import from_proto, to_proto

DETACH_BYTES = 1024  # weights larger than this are not serialised for inference


class InferShapesPass(ir.passes.InPlacePass):
    """Fill in value types and shapes with ONNX shape inference (data propagation on).

    Cases:

    1. Inference succeeds: every value takes the inferred type (whole, so a sequence stays a
       sequence) and shape, subgraphs included.
    2. A node inference cannot handle (custom domain, unknown op): skipped, the rest still
       inferred (non-strict mode).
    3. Inference fails as a whole: the model is left unchanged, nothing raises.
    4. Weights over ``DETACH_BYTES`` are detached while serialising (passed as typed inputs),
       so models over 2 GB are handled.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            with detached_weights(model):
                proto = to_proto(model)
            inferred = onnx.shape_inference.infer_shapes(
                proto, check_type=False, strict_mode=False, data_prop=True
            )
        except (onnx.shape_inference.InferenceError, RuntimeError, ValueError):
            return ir.passes.PassResult(model, False)
        return ir.passes.PassResult(model, _merge(model, from_proto(inferred)))


def infer_shapes(model: ir.Model) -> ir.Model:
    """Infer types and shapes of ``model``'s values in place (never raises); return it."""
    return InferShapesPass()(model).model


@contextmanager
def detached_weights(model: ir.Model) -> Iterator[None]:
    """Within the block, large main-graph weights are typed graph inputs without data."""
    graph = model.graph
    big = [
        value
        for value in graph.initializers.values()
        if value.const_value is not None and value.const_value.nbytes > DETACH_BYTES
    ]
    tensors = [value.const_value for value in big]
    appended = []
    for value, tensor in zip(big, tensors, strict=True):
        value.shape = value.shape or ir.Shape(tensor.shape)
        value.type = value.type or ir.TensorType(tensor.dtype)
        del graph.initializers[value.name]
        value.const_value = None
        if not value.is_graph_input():
            graph.inputs.append(value)
            appended.append(value)
    try:
        yield
    finally:
        for value in appended:
            graph.inputs.remove(value)
        for value, tensor in zip(big, tensors, strict=True):
            value.const_value = tensor
            graph.register_initializer(value)


def _merge(model: ir.Model, inferred: ir.Model) -> bool:
    """Copy inferred types and shapes onto ``model``'s values, graph by graph."""
    modified = False
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=False):
        found = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            source = found.get(name)
            if source is None:
                continue
            if source.type is not None and source.type != value.type:
                value.type = source.type
                modified = True
            if source.shape is not None and source.shape != value.shape:
                value.shape = source.shape
                modified = True
    return modified


def drop_value_info(model: onnx.ModelProto) -> None:
    """Remove the intermediate ``value_info`` of every graph and subgraph, as exporters write
    models: what onnxq inferred is for its own passes. Runtimes re-infer shapes; ONNX Runtime
    (1.3x CPU) uses written ones to fuse Add + LayerNormalization into SkipLayerNormalization,
    whose kernel runs ~6x slower than the pair on a [1, 64, 384] activation."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        del graph.value_info[:]
        graphs.extend(
            subgraph
            for node in graph.node
            for attribute in node.attribute
            for subgraph in (*attribute.graphs, *([attribute.g] if attribute.HasField("g") else []))
        )
