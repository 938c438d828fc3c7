"""Synthetic token inputs: table sizes found through index-preserving ops, masks set to 1."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.synthetic import indexed_table_rows, synthetic_token_feeds


def _token_model(*, ids_type: int = TensorProto.INT64) -> onnx.ModelProto:
    """ids -> Cast -> Gather(table 37 x 4) ; mask -> Cast -> Unsqueeze -> Mul."""
    table = numpy_helper.from_array(np.ones((37, 4), np.float32), "table")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["table", "ids32"], ["emb"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("ids", ids_type, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [table, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_ids_cover_the_table_and_masks_are_ones():
    model = _token_model()
    assert indexed_table_rows(model.graph, "ids") == 37
    assert indexed_table_rows(model.graph, "mask") is None
    feeds = synthetic_token_feeds(model, samples=50, seq_len=20)
    assert feeds["ids"].shape == (50, 20) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() <= 36
    assert len(np.unique(feeds["ids"])) == 37  # 1000 draws from 37 rows hit every row
    np.testing.assert_array_equal(feeds["mask"], np.ones((50, 20), np.int64))


def test_the_feeds_run_and_are_repeatable():
    import onnxruntime as ort

    model = _token_model(ids_type=TensorProto.INT32)
    feeds = synthetic_token_feeds(model, samples=3, seq_len=5, seed=4)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, feeds)[0].shape == (3, 5, 4)
    again = synthetic_token_feeds(model, samples=3, seq_len=5, seed=4)
    np.testing.assert_array_equal(feeds["ids"], again["ids"])


def test_float_inputs_get_no_synthetic_data(cnn):
    assert synthetic_token_feeds(cnn) is None


def test_dynamic_mode_skips_smoothing_when_random_tokens_fail():
    """A token model with an integer shape input: all-ones shapes make Reshape fail, so
    the optional smoothing step is skipped (and said), not the quantization."""
    from onnxq.dynamic import quantize_dynamic_with_report

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(37, 8)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "weight")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "weight"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shaped",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [table, weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = quantize_dynamic_with_report(model)
    assert any(note.startswith("SmoothQuant skipped: random token") for note in result.report.notes)
    assert any(d.quantized and d.op_type == "MatMul" for d in result.report.decisions)


def test_dynamic_mode_never_refuses_over_random_tokens():
    """Integer inputs with different fixed leading dims: the random tokens fit no one batch
    layout, so the output quality is not measured (and said), and nothing is refused."""
    from onnxq.dynamic import quantize_dynamic_with_report

    graph = helper.make_graph(
        [helper.make_node("BitwiseAnd", ["x", "y"], ["z"])],
        "bitwise",
        [
            helper.make_tensor_value_info("x", TensorProto.UINT8, [3, 4]),
            helper.make_tensor_value_info("y", TensorProto.UINT8, [4]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.UINT8, [3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = quantize_dynamic_with_report(model)
    assert any(
        n.startswith("output quality not measured: random token") for n in result.report.notes
    )
