"""Protos to onnx-ir and back: map types (a ZipMap's ``seq(map)`` output) survive every mode."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from support import run

from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.ir_io import HELD_TYPES, from_proto, to_proto
from onnxq.pipeline import quantize_with_report

RNG = np.random.default_rng(0)


def zipmap_classifier() -> onnx.ModelProto:
    """x[N,4] -> MatMul -> Softmax -> ZipMap: class probabilities as a sequence of maps."""
    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["logits"]),
        oh.make_node("Softmax", ["logits"], ["p"], axis=1),
        oh.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    probs = oh.make_value_info(
        "probs",
        oh.make_sequence_type_proto(
            oh.make_map_type_proto(onnx.TensorProto.INT64, oh.make_tensor_type_proto(1, None))
        ),
    )
    graph = oh.make_graph(
        nodes,
        "classifier",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [probs, oh.make_tensor_value_info("p", onnx.TensorProto.FLOAT, ["N", 3])],
        [nh.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "W")],
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 1)]
    model = oh.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_map_types_round_trip_and_leave_no_trace():
    model = zipmap_classifier()
    back = to_proto(from_proto(model))
    assert back.graph.output[0].type == model.graph.output[0].type
    assert HELD_TYPES not in {p.key for p in back.metadata_props}
    onnx.checker.check_model(back, full_check=True)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_zipmap_model_quantizes_with_its_output_types(mode):
    model = zipmap_classifier()
    feed = {"x": RNG.standard_normal((8, 4)).astype(np.float32)}
    if mode == "static":
        result = quantize_with_report(model, [feed])
    else:
        result = quantize_dynamic_with_report(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.graph.output[0].type == model.graph.output[0].type
    assert any(d.quantized and d.op_type == "MatMul" for d in result.report.decisions)
    expected, got = run(model, feed), run(result.model, feed)
    assert [sorted(m) for m in got[0]] == [[0, 1, 2]] * 8
    np.testing.assert_allclose(got[1], expected[1], atol=0.05)
