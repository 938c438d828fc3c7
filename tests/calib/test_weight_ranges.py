"""Per-channel MSE weight ranges: never worse than min-max, clip outliers, wired by config."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.calibration import weight_ranges
from onnxq.calibration.weight_ranges import mse_weight_qparams, weight_qparams_for
from onnxq.config import QuantConfig, QuantType, WeightRange
from onnxq.dynamic import quantize_dynamic
from onnxq.pipeline import quantize
from onnxq.qparams import dequantize, weight_qparams
from onnxq.qparams import quantize as quantize_levels


def _channel_errors(weight: np.ndarray, qp, axis: int) -> np.ndarray:
    error = (weight - dequantize(quantize_levels(weight, qp), qp)) ** 2
    return error.sum(axis=tuple(i for i in range(weight.ndim) if i != axis))


@pytest.mark.parametrize(("qtype", "symmetric"), [(QuantType.INT8, True), (QuantType.UINT8, False)])
def test_mse_is_never_worse_than_minmax_per_channel(rng, qtype, symmetric):
    """Channel 1: 200k N(0, 1) values and one at 10. Rounding all of them on the min-max grid
    costs more than clipping the one (``200k s**2 / 12`` against ``(10 - T)**2``)."""
    weight = rng.standard_normal((3, 200_000)).astype(np.float32)
    weight[1, 7] = 10.0
    minmax = weight_qparams(weight, qtype, axis=0, symmetric=symmetric)
    mse = mse_weight_qparams(weight, qtype, axis=0, symmetric=symmetric)
    assert mse.axis == 0 and mse.scale.shape == (3,)
    assert np.all(_channel_errors(weight, mse, 0) <= _channel_errors(weight, minmax, 0))
    assert mse.scale[1] < 0.9 * minmax.scale[1]  # the outlier is clipped


def test_reduce_range_clips_within_seven_bits(rng):
    weight = rng.standard_normal((3, 200_000)).astype(np.float32)
    weight[1, 7] = 10.0
    kwargs = {"axis": 0, "symmetric": True, "reduce_range": True}
    mse = mse_weight_qparams(weight, QuantType.INT8, **kwargs)
    minmax = weight_qparams(weight, QuantType.INT8, **kwargs)
    assert mse.scale[1] < 0.9 * minmax.scale[1]  # the outlier is clipped ...
    levels = quantize_levels(weight, mse)
    assert levels.min() >= -63 and levels.max() <= 63  # ... at the 7-bit bounds, not beyond
    assert levels[1, 7] == 63


def test_mse_keeps_minmax_where_nothing_is_gained():
    """Weights already on a grid whose ends are the channel extremes: min-max is exact."""
    weight = (np.arange(-127, 128, dtype=np.float32) * 0.01).reshape(1, -1)
    mse = mse_weight_qparams(weight, QuantType.INT8, axis=0, symmetric=True)
    minmax = weight_qparams(weight, QuantType.INT8, axis=0, symmetric=True)
    assert np.array_equal(mse.scale, minmax.scale)


def test_per_tensor_and_dispatch(rng):
    weight = rng.standard_normal((8, 5)).astype(np.float32)
    qp = mse_weight_qparams(weight, QuantType.INT8, axis=None, symmetric=True)
    assert qp.axis is None and qp.scale.shape == ()
    assert weight_qparams_for(WeightRange.MSE) is mse_weight_qparams
    assert weight_qparams_for(WeightRange.MINMAX) is weight_qparams


def test_config_weight_range_mse_reaches_the_weights(cnn, cnn_calib, monkeypatch):
    calls = []

    def spy(weight, qtype, **kwargs):
        calls.append(weight.shape)
        return mse_weight_qparams(weight, qtype, **kwargs)

    monkeypatch.setattr(weight_ranges, "mse_weight_qparams", spy)
    config = QuantConfig(weight_rounding="nearest", weight_range="mse")
    quantize(cnn, cnn_calib, config)
    assert (8, 3, 3, 3) in calls and (10, 16) in calls  # conv1 and fc weights
    calls.clear()
    quantize(cnn, cnn_calib, config.replace(weight_range="minmax"))
    assert not calls


def test_input_power_lets_a_dead_channel_be_clipped(rng):
    """Per-tensor depthwise weights where channel 2 is 140x the others but its input is always
    zero (a dead channel behind BatchNorm folding): weighted by ``E[x**2]`` the range fits the
    live channels; unweighted, the outlier's own error keeps it near min-max."""
    weight = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    weight[2] *= 140.0
    importance = np.ones_like(weight)
    importance[2] = 0.0
    kwargs = {"axis": None, "symmetric": True, "reduce_range": True}
    minmax = weight_qparams(weight, QuantType.INT8, **kwargs)
    plain = mse_weight_qparams(weight, QuantType.INT8, **kwargs)
    weighted = mse_weight_qparams(weight, QuantType.INT8, importance=importance, **kwargs)
    live = np.delete(weight, 2, axis=0)
    assert plain.scale > 0.5 * minmax.scale
    assert weighted.scale < 0.03 * minmax.scale  # below 2**-5: the geometric tail's reach
    assert weighted.scale >= 0.5 * np.abs(live).max() / 63  # the live channels are not clipped much
    live_error = ((live - dequantize(quantize_levels(live, weighted), weighted)) ** 2).sum()
    assert (
        live_error < 0.01 * ((live - dequantize(quantize_levels(live, minmax), minmax)) ** 2).sum()
    )


@pytest.mark.parametrize(
    ("op_type", "attributes", "weight_shape", "hessian_shape"),
    [
        ("MatMul", {}, (5, 3), (1, 5, 5)),  # B[K, N]: column k multiplies input k
        ("Gemm", {"transB": 1}, (3, 5), (1, 5, 5)),  # W[N, K]
        ("Gemm", {}, (5, 3), (1, 5, 5)),  # W[K, N]
        ("Conv", {"group": 2}, (4, 1, 2, 2), (2, 4, 4)),  # group g: rows 2g, 2g+1
    ],
)
def test_input_importance_follows_the_gptq_layout(
    rng, op_type, attributes, weight_shape, hessian_shape
):
    import onnx_ir as ir

    from onnxq.passes.weight_rounding import input_importance

    node = ir.node(op_type, [ir.Value(name="x"), ir.Value(name="w")], attributes=attributes)
    weight = rng.standard_normal(weight_shape).astype(np.float32)
    diagonal = rng.uniform(0.5, 2.0, hessian_shape[:2])
    hessian = np.stack([np.diag(d) + 0.01 for d in diagonal])
    got = input_importance(node, weight, hessian)
    assert got.shape == weight.shape
    if op_type == "Conv":
        for row in range(weight_shape[0]):
            group = row // (weight_shape[0] // hessian_shape[0])
            np.testing.assert_allclose(got[row].ravel(), np.diagonal(hessian[group]), rtol=1e-6)
    elif op_type == "Gemm" and attributes:
        np.testing.assert_allclose(
            got, np.broadcast_to(diagonal[0] + 0.01, weight_shape), rtol=1e-6
        )
    else:
        np.testing.assert_allclose(
            got, np.broadcast_to((diagonal[0] + 0.01)[:, None], weight_shape), rtol=1e-6
        )


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_weight_row_behind_a_dead_input_is_clipped_end_to_end(rng, mode):
    """MatMul whose input feature 0 is always 0 and whose weight row 0 is 100x the rest:
    with calibration data, MSE ranges ignore that row (per-tensor weights share its scale)."""
    from onnx import TensorProto, helper, numpy_helper
    from support import sqnr_db

    weight = rng.standard_normal((16, 8)).astype(np.float32)
    weight[0] *= 100.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "dead_input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[:, 0] = 0.0
    expected = x @ weight
    config = QuantConfig(per_channel=False, weight_rounding="nearest", smooth=False)

    def output_sqnr(weight_range: str) -> float:
        import onnxruntime as ort

        chosen = config.replace(weight_range=weight_range)
        if mode == "static":
            quantized = quantize(model, {"x": x}, chosen)
        else:
            quantized = quantize_dynamic(model, chosen, calibration_data={"x": x})
        session = ort.InferenceSession(quantized.SerializeToString())
        return sqnr_db(expected, session.run(None, {"x": x})[0])

    assert output_sqnr("mse") > output_sqnr("minmax") + 20  # measured: 4.3 -> 37.1 dB
