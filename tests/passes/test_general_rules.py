"""General rules, not cases: shared weights, non-tensor values, subgraph bodies, in every mode.

Graphs are written with ``onnx.helper``; every result must pass the full ONNX checker, load in
ONNX Runtime and stay close to fp32.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from support import run, sqnr_db

from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.errors import OnnxqError, message_lines
from onnxq.pipeline import quantize_with_report

H = 16
RNG = np.random.default_rng(0)
CALIB = [{"x": RNG.standard_normal((4, H)).astype(np.float32)} for _ in range(8)]
FEED = {"x": RNG.standard_normal((6, H)).astype(np.float32)}


def _weight(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    array = np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[0])
    return nh.from_array(array.astype(np.float32), name)


def _model(nodes, outputs, initializers, *, opset: int = 17) -> onnx.ModelProto:
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", H])],
        outputs, initializers,
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def unrolled_rnn(steps: int = 4) -> onnx.ModelProto:
    """An RNN unrolled into per-step Gemms that all read one ``W_hh`` (transB) and one bias;
    the head MatMul reads ``W_hh`` too, untransposed."""
    nodes = [oh.make_node("Gemm", ["x", "W_ih", "b"], ["h0"], transB=1)]
    for t in range(steps):
        nodes += [
            oh.make_node("Gemm", [f"h{t}", "W_hh", "b"], [f"p{t}"], transB=1),
            oh.make_node("Tanh", [f"p{t}"], [f"h{t + 1}"]),
        ]
    nodes.append(oh.make_node("MatMul", [f"h{steps}", "W_hh"], ["y"]))
    bias = nh.from_array(np.linspace(-1, 1, H).astype(np.float32), "b")
    weights = [_weight("W_ih", (H, H), 1), _weight("W_hh", (H, H), 2), bias]
    out = [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", H])]
    return _model(nodes, out, weights)


def with_sequences() -> onnx.ModelProto:
    """Sequence and optional values between quantizable MatMuls."""
    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["a"]),
        oh.make_node("SequenceConstruct", ["a", "x"], ["s"]),
        oh.make_node("SequenceInsert", ["s", "x"], ["s2"]),
        oh.make_node("SequenceErase", ["s2"], ["s3"]),
        oh.make_node("SequenceAt", ["s3", "one"], ["b"]),
        oh.make_node("SequenceLength", ["s3"], ["n"]),
        oh.make_node("ConcatFromSequence", ["s3"], ["c"], axis=0),
        oh.make_node("Optional", ["b"], ["o"]),
        oh.make_node("OptionalGetElement", ["o"], ["b2"]),
        oh.make_node("Add", ["b2", "a"], ["d"]),
        oh.make_node("MatMul", ["d", "W"], ["y"]),
        oh.make_node("MatMul", ["c", "W"], ["z"]),
    ]
    one = nh.from_array(np.array(1, np.int64), "one")
    outputs = [
        oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", H]),
        oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["M", H]),
        oh.make_tensor_value_info("n", onnx.TensorProto.INT64, []),
    ]
    return _model(nodes, outputs, [_weight("W", (H, H), 3), one], opset=18)


def with_if() -> onnx.ModelProto:
    """A MatMul before an If whose branches hold MatMuls reading the outer value."""

    def branch(weight: str, tag: str) -> onnx.GraphProto:
        return oh.make_graph(
            [oh.make_node("MatMul", ["h", weight], [f"o_{tag}"])], f"branch_{tag}", [],
            [oh.make_tensor_value_info(f"o_{tag}", onnx.TensorProto.FLOAT, None)],
        )  # fmt: skip

    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["h"]),
        oh.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        oh.make_node("Greater", ["s", "zero"], ["c"]),
        oh.make_node(
            "If", ["c"], ["y"], then_branch=branch("W", "a"), else_branch=branch("V", "b")
        ),
    ]
    zero = nh.from_array(np.array(0, np.float32), "zero")
    out = [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", H])]
    return _model(nodes, out, [_weight("W", (H, H), 4), _weight("V", (H, H), 5), zero])


MODELS = {"rnn": unrolled_rnn, "sequences": with_sequences, "if": with_if}


def _quantize(name: str, mode: str):
    model = MODELS[name]()
    if mode == "static":
        return model, quantize_with_report(model, CALIB)
    return model, quantize_dynamic_with_report(model)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_valid_and_close_in_every_mode(name, mode):
    model, result = _quantize(name, mode)
    onnx.checker.check_model(result.model, full_check=True)
    for ref, got in zip(run(model, FEED), run(result.model, FEED), strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        if ref.dtype == np.float32:
            assert sqnr_db(ref, got) > 28
    assert result.report.quantized


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_shared_weight_quantized_once(mode):
    _, result = _quantize("rnn", mode)
    names = [init.name for init in result.model.graph.initializer]
    integer = [
        init.name
        for init in result.model.graph.initializer
        if init.data_type == onnx.TensorProto.INT8 and list(init.dims) == [H, H]
    ]
    # W_ih once; W_hh once per layout that reads it: transposed (Gemms), as is (MatMul)
    assert len(integer) == 3 and sum(n.startswith("W_hh") for n in integer) == 2, integer
    assert len(names) == len(set(names))
    assert sum(d.quantized for d in result.report.decisions) == 6


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_non_tensor_values_left_float_and_named(mode):
    _, result = _quantize("sequences", mode)
    (note,) = [n for n in result.report.notes if "non-tensor" in n]
    assert "s (sequence)" in note and "o (optional)" in note
    ops = {n.op_type for n in result.model.graph.node}
    assert {"SequenceConstruct", "ConcatFromSequence", "Optional"} <= ops


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_subgraph_bodies_float_and_recorded_in_every_mode(mode):
    _, result = _quantize("if", mode)
    inside = [d for d in result.report.decisions if "subgraph" in d.reason]
    assert len(inside) == 2 and not any(d.quantized for d in inside)
    (if_node,) = [n for n in result.model.graph.node if n.op_type == "If"]
    for attr in if_node.attribute:
        assert {n.op_type for n in attr.g.node} == {"MatMul"}


def test_uneven_sequence_outputs_skipped_by_the_quality_check():
    """A graph output that is a sequence of differently shaped tensors is no tensor to compare."""
    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["a"]),
        oh.make_node("SplitToSequence", ["a", "split"], ["parts"], axis=1),
        oh.make_node("MatMul", ["a", "W"], ["y"]),
    ]
    split = nh.from_array(np.array([3, H - 3], np.int64), "split")
    outputs = [
        oh.make_tensor_sequence_value_info("parts", onnx.TensorProto.FLOAT, None),
        oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", H]),
    ]
    model = _model(nodes, outputs, [_weight("W", (H, H), 6), split])
    result = quantize_with_report(model, CALIB)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.quality is not None and result.report.quantized


def test_model_failing_strict_shape_inference_is_one_line_refusal():
    """The checker's full check raises ``InferenceError`` (not ``ValidationError``) for a graph
    output whose declared shape contradicts inference: a one-line ``OnnxqError`` all the same."""
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", H])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", H, 2])],
        [_weight("W", (H, H), 7)],
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)  # what loading checks: it passes
    with pytest.raises(OnnxqError, match="fails the ONNX checker") as refusal:
        quantize_dynamic_with_report(model)
    assert len(message_lines(refusal.value)) == 1
