"""Rewrite equivalent float patterns into the forms ORT has int8 kernels for.

Rewrite rule (``SpatialMeanToGlobalPoolPass``): ``ReduceMean`` over every spatial axis of an
``N, C, spatial...`` tensor (axes ``2..rank-1``, as an attribute or a constant input) becomes
``GlobalAveragePool``; with ``keepdims = 0`` a ``Flatten`` follows (``N, C``). Exporters emit
either form for the same ``AdaptiveAvgPool2d(1)`` (the dynamo exporter prefers ReduceMean), and
only GlobalAveragePool has an int8 kernel. A rank-3 tensor is ``N, C, L`` only when a
channel-first op made it (through elementwise activations): a mean over the last axis of a
``batch, sequence, width`` activation is a normalisation, which ONNX Runtime fuses into
LayerNormalization only while it stays a ReduceMean.
"""

from __future__ import annotations

import onnx_ir as ir

CHANNEL_FIRST_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MaxPool",
        "AveragePool",
        "BatchNormalization",
        "InstanceNormalization",
    }
)
ELEMENTWISE_OPS = frozenset(
    {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Mul"}
)


class SpatialMeanToGlobalPoolPass(ir.passes.InPlacePass):
    """Apply the module's rule to the main graph."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if _spatial_mean_axes(node) is None:
                continue
            keepdims = node.attributes.get("keepdims")
            data, output = node.inputs[0], node.outputs[0]
            name = output.name
            final = ir.Value(name=f"{name}_pooled")
            replacement = [ir.node("GlobalAveragePool", [data], outputs=[final], name=node.name)]
            if keepdims is not None and keepdims.as_int() == 0:
                pooled, final = final, ir.Value(name=f"{name}_flat")
                replacement.append(
                    ir.node(
                        "Flatten", [pooled], {"axis": 1}, outputs=[final], name=f"{node.name}_flat"
                    )
                )
            final.type, final.shape = output.type, output.shape
            graph.insert_before(node, replacement)
            output.replace_all_uses_with(final, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            final.name = name
            modified = True
        return ir.passes.PassResult(model, modified)


def _spatial_mean_axes(node: ir.Node) -> list[int] | None:
    """The reduced axes when ``node`` is a ReduceMean over exactly the spatial axes."""
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
        return None
    data = node.inputs[0]
    if data is None or data.shape is None or data.dtype != ir.DataType.FLOAT:
        return None
    rank = len(data.shape)
    if rank < 3 or (rank == 3 and not _made_channel_first(data)):
        return None
    if "axes" in node.attributes:
        axes = list(node.attributes["axes"].as_ints())
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        constant = node.inputs[1].const_value
        if constant is None:
            return None
        axes = [int(a) for a in constant.numpy().reshape(-1)]
    else:
        return None
    axes = sorted(a % rank for a in axes)
    return axes if axes == list(range(2, rank)) else None


def _made_channel_first(value: ir.Value) -> bool:
    """Whether a channel-first op produced ``value``, through elementwise ops."""
    producer = value.producer()
    while producer is not None and producer.op_type in ELEMENTWISE_OPS and producer.inputs:
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is not None and producer.op_type in CHANNEL_FIRST_OPS
