"""Synthetic calibration inputs for token models, for data-free SmoothQuant in dynamic mode.

In a transformer fed token ids, the activation outlier channels that SmoothQuant moves into the
weights come from the weights (embedding, LayerNorm scale and bias), not from the text: random
tokens light up the same channels as real sentences. So, when no calibration data is given:

- a *token model* is one whose graph inputs are all integer tensors;
- an input that indexes a constant table (``Gather`` indices, possibly through ``Cast``,
  ``Unsqueeze``, ``Squeeze``, ``Reshape``, ``Flatten``, ``Identity``) is drawn uniformly from the
  table's rows (the smallest table it indexes); any other integer input (attention masks) is 1;
- the batch axis holds the samples; other symbolic dims get ``seq_len``.

Models with any float input get no synthetic data: random images or signals are no proxy.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from onnxq.model_io import input_specs

INDEX_PRESERVING = frozenset({"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity"})


def synthetic_token_feeds(
    model: onnx.ModelProto, *, samples: int = 32, seq_len: int = 64, seed: int = 0
) -> dict[str, np.ndarray] | None:
    """``{input: array}`` with ``samples`` random token sequences on each input's batch axis,
    or ``None`` when ``model`` is not a token model."""
    specs = input_specs(model)
    if not specs or any(s.shape is None or s.dtype.kind not in "iu" for s in specs):
        return None
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        batch_axis = spec.batch_axis if spec.batch_axis is not None else 0
        shape = [seq_len if dim is None else dim for dim in spec.shape]
        if not shape:
            return None
        shape[batch_axis] = samples * (spec.shape[batch_axis] or 1)
        rows = indexed_table_rows(model.graph, spec.name)
        feeds[spec.name] = (rng.integers(0, rows, size=shape) if rows else np.ones(shape)).astype(
            spec.dtype
        )
    return feeds


def indexed_table_rows(graph: onnx.GraphProto, name: str) -> int | None:
    """Rows of the smallest constant table that tensor ``name`` indexes through ``Gather``."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for tensor in node.input:
            readers[tensor].append(node)
    tables = {init.name: tuple(init.dims) for init in graph.initializer}
    rows: list[int] = []
    pending, seen = [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in readers[tensor]:
            if node.op_type == "Gather" and node.input[1] == tensor and node.input[0] in tables:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = tables[node.input[0]]
                if dims:
                    rows.append(dims[axis])
            elif node.op_type in INDEX_PRESERVING and node.input[0] == tensor:
                pending.extend(node.output)
    return min(rows) if rows else None
