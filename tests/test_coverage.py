"""Range coverage: values beyond each activation's QuantizeLinear range, counted and reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxq.coverage import (
    NOTE_FRACTION,
    CoverageCheck,
    activation_ranges,
    coverage_note,
    range_coverage,
)
from onnxq.errors import CalibrationDataError
from onnxq.evaluate import compare
from onnxq.pipeline import quantize

PER_TENSOR = """
<ir_version: 8, opset_import: ["" : 17]>
qdq (float[N, 5] x) => (float[N, 5] y) {
    s = Constant<value = float {0.1}>()
    z = Constant<value = uint8 {128}>()
    q = QuantizeLinear(x, s, z)
    y = DequantizeLinear(q, s, z)
}
"""
PER_AXIS = """
<ir_version: 8, opset_import: ["" : 17]>
qdq (float[N, 2] x) => (float[N, 2] y) {
    s = Constant<value = float[2] {0.1, 1.0}>()
    z = Constant<value = int8[2] {0, 0}>()
    q = QuantizeLinear<axis = 1>(x, s, z)
    y = DequantizeLinear<axis = 1>(q, s, z)
}
"""


def test_per_tensor_range_counts_values_beyond_half_a_step() -> None:
    model = onnx.parser.parse_model(PER_TENSOR)
    # u8 zero point 128, scale 0.1: [-12.8, 12.7]; rounding keeps values within 0.05 beyond
    x = np.array([[-20.0, -12.84, 0.0, 12.74, 13.0]], dtype=np.float32)
    (coverage,) = range_coverage(model, [{"x": x}])
    assert coverage.tensor == "x"
    assert (coverage.low, coverage.high) == pytest.approx((-12.8, 12.7))
    assert (coverage.clipped, coverage.count) == (2, 5)
    assert (coverage.seen_min, coverage.seen_max) == (-20.0, 13.0)
    assert "40.00% of values clipped" in coverage.describe()


def test_per_axis_ranges_apply_per_channel() -> None:
    model = onnx.parser.parse_model(PER_AXIS)
    # channel 0 spans [-12.8, 12.7], channel 1 [-128, 127]
    x = np.array([[50.0, 50.0], [1.0, -200.0], [-1.0, 1.0]], dtype=np.float32)
    (coverage,) = range_coverage(model, [{"x": x[:2]}, {"x": x[2:]}])
    assert (coverage.clipped, coverage.count) == (2, 6)
    assert (coverage.low, coverage.high) == pytest.approx((-128.0, 127.0))


def test_constant_inputs_are_not_activations(cnn: onnx.ModelProto, cnn_calib: dict) -> None:
    model = quantize(cnn, cnn_calib)
    constants = {init.name for init in model.graph.initializer}
    ranges = activation_ranges(model)
    assert ranges and not set(ranges) & constants
    assert "x" in ranges  # the graph input feeds the first Conv's Q


def test_compare_names_activations_the_calibration_data_did_not_cover(
    tmp_path: Path, cnn: onnx.ModelProto, cnn_calib: dict
) -> None:
    fp32, int8 = tmp_path / "cnn.onnx", tmp_path / "cnn_int8.onnx"
    onnx.save(cnn, fp32)
    onnx.save(quantize(fp32, cnn_calib), int8)
    covered = range_coverage(onnx.load(int8), [cnn_calib])
    assert max(c.fraction for c in covered) < NOTE_FRACTION  # percentile clips ~1e-5
    assert coverage_note("cnn_int8", covered) is None

    wider = {"x": 4 * cnn_calib["x"]}
    fast = {"latency_runs": 2, "warmup": 1, "throughput_runs": 1, "measure_memory": False}
    result = compare(fp32, [int8], wider, batch_size=8, **fast)
    (note,) = [n for n in result.notes if "quantization ranges" in n]
    assert note.startswith("cnn_int8: the data exceeds the quantization ranges of")
    assert "x: " in note  # the input itself, 4x wider than calibrated, is the most clipped
    fractions = {c.tensor: c.fraction for c in range_coverage(onnx.load(int8), [wider])}
    assert fractions["x"] > 0.1


def test_a_range_from_zero_is_a_folded_relu() -> None:
    # zero point 0 (u8): the range [0, 25.5] clamps negatives as the Relu it replaced did
    model = onnx.parser.parse_model(PER_TENSOR.replace("uint8 {128}", "uint8 {0}"))
    x = np.array([[-5.0, -0.1, 1.0, 25.5, 26.0]], dtype=np.float32)
    (coverage,) = range_coverage(model, [{"x": x}])
    assert (coverage.clipped, coverage.count) == (1, 5)  # only 26.0


def test_a_graph_onnx_runtime_cannot_run_as_written_is_left_unchecked() -> None:
    # a float16 activation: the augmented graph declares it float32 and ONNX Runtime refuses
    scale = onnx.numpy_helper.from_array(np.array(0.1, np.float16), "s")
    zero = onnx.numpy_helper.from_array(np.array(128, np.uint8), "z")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["r"]),
            onnx.helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
            onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "half",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["N", 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["N", 5])],
        [scale, zero],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    check = CoverageCheck(model)
    check.update(0, {"x": np.ones((2, 5), np.float16)})
    assert check.failure is not None and check.result() == []
    assert check.note("half").startswith("half: range coverage not measured (")
    with pytest.raises(CalibrationDataError, match="range coverage not measured"):
        range_coverage(model, [{"x": np.ones((2, 5), np.float16)}])
