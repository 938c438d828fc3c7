"""Where Q/DQ pairs go, and that ONNX Runtime fuses them into int8 kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import make_cnn, optimized_op_counts, run, sqnr_db

from onnxq.config import QuantConfig
from onnxq.pipeline import quantize_with_report


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def test_cnn_every_conv_fuses_to_int8_and_output_is_close(cnn, cnn_calib, rng, tmp_path):
    result = quantize_with_report(cnn, cnn_calib, QuantConfig())
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    counts = optimized_op_counts(q, tmp_path)
    assert counts.get("QLinearConv", 0) == 3
    assert "Conv" not in counts
    assert counts.get("QLinearAdd", 0) == 1
    assert counts.get("QGemm", 0) == 1
    assert counts.get("QLinearGlobalAveragePool", 0) == 1
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run(cnn, {"x": x})[0], run(q, {"x": x})[0]) > 25


def test_weights_are_int8_per_channel_and_biases_int32(cnn, cnn_calib):
    q = quantize_with_report(cnn, cnn_calib, QuantConfig()).model
    floats = [
        t.name
        for t in q.graph.initializer
        if t.data_type == TensorProto.FLOAT
        and t.name in {"w1", "w2", "w3", "wf", "b1", "b2", "b3", "bf"}
    ]
    assert floats == []
    for conv in _nodes(q, "Conv"):
        w_dq = _producer(q, conv.input[1])
        assert w_dq.op_type == "DequantizeLinear"
        assert helper.get_attribute_value(w_dq.attribute[0]) == 0  # axis 0 for Conv
        weight = _init(q, w_dq.input[0])
        assert weight.dtype == np.int8
        w_scale = _init(q, w_dq.input[1])
        assert w_scale.shape == (weight.shape[0],)
        b_dq = _producer(q, conv.input[2])
        bias, b_scale = _init(q, b_dq.input[0]), _init(q, b_dq.input[1])
        assert bias.dtype == np.int32
        x_dq = _producer(q, conv.input[0])
        x_scale = _init(q, x_dq.input[1])
        np.testing.assert_array_equal(b_scale, (x_scale * w_scale).astype(np.float32))
    gemm_w_dq = _producer(q, _nodes(q, "Gemm")[0].input[1])
    assert helper.get_attribute_value(gemm_w_dq.attribute[0]) == 0  # transB=1: axis 0


def test_q_goes_after_relu_and_maxpool_shares_qparams(cnn, cnn_calib):
    q = quantize_with_report(cnn, cnn_calib, QuantConfig()).model
    relu1 = next(n for n in q.graph.node if n.name == "relu1")
    assert _producer(q, relu1.input[0]).op_type == "Conv"  # no Q/DQ between Conv and Relu
    pool = next(n for n in q.graph.node if n.name == "pool2")
    dq_in = _producer(q, pool.input[0])
    q_out = next(
        n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0]
    )
    assert dq_in.input[1:] == q_out.input[1:]  # same scale and zero-point initializers
    relu_q_zero_point = _init(q, dq_in.input[2])
    assert relu_q_zero_point == 0  # post-ReLU range starts at 0: ORT drops the Relu


@pytest.mark.parametrize("trans_b, axis", [(0, 1), (1, 0)])
def test_gemm_weight_axis_follows_trans_b(trans_b, axis, rng):
    w = rng.standard_normal((6, 4) if trans_b else (4, 6)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=trans_b),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((16, 4)).astype(np.float32)}
    q = quantize_with_report(model, calib, QuantConfig()).model
    dq = _producer(q, _nodes(q, "Gemm")[0].input[1])
    assert helper.get_attribute_value(dq.attribute[0]) == axis
    assert _init(q, dq.input[1]).shape == (6,)


def test_matmul_weight_is_per_column_and_output_stays_float(rng, tmp_path):
    w = rng.standard_normal((8, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((16, 3, 8)).astype(np.float32)}
    q = quantize_with_report(model, calib, QuantConfig()).model
    dq = _producer(q, _nodes(q, "MatMul")[0].input[1])
    assert helper.get_attribute_value(dq.attribute[0]) == 1
    assert q.graph.output[0].name == "y"
    assert _producer(q, "y").op_type == "MatMul"  # float output: MatMulIntegerToFloat
    assert optimized_op_counts(q, tmp_path).get("MatMulIntegerToFloat") == 1


def test_selective_quantization_by_name_and_op_type(cnn, cnn_calib):
    config = QuantConfig(exclude_nodes=("^conv2$",), exclude_op_types=("Gemm",))
    report = quantize_with_report(cnn, cnn_calib, config).report
    decisions = {d.name: d for d in report.decisions}
    assert not decisions["conv2"].quantized
    assert "name pattern" in decisions["conv2"].reason
    assert not decisions["fc"].quantized
    assert decisions["fc"].reason == "excluded by op type"
    assert decisions["conv1"].quantized and decisions["conv3"].quantized


def test_op_types_whitelist(cnn, cnn_calib):
    report = quantize_with_report(cnn, cnn_calib, QuantConfig(op_types=("Conv",))).report
    assert {d.op_type for d in report.quantized} <= {"Conv", "MaxPool", "Flatten"}
    assert all(d.op_type == "Conv" for d in report.quantized if d.reason == "QLinearConv")


def test_integer_arithmetic_is_left_alone(rng):
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Add", ["s", "one"], ["s1"], name="int_add"),
        helper.make_node("Reshape", ["x", "flat"], ["xf"]),
        helper.make_node("Add", ["xf", "xf"], ["y"], name="float_add"),
        helper.make_node("Relu", ["y"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s1", TensorProto.INT64, [2]),
        ],
        [
            numpy_helper.from_array(np.array([1, 1], np.int64), "one"),
            numpy_helper.from_array(np.array([-1, 4], np.int64), "flat"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((8, 4)).astype(np.float32)}
    result = quantize_with_report(model, calib, QuantConfig())
    onnx.checker.check_model(result.model, full_check=True)
    decisions = {d.name: d for d in result.report.decisions}
    assert "int_add" not in decisions or not decisions["int_add"].quantized


def test_conv_graph_output_declines_unless_outputs_quantized(rng, tmp_path):
    model = make_cnn(rng, graph_output_is_conv=True)
    calib = {"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    report = quantize_with_report(model, calib, QuantConfig()).report
    assert not {d.name: d for d in report.decisions}["conv3"].quantized
    result = quantize_with_report(model, calib, QuantConfig(quantize_outputs=True))
    assert {d.name: d for d in result.report.decisions}["conv3"].quantized
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert _producer(result.model, "y").op_type == "DequantizeLinear"
    assert optimized_op_counts(result.model, tmp_path).get("QLinearConv") == 3


def test_shared_weight_gets_one_dequantize(rng):
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="c1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w"], ["b"], name="c2"),
        helper.make_node("Relu", ["b"], ["out"]),
        helper.make_node("Identity", ["out"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((8, 4, 5, 5)).astype(np.float32)}
    q = quantize_with_report(model, calib, QuantConfig()).model
    weight_dqs = [n for n in _nodes(q, "DequantizeLinear") if n.input[0].startswith("w_")]
    assert len(weight_dqs) == 1


def test_bias_that_would_overflow_int32_raises_weight_scale(rng):
    w = numpy_helper.from_array(np.full((2, 1, 1, 1), 1e-6, np.float32), "w")
    b = numpy_helper.from_array(np.array([5e4, -3e4], np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Identity", ["r"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": (rng.standard_normal((8, 1, 3, 3)) * 1e-3).astype(np.float32)}
    q = quantize_with_report(model, calib, QuantConfig(quantize_outputs=True)).model
    b_dq = _producer(q, _nodes(q, "Conv")[0].input[2])
    q_bias, b_scale = _init(q, b_dq.input[0]), _init(q, b_dq.input[1])
    assert np.abs(q_bias.astype(np.int64)).max() <= 2**31 - 1
    np.testing.assert_allclose(q_bias * b_scale, [5e4, -3e4], rtol=1e-6)
    x = (rng.standard_normal((2, 1, 3, 3)) * 1e-3).astype(np.float32)
    ref, out = run(model, {"x": x})[0], run(q, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=0.02)


def test_tensor_without_finite_values_is_left_float(rng):
    nodes = [
        helper.make_node("Div", ["x", "zero"], ["inf"]),
        helper.make_node("Conv", ["inf", "w"], ["c"], name="conv_on_inf"),
        helper.make_node("Conv", ["x", "w"], ["d"], name="conv_ok"),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Add", ["c", "r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
            numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": np.abs(rng.standard_normal((4, 1, 3, 3))).astype(np.float32) + 0.1}
    result = quantize_with_report(model, calib, QuantConfig())
    decisions = {d.name: d for d in result.report.decisions}
    assert not decisions["conv_on_inf"].quantized
    assert "calibration" in decisions["conv_on_inf"].reason
    assert decisions["conv_ok"].quantized
    assert result.report.uncalibrated == ["c", "inf"]  # Conv of inf is inf too


def test_subgraph_bodies_stay_float_and_model_is_valid(rng, tmp_path: Path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 2, 4, 4] x, bool cond) => (float[N, 2, 4, 4] y)
        <float[2, 2, 1, 1] w = {1, 0, 0, 1}> {
        c = Conv(x, w)
        r = Relu(c)
        y = If(cond) <
            then_branch = g1 () => (float[N, 2, 4, 4] t) { t = Conv(r, w) },
            else_branch = g2 () => (float[N, 2, 4, 4] e) { e = Identity(r) }
        >
    }
    """
    model = onnx.parser.parse_model(text)
    calib = [{"x": rng.standard_normal((2, 2, 4, 4)).astype(np.float32), "cond": np.array(True)}]
    result = quantize_with_report(model, calib, QuantConfig())
    onnx.checker.check_model(result.model, full_check=True)
    assert any(d.reason.startswith("inside a subgraph") for d in result.report.decisions)
    feed = calib[0]
    assert sqnr_db(run(model, feed)[0], run(result.model, feed)[0]) > 25
