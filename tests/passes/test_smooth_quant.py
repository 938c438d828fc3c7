"""SmoothQuant folds: exact in float, through channel-wise ops only where verified."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import run

from onnxq.config import QuantConfig
from onnxq.passes.plan import NodeSelection
from onnxq.passes.prepare import prepare
from onnxq.smoothing import smooth_model

SEQ, HEADS, DIM = 6, 2, 4
WIDTH = HEADS * DIM


def _value_path_model(perm: tuple[int, ...], rng: np.random.Generator) -> onnx.ModelProto:
    """``x -> MatMul+Add (value projection) -> split heads -> Transpose(perm) -> P @ V ->
    merge heads -> MatMul`` with ``P = softmax(x x^T)`` per head: the value path of attention.
    ``perm`` swaps the head and channel axes on the way back when it reorders channels."""
    inits = [
        numpy_helper.from_array(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32), "w_v"),
        numpy_helper.from_array(rng.normal(size=WIDTH).astype(np.float32), "b_v"),
        numpy_helper.from_array(rng.normal(size=(WIDTH, 5)).astype(np.float32), "w_out"),
        numpy_helper.from_array(np.array([1, SEQ, HEADS, DIM], np.int64), "heads"),
        numpy_helper.from_array(np.array([1, SEQ, WIDTH], np.int64), "merged"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_v"], ["v0"]),
        helper.make_node("Add", ["v0", "b_v"], ["v"]),
        helper.make_node("Reshape", ["v", "heads"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["x", "heads"], ["x4"]),
        helper.make_node("Transpose", ["x4"], ["xh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["x4"], ["xt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["xh", "xt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=list(perm)),
        helper.make_node("Reshape", ["ctx_t", "merged"], ["ctx_m"]),
        helper.make_node("MatMul", ["ctx_m", "w_out"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "value_path",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    feeds = []
    for _ in range(n):
        x = rng.normal(size=(1, SEQ, WIDTH)).astype(np.float32)
        feeds.append({"x": x})
    return feeds


def _outlier_value_model(perm: tuple[int, ...]) -> onnx.ModelProto:
    """The value projection gets two large output channels, so the context has outliers."""
    model = _value_path_model(perm, np.random.default_rng(0))
    w_v = model.graph.initializer[0]
    weights = numpy_helper.to_array(w_v).copy()
    weights[:, [1, 6]] *= 30.0
    w_v.CopyFrom(numpy_helper.from_array(weights, "w_v"))
    return model


@pytest.mark.parametrize(
    ("perm", "folded"),
    [((0, 2, 1, 3), True), ((0, 2, 3, 1), False)],
    ids=["heads-merged-back", "channels-reordered"],
)
def test_value_path_folds_only_when_channels_line_up(perm, folded):
    proto = _outlier_value_model(perm)
    model = prepare(ir.from_proto(proto))
    applied = smooth_model(model, _feeds(np.random.default_rng(1), 3))
    smoothed = ir.to_proto(model)
    how = dict(applied)["ctx_m"]  # the input x is smoothed too, with a Mul (a graph input)
    assert ("folded" in how) is folded
    assert any(n.op_type == "Mul" and "ctx_m" in n.input for n in smoothed.graph.node) is not folded
    feed = _feeds(np.random.default_rng(2), 1)[0]
    np.testing.assert_allclose(run(smoothed, feed)[0], run(proto, feed)[0], rtol=1e-4, atol=1e-4)
    b_v = {t.name for t in smoothed.graph.initializer if t.name.startswith("b_v")}
    assert (b_v != {"b_v"}) is folded  # the value projection's bias was rescaled


def test_fold_only_adds_no_node():
    proto = _outlier_value_model((0, 2, 1, 3))
    model = prepare(ir.from_proto(proto))
    nodes_before = len(model.graph)
    applied = smooth_model(model, _feeds(np.random.default_rng(1), 3), fold_only=True)
    assert [name for name, _ in applied] == ["ctx_m"]  # x (a graph input) cannot fold: skipped
    assert len(model.graph) == nodes_before
    feed = _feeds(np.random.default_rng(2), 1)[0]
    smoothed = ir.to_proto(model)
    np.testing.assert_allclose(run(smoothed, feed)[0], run(proto, feed)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes", [{"exclude_op_types": ("MatMul",)}, {"op_types": ("Conv",)}])
def test_matmuls_the_user_leaves_float_are_not_smoothed(changes):
    """Smoothing them would gain nothing and could cost a Mul."""
    model = prepare(ir.from_proto(_outlier_value_model((0, 2, 1, 3))))
    before = ir.to_proto(model).SerializeToString()
    selection = NodeSelection.from_config(QuantConfig(**changes))
    assert smooth_model(model, _feeds(np.random.default_rng(1), 3), selection=selection) == []
    assert ir.to_proto(model).SerializeToString() == before
    everything = NodeSelection.from_config(QuantConfig())
    assert smooth_model(model, _feeds(np.random.default_rng(1), 3), selection=everything)
