"""Embedding tables stored as int8: ``Gather(W, ids)`` reads int8 rows and scales only them.

Rewrite rule (``QuantizeEmbeddingsPass``): a Gather along axis 0 whose data is a float32
constant matrix read by nothing else, with non-constant indices, becomes::

    Gather(W_int8, ids) -> Cast(float) -> Mul(Gather(scales[V, 1], ids))

with one symmetric int8 scale per row (``scale_v = max|W_v| / 127``). Only the looked-up rows
are dequantized at run time (a DequantizeLinear in front of the Gather would expand the whole
table on every run), and the table shrinks about 4x.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.config import QuantType
from onnxq.passes.naming import add_initializer
from onnxq.passes.plan import NodeDecision, is_constant, is_float32, node_label
from onnxq.qparams import quantize, weight_qparams

MIN_ELEMENTS = 4096  # smaller tables are not worth three extra nodes


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Quantize embedding tables (see module docstring); records a decision per table."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[NodeDecision] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for index, node in enumerate(list(graph)):
            # a new Mul takes the Gather's name and output name
            if not _is_embedding(node):
                continue
            table, ids = node.inputs[0], node.inputs[1]
            array = table.const_value.numpy().astype(np.float32)
            qp = weight_qparams(array, QuantType.INT8, axis=0, symmetric=True)
            name = table.name
            q_table = add_initializer(graph, f"{name}_quantized", quantize(array, qp))
            scales = add_initializer(graph, f"{name}_row_scale", qp.scale.reshape(-1, 1))
            rows = ir.Value(name=f"{name}_rows_int8")
            row_scale = ir.Value(name=f"{name}_rows_scale")
            as_float = ir.Value(name=f"{name}_rows_float")
            output = node.outputs[0]
            embedded = ir.Value(name=f"{name}_rows", shape=output.shape, type=output.type)
            new_nodes = [
                ir.node("Gather", [q_table, ids], outputs=[rows], name=f"{node.name}_int8"),
                ir.node("Gather", [scales, ids], outputs=[row_scale], name=f"{node.name}_scale"),
                ir.node(
                    "Cast",
                    [rows],
                    {"to": ir.DataType.FLOAT},
                    outputs=[as_float],
                    name=f"{node.name}_cast",
                ),
                ir.node("Mul", [as_float, row_scale], outputs=[embedded], name=node.name),
            ]
            graph.insert_before(node, new_nodes)
            output.replace_all_uses_with(embedded, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            embedded.name = output.name
            del graph.initializers[name]
            self.decisions.append(
                NodeDecision(
                    node_label(node, index), "Gather", True, "int8 embedding table (per-row scales)"
                )
            )
        return ir.passes.PassResult(model, modified=bool(self.decisions))


def quantize_embeddings(model: ir.Model) -> list[NodeDecision]:
    """Function twin: rewrites ``model`` in place, returns one decision per table."""
    embed = QuantizeEmbeddingsPass()
    embed(model)
    return embed.decisions


def _is_embedding(node: ir.Node) -> bool:
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() != 0:
        return False
    table, ids = node.inputs
    if not (is_constant(table) and is_float32(table)) or ids is None or is_constant(ids):
        return False
    shape = table.const_value.shape
    return len(shape) == 2 and shape[0] * shape[1] >= MIN_ELEMENTS and len(table.uses()) == 1
