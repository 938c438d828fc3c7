"""Batches of different sizes and sequence lengths, for every range method (ORT's histogram
calibrators stack all batches into one array and fail on these)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import run

from onnxq.calibration.ranges import observers_for
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.executor import local_executor
from onnxq.model_io import input_specs
from onnxq.pipeline import calibrate, quantize_with_report

VOCAB, HIDDEN = 30, 8
SHAPES = [(2, 5), (3, 9), (1, 4), (4, 7), (2, 12)]  # (N, S) per batch


def attention_model(rng: np.random.Generator) -> onnx.ModelProto:
    """ids int64[N, S] -> embedding -> single-head self-attention -> residual -> LayerNorm."""

    def init(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="value"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["att"], name="attend"),
        helper.make_node("MatMul", ["att", "wo"], ["o"], name="out_proj"),
        helper.make_node("Add", ["o", "x"], ["res"], name="residual"),
        helper.make_node(
            "LayerNormalization", ["res", "gamma", "beta"], ["y"], name="norm", axis=-1
        ),
    ]
    inits = [
        init("emb", VOCAB, HIDDEN, scale=1.0),
        init("wq", HIDDEN, HIDDEN),
        init("wk", HIDDEN, HIDDEN),
        init("wv", HIDDEN, HIDDEN),
        init("wo", HIDDEN, HIDDEN),
        numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def uneven_feeds(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [{"ids": rng.integers(0, VOCAB, shape).astype(np.int64)} for shape in SHAPES]


@pytest.fixture
def attention(rng) -> onnx.ModelProto:
    return attention_model(rng)


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_every_method_calibrates_uneven_batches(attention, rng, method):
    feeds = uneven_feeds(rng)
    config = QuantConfig(method=method, weight_rounding="nearest")
    result = quantize_with_report(attention, feeds, config)
    assert result.report.samples == sum(n for n, _ in SHAPES)
    assert result.report.quantized and not result.report.uncalibrated
    ids = rng.integers(0, VOCAB, (3, 6)).astype(np.int64)  # yet another shape
    reference, approx = run(attention, {"ids": ids})[0], run(result.model, {"ids": ids})[0]
    assert np.isfinite(approx).all()
    assert np.corrcoef(reference.ravel(), approx.ravel())[0, 1] > 0.95


def test_histograms_count_every_value_of_every_shape(attention, rng):
    feeds = uneven_feeds(rng)
    calibration = calibrate(attention, feeds, QuantConfig(), hessians=True)
    values = sum(n * s for n, s in SHAPES) * HIDDEN
    for name, group in calibration.observers.items():
        histogram = group[0]
        assert histogram.kind == "histogram"
        assert histogram.counts.sum() == histogram.count, name
        if name in ("x", "att"):  # [N, S, 8] tensors
            assert histogram.count == values, name
    assert calibration.batches == len(SHAPES) and calibration.hessians


def test_two_workers_equal_one_on_uneven_batches(attention, rng):
    feeds = uneven_feeds(rng)
    plans = []
    for workers in (1, 2):
        plan = {name: observers_for(list(CalibrationMethod)) for name in ("x", "q", "att", "o")}
        local_executor(workers).collect(
            attention.SerializeToString(), plan, feeds, input_specs(attention)
        )
        plans.append(plan)
    one, two = plans
    for name in one:
        assert np.array_equal(one[name][0].counts, two[name][0].counts), name
        assert one[name][0].to_dict() == two[name][0].to_dict(), name
