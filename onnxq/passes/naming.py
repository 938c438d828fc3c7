"""New initializers get names no initializer of the graph holds yet."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def unique_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... the first no initializer of ``graph`` holds."""
    candidate, counter = name, 0
    while candidate in graph.initializers:
        counter += 1
        candidate = f"{name}_{counter}"
    return candidate


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a typed, shaped initializer under a unique form of ``name``."""
    name = unique_name(graph, name)
    tensor = ir.tensor(np.asarray(array), name=name)
    value = ir.Value(name=name, const_value=tensor)
    value.type = ir.TensorType(tensor.dtype)
    value.shape = ir.Shape(tensor.shape)
    graph.register_initializer(value)
    return value
