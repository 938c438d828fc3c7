"""Weight MatMuls that read one input merge into one MatMul, bias Add and Split: exact in float,
and in int8 where weights are per channel; kept apart where that would not be exact or the user
addresses a member."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import run, sqnr_db

from onnxq.config import QuantConfig
from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.ir_io import from_proto, to_proto
from onnxq.passes.merge_matmuls import merge_matmuls
from onnxq.pipeline import quantize_with_report

WIDTH, COLUMNS = 16, (8, 8, 4)


def shared_input_model(*, opset: int = 17, result_is_output: bool = False) -> onnx.ModelProto:
    """``x`` read by three weight MatMuls (two with a bias Add, one with the bias first, one
    without), each followed by Relu, concatenated; and one MatMul of another input."""
    rng = np.random.default_rng(0)
    nodes, inits, relus = [], [], []
    for i, columns in enumerate(COLUMNS):
        weight = rng.normal(size=(WIDTH, columns)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"mm{i}"], name=f"proj{i}"))
        result = f"mm{i}"
        if i < 2:
            inits.append(numpy_helper.from_array(rng.normal(size=columns).astype("f"), f"b{i}"))
            operands = [f"mm{i}", f"b{i}"] if i == 0 else [f"b{i}", f"mm{i}"]
            nodes.append(helper.make_node("Add", operands, [f"y{i}"], name=f"bias{i}"))
            result = f"y{i}"
        nodes.append(helper.make_node("Relu", [result], [f"r{i}"]))
        relus.append(f"r{i}")
    inits.append(numpy_helper.from_array(rng.normal(size=(WIDTH, 4)).astype("f"), "w_other"))
    nodes.append(helper.make_node("MatMul", ["z", "w_other"], ["other"], name="other"))
    nodes.append(helper.make_node("Concat", [*relus, "other"], ["out"], axis=-1))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 5, 24])]
    if result_is_output:
        outputs.append(helper.make_tensor_value_info("y0", TensorProto.FLOAT, ["n", 5, 8]))
    graph = helper.make_graph(
        nodes,
        "shared_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, WIDTH]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 5, WIDTH]),
        ],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(n: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(n, 5, WIDTH)).astype(np.float32) for k in ("x", "z")}


def _merged(proto: onnx.ModelProto, config: QuantConfig) -> tuple[onnx.ModelProto, list[str]]:
    model = from_proto(proto)
    merged = merge_matmuls(model, config.resolved())
    return to_proto(model), merged


def _weight_matmuls(model: onnx.ModelProto) -> int:
    constants = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in constants for n in model.graph.node)


def test_merge_is_exact_in_float_and_keeps_names():
    proto = shared_input_model()
    merged_proto, merged = _merged(proto, QuantConfig())
    assert merged == ["proj0+proj1+proj2"]
    assert _weight_matmuls(merged_proto) == 2  # the merged one and the other input's
    ops = Counter(n.op_type for n in merged_proto.graph.node)
    assert ops["Split"] == 1 and ops["Add"] == 1
    split = next(n for n in merged_proto.graph.node if n.op_type == "Split")
    assert list(split.output) == ["y0", "y1", "mm2"]  # readers see the same tensors
    used = {name for n in merged_proto.graph.node for name in n.input}
    assert all(t.name in used for t in merged_proto.graph.initializer)  # old weights dropped
    onnx.checker.check_model(merged_proto, full_check=True)
    feeds = _feeds()
    np.testing.assert_allclose(run(merged_proto, feeds)[0], run(proto, feeds)[0], atol=1e-5)


@pytest.mark.parametrize(
    ("proto", "config"),
    [
        (shared_input_model(), QuantConfig(exclude_nodes=("proj1",))),  # the user names one
        (shared_input_model(), QuantConfig(exclude_op_types=("MatMul",))),
        (shared_input_model(), QuantConfig(merge_matmuls=False)),
        (shared_input_model(), QuantConfig(per_channel=False)),  # one scale per weight
        (shared_input_model(), QuantConfig(target="qnn")),  # per-tensor MatMul weights
        (shared_input_model(result_is_output=True), QuantConfig()),
        (shared_input_model(opset=12), QuantConfig()),  # Split sizes are an input from 13
    ],
    ids=["excluded-node", "excluded-op", "off", "per-tensor", "qnn", "graph-output", "opset12"],
)
def test_groups_stay_apart_where_merging_is_not_exact_or_not_wanted(proto, config):
    merged_proto, merged = _merged(proto, config)
    assert merged == []
    assert _weight_matmuls(merged_proto) == 4


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_model_is_the_same_with_one_gemm(mode):
    """Per-channel weights and one quantization of ``x``: merging changes the integers of no
    product, so the merged model's outputs are the separate one's up to float rounding."""
    proto, calib = shared_input_model(), _feeds(16, seed=2)

    def quantize(merge: bool) -> onnx.ModelProto:
        config = QuantConfig(merge_matmuls=merge)
        if mode == "static":
            return quantize_with_report(proto, calib, config).model
        return quantize_dynamic_with_report(proto, config, calibration_data=calib).model

    merged, apart = quantize(True), quantize(False)
    feeds = _feeds(4, seed=3)
    reference = run(proto, feeds)[0]
    got_merged, got_apart = run(merged, feeds)[0], run(apart, feeds)[0]
    scale = np.abs(reference).max()
    assert np.abs(got_merged - got_apart).max() <= 1e-4 * scale
    assert sqnr_db(reference, got_merged) >= 25  # and it is a real int8 model
    integer_ops = ("MatMulInteger", "DequantizeLinear", "DynamicQuantizeLinear")
    assert any(n.op_type in integer_ops for n in merged.graph.node)
    assert sum(n.op_type == "Split" for n in merged.graph.node) == 1
