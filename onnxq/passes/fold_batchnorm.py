"""Fold inference-mode BatchNormalization into the Conv / ConvTranspose that feeds it."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes.fold_constants import constant_tensor, remove_unused_initializers

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold ``Conv -> BatchNormalization`` and ``ConvTranspose -> BatchNormalization``.

    With ``s = gamma / sqrt(var + eps)`` per output channel (computed in float64, cast back to the
    weight's dtype):

    1. ``Conv`` (weight ``(M, C/group, k...)``): ``W' = W * s`` over axis 0 (the output-channel
       axis, whatever ``group`` is), ``b' = (b - mean) * s + beta`` with ``b = 0`` when the Conv
       has no bias (a bias input is then added).
    2. ``ConvTranspose`` (weight ``(C, M/group, k...)``): the weight is viewed as
       ``(group, C/group, M/group, k...)`` and output channel ``g * M/group + j`` scales
       ``W[g, :, j]``; the bias as in case 1.
    3. The BN is removed and its output's users (graph outputs included) read the conv's output,
       which takes the BN output's name. New weights are new initializers (the old ones may be
       shared); old ones left unused are dropped.

    Declines (the BN stays, reason logged at debug level): a BN in training mode or with more than
    one output, with ``spatial=0``, outside the default domain, or whose parameters are not
    constant; a conv output that has another user or is a graph output, or that comes from
    another graph; a conv whose weight or bias is not a constant float tensor; parameter shapes
    that do not match the conv's output channels. Subgraphs are visited too.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = _all_names(model)
        folded = 0
        for graph in list(model.graphs()):
            for node in list(graph):
                if node.op_type != "BatchNormalization" or node.domain != "":
                    continue
                reason = _fold(graph, node, names)
                if reason is None:
                    folded += 1
                else:
                    logger.debug("not folding BatchNormalization '%s': %s", node.name, reason)
        if folded:
            remove_unused_initializers(model)
            logger.info("folded %d BatchNormalization nodes into convolutions", folded)
        return ir.passes.PassResult(model, bool(folded))


def fold_batchnorm(model: ir.Model) -> ir.Model:
    """Fold inference BatchNormalization into preceding Conv/ConvTranspose in place; return it."""
    return FoldBatchNormPass()(model).model


def _fold(graph: ir.Graph, bn: ir.Node, names: set[str]) -> str | None:
    """Fold ``bn`` into its producer; return ``None`` on success or the reason it declined."""
    if len(bn.outputs) != 1:
        return "it has training outputs"
    if bn.attributes.get_int("training_mode", 0) != 0:
        return "training_mode=1"
    if bn.attributes.get_int("spatial", 1) != 1:
        return "spatial=0"
    if len(bn.inputs) != 5 or any(value is None for value in bn.inputs):
        return "it does not have five inputs"
    x = bn.inputs[0]
    assert x is not None
    conv = x.producer()
    if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain != "":
        return "its input is not produced by a Conv or ConvTranspose"
    if conv.graph is not graph:
        return "the conv is in another graph"
    if len(x.uses()) != 1 or x.is_graph_output():
        return "the conv output has other users"
    params = [constant_tensor(value) for value in bn.inputs[1:]]  # type: ignore[arg-type]
    if any(tensor is None for tensor in params):
        return "its scale/bias/mean/var are not all constant"
    weight_value = conv.inputs[1] if len(conv.inputs) > 1 else None
    weight = constant_tensor(weight_value) if weight_value is not None else None
    if weight is None:
        return "the conv weight is not constant"
    w = weight.numpy()
    if w.dtype not in _FLOAT_DTYPES or w.ndim < 3:
        return f"the conv weight is {w.dtype} of rank {w.ndim}"
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = None
    if bias_value is not None:
        bias_tensor = constant_tensor(bias_value)
        if bias_tensor is None:
            return "the conv bias is not constant"
        bias = bias_tensor.numpy().astype(np.float64)

    group = conv.attributes.get_int("group", 1)
    channels = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * group
    gamma, beta, mean, var = (tensor.numpy().astype(np.float64) for tensor in params)  # type: ignore[union-attr]
    if any(p.shape != (channels,) for p in (gamma, beta, mean, var)):
        return f"parameter shapes do not match the conv's {channels} output channels"
    if bias is not None and bias.shape != (channels,):
        return "the conv bias shape does not match its output channels"
    if conv.op_type == "ConvTranspose" and w.shape[0] % group:
        return "ConvTranspose weight's input channels are not divisible by group"

    eps = bn.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    w64 = w.astype(np.float64)
    if conv.op_type == "Conv":
        new_w = w64 * scale.reshape((channels,) + (1,) * (w.ndim - 1))
    else:
        grouped = w64.reshape((group, w.shape[0] // group, w.shape[1], *w.shape[2:]))
        factor = scale.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        new_w = (grouped * factor).reshape(w.shape)
    base = bias if bias is not None else np.zeros(channels)
    new_b = (base - mean) * scale + beta

    new_weight = _initializer(graph, names, f"{weight_value.name}_bn", new_w.astype(w.dtype))
    new_bias = _initializer(graph, names, f"{conv.name or 'conv'}_bias_bn", new_b.astype(w.dtype))
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(1, new_weight)
    conv.replace_input_with(2, new_bias)

    y = bn.outputs[0]
    name = y.name
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    x.name = name
    if x.shape is None and y.shape is not None:
        x.shape = y.shape
    return None


def _initializer(graph: ir.Graph, names: set[str], base: str, array: np.ndarray) -> ir.Value:
    name = base
    index = 0
    while name in names:
        index += 1
        name = f"{base}_{index}"
    names.add(name)
    tensor = ir.Tensor(array, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in model.graphs():
        names.update(value.name for value in graph.inputs if value.name)
        names.update(name for name in graph.initializers if name)
        for node in graph:
            names.update(value.name for value in node.outputs if value.name)
    return names
