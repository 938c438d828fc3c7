"""Finishing QDQ models from other tools (``onnxq.finish``, ``onnxq.passes.finish_qdq``).

Graphs are written in ONNX text; weights are added as numpy initializers. Exact rewrites are
checked against the model before finishing, both run as float arithmetic (ORT without graph
optimisation: the same on every CPU); fusion is read from ORT's optimised graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from support import optimized_op_counts, run

from onnxq import QuantConfig, quantize
from onnxq.errors import UnsupportedModelError
from onnxq.finish import finish_qdq, finish_qdq_with_report
from onnxq.targets.check import check_model

RNG = np.random.default_rng(0)
X_SCALE = np.float32(0.02)


def _model(text: str, opset: int = 17, **arrays: np.ndarray) -> onnx.ModelProto:
    """``text`` (a graph in ONNX text) with ``arrays`` as its initializers."""
    model = onnx.parser.parse_model(
        f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text.strip()
    )
    model.graph.initializer.extend(
        numpy_helper.from_array(np.asarray(a), name) for name, a in arrays.items()
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(shape=(2, 4, 8, 8)) -> dict[str, np.ndarray]:
    return {"x": RNG.uniform(-1.5, 1.5, shape).astype(np.float32)}


def _levels(shape, low=-127, high=127) -> np.ndarray:
    return RNG.integers(low, high + 1, shape).astype(np.int8)


def _scales(n: int) -> np.ndarray:
    return RNG.uniform(0.004, 0.008, n).astype(np.float32)


def _nodes(model: onnx.ModelProto) -> list[tuple]:
    return [
        (
            n.op_type,
            tuple(n.input),
            tuple(n.output),
            tuple(a.SerializeToString() for a in n.attribute),
        )
        for n in model.graph.node
    ]


# ModelOpt style: symmetric int8 activations (zero point 0), Q/DQ on the inputs of weighted ops,
# float bias; conv1 int8 weights behind a DQ, conv2 float weights behind a Q, then a Relu
# between conv2 and the Q of the residual Add's input.
MODELOPT = """
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  xq = QuantizeLinear(x, xs, z)
  xd = DequantizeLinear(xq, xs, z)
  w1d = DequantizeLinear<axis=0>(w1, w1s, w1z)
  c1 = Conv<pads=[1, 1, 1, 1]>(xd, w1d, b1)
  c1q = QuantizeLinear(c1, cs, z)
  c1d = DequantizeLinear(c1q, cs, z)
  w2q = QuantizeLinear<axis=0>(w2, w2s, w1z)
  w2d = DequantizeLinear<axis=0>(w2q, w2s, w1z)
  c2 = Conv<pads=[1, 1, 1, 1]>(c1d, w2d, b2)
  r2 = Relu(c2)
  r2q = QuantizeLinear(r2, rs, z)
  r2d = DequantizeLinear(r2q, rs, z)
  y = Add(r2d, xd)
}
"""


@pytest.fixture(scope="module")
def modelopt() -> onnx.ModelProto:
    return _model(
        MODELOPT,
        xs=X_SCALE,
        z=np.int8(0),
        w1=_levels((4, 4, 3, 3)),
        w1s=_scales(4),
        w1z=np.zeros(4, np.int8),
        b1=RNG.normal(0, 0.1, 4).astype(np.float32),
        cs=np.float32(0.03),
        w2=RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
        w2s=_scales(4),
        b2=RNG.normal(0, 0.1, 4).astype(np.float32),
        rs=np.float32(0.03),
    )


def test_modelopt_graph_is_finished_and_its_relu_blocker_named(modelopt):
    result = finish_qdq_with_report(modelopt)
    out, finished = result.model, result.report.finished
    assert finished["changes"]["fold-weight"] == ["QuantizeLinear -> w2q"]
    assert finished["changes"]["int32-bias"] == ["Conv -> c1", "Conv -> c2"]
    (blocked,) = finished["blocked"]
    assert "Relu 'Relu -> r2' after Conv 'Conv -> c2'" in blocked and "not exact" in blocked
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert not any(a.dtype == np.float32 and a.size > 4 for a in inits.values())  # no float W
    dq_inputs = [inits.get(n.input[0]) for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert sum(a is not None and a.dtype == np.int32 for a in dq_inputs) == 2  # both biases
    feed = _x()
    before, after = run(modelopt, feed, fused=False)[0], run(out, feed, fused=False)[0]
    # the int32 bias rounds by at most half of input_scale * weight_scale per channel: far
    # below one step (0.03) of the Qs downstream; most values are bit-identical
    assert np.mean(before == after) > 0.9
    assert np.abs(before - after).max() <= 0.03 + 1e-6
    decisions = {d.name: d for d in result.report.decisions}
    assert decisions["Conv -> c1"].quantized and not decisions["Conv -> c2"].quantized
    # its own scheme is kept: int8 activations break ort-cpu's rule (x86 ORT fuses uint8 ones)
    assert any("'activation-type'" in warning for warning in result.report.warnings)


def test_modelopt_to_ort_cpu_shifts_activations_to_uint8_exactly(modelopt, tmp_path):
    result = finish_qdq_with_report(modelopt, target="ort-cpu")
    finished = result.report.finished
    assert len(finished["changes"]["convert-activation"]) == 3
    (weights,) = [line for line in finished["blocked"] if "weights kept" in line]
    assert "7-bit" in weights and "not exact" in weights
    feed = _x()
    before = run(finish_qdq(modelopt), feed, fused=False)[0]
    np.testing.assert_array_equal(before, run(result.model, feed, fused=False)[0])
    ops = optimized_op_counts(result.model, tmp_path)  # uint8 x int8 fuses on x86 and ARM
    assert ops.get("QLinearConv") == 1 and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 1


def test_modelopt_to_tensorrt_keeps_float_biases_and_names_what_it_cannot_convert(modelopt):
    result = finish_qdq_with_report(modelopt, target="tensorrt")
    finished = result.report.finished
    assert "int32-bias" not in finished["changes"]  # tensorrt: float bias
    # the model's own Q of conv2's float weights writes -128: the narrow range needs new levels
    assert any("-128" in line and "not exact" in line for line in finished["blocked"])
    (warning,) = result.report.warnings
    assert "'weight-type'" in warning and "Conv:c2" in warning


WEIGHT_DQ = """
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  wd = DequantizeLinear<axis=0>(w, ws, wz)
  WEIGHT
  c = Conv<pads=[1, 1, 1, 1]>(xd, wc, b)
  cq = QuantizeLinear(c, cs, xz)
  y = DequantizeLinear(cq, cs, xz)
}
"""


def _weight_dq_model(clip: str, **bounds: np.ndarray) -> onnx.ModelProto:
    weight = f"wc = Clip(wd, {clip})" if clip else "wc = Identity(wd)"
    return _model(
        WEIGHT_DQ.replace("WEIGHT", weight),
        xs=X_SCALE,
        xz=np.uint8(128),
        w=_levels((4, 4, 3, 3)),
        ws=np.full(4, 0.01, np.float32),
        wz=np.zeros(4, np.int8),
        b=RNG.normal(0, 0.1, 4).astype(np.float32),
        cs=np.float32(0.05),
        **bounds,
    )


@pytest.mark.parametrize(
    ("clip", "low", "high", "folded"),
    [
        ("", None, None, False),  # int8 weights behind a DQ, no Clip
        ("lo, hi", -2.0, 2.0, True),  # a Clip that never binds
        ("lo, hi", -0.5, 0.5, True),  # binds at levels -50 / 50: still on the grid
        ("lo, hi", -0.505, 0.505, False),  # binds between two levels: kept
    ],
)
def test_int8_weights_behind_a_dq_with_or_without_clip(clip, low, high, folded, tmp_path):
    bounds = {} if not clip else {"lo": np.float32(low), "hi": np.float32(high)}
    model = _weight_dq_model(clip, **bounds)
    result = finish_qdq_with_report(model)
    finished = result.report.finished
    assert ("weight-clip" in finished["changes"]) == folded
    assert any("off the integer grid" in line for line in finished["blocked"]) == (
        bool(clip) and not folded
    )
    feed = _x()
    np.testing.assert_allclose(
        run(model, feed, fused=False)[0], run(result.model, feed, fused=False)[0], atol=0.05 + 1e-6
    )
    fused = "Clip" not in {n.op_type for n in result.model.graph.node}
    assert (optimized_op_counts(result.model, tmp_path).get("QLinearConv") == 1) == fused


def test_already_final_model_passes_through_unchanged(cnn, cnn_calib):
    final = quantize(cnn, cnn_calib, QuantConfig())
    result = finish_qdq_with_report(final)
    assert _nodes(result.model) == _nodes(final)
    assert {i.name: i.SerializeToString() for i in result.model.graph.initializer} == {
        i.name: i.SerializeToString() for i in final.graph.initializer
    }
    assert result.report.finished["changes"] == {} and result.report.finished["blocked"] == []
    metadata = {p.key: p.value for p in result.model.metadata_props}
    assert metadata["onnxq.source"] == "qdq"
    assert check_model(result.model, "ort-cpu").ok


# torch.ao's reduce-range fake quant: Q -> Clip(0, 127) -> DQ; a Relu before it
TORCH_REDUCE_RANGE = """
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  xq = QuantizeLinear(x, xs, xz)
  xc = Clip(xq, , top)
  xd = DequantizeLinear(xc, xs, xz)
  wq = QuantizeLinear<axis=0>(w, ws, wz)
  wd = DequantizeLinear<axis=0>(wq, ws, wz)
  c = Conv<pads=[1, 1, 1, 1]>(xd, wd)
  r = Relu(c)
  rq = QuantizeLinear(r, rs, xz)
  rc = Clip(rq, , top)
  y = DequantizeLinear(rc, rs, xz)
}
"""


def test_torch_reduce_range_clip_moves_before_the_q_exactly_and_blocks_the_conv():
    model = _model(
        TORCH_REDUCE_RANGE,
        xs=np.float32(0.01),
        xz=np.uint8(0),
        top=np.uint8(127),
        w=RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
        ws=_scales(4),
        wz=np.zeros(4, np.int8),
        rs=np.float32(0.02),
    )
    result = finish_qdq_with_report(model)
    assert len(result.report.finished["changes"]["integer-clip"]) == 2
    (blocked,) = result.report.finished["blocked"]
    assert "after Conv 'Conv -> c'" in blocked and "[0, 2.54]" in blocked
    feed = _x()
    np.testing.assert_array_equal(
        run(model, feed, fused=False)[0], run(result.model, feed, fused=False)[0]
    )


REQUANTIZE = """
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  xr = Relu(xd)
  xq2 = QuantizeLinear(xr, xs, xz)
  xd2 = DequantizeLinear(xq2, xs, xz)
  xq3 = QuantizeLinear(xd2, xs, xz)
  y = DequantizeLinear(xq3, xs, xz)
}
"""


def test_redundant_requantize_chains_collapse_exactly():
    model = _model(REQUANTIZE, xs=np.float32(0.01), xz=np.uint8(0))
    result = finish_qdq_with_report(model)
    assert len(result.report.finished["changes"]["requantize"]) == 2
    assert [n.op_type for n in result.model.graph.node] == ["QuantizeLinear", "DequantizeLinear"]
    feed = _x()
    np.testing.assert_array_equal(
        run(model, feed, fused=False)[0], run(result.model, feed, fused=False)[0]
    )


CONV_BN = """
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  wq = QuantizeLinear(w, ws, wz)
  wd = DequantizeLinear(wq, ws, wz)
  c = Conv<pads=[1, 1, 1, 1]>(xd, wd, zero)
  d = Div(c, k)
  a = Add(d, b)
  n = BatchNormalization(a, gamma, beta, mean, var)
  r = Relu(n)
  rq = QuantizeLinear(r, rs, rz)
  y = DequantizeLinear(rq, rs, rz)
}
"""


def test_conv_bn_chain_of_torch_qat_folds_into_scale_and_bias(tmp_path):
    """torch.ao's ConvBn QAT export: Conv -> Div -> Add -> BatchNormalization -> Relu -> Q."""
    gamma = RNG.uniform(0.5, 1.5, 4).astype(np.float32)
    var = RNG.uniform(0.5, 1.5, 4).astype(np.float32)
    model = _model(
        CONV_BN,
        xs=np.float32(0.012),
        xz=np.uint8(128),
        w=RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
        ws=np.float32(0.005),  # per-tensor: becomes per-channel
        wz=np.int8(0),
        zero=np.zeros(4, np.float32),
        k=(gamma / np.sqrt(var + 1e-5)).reshape(1, 4, 1, 1),
        b=RNG.normal(0, 0.1, (1, 4, 1, 1)).astype(np.float32),
        gamma=gamma,
        beta=RNG.normal(0, 0.1, 4).astype(np.float32),
        mean=RNG.normal(0, 0.1, 4).astype(np.float32),
        var=var,
        rs=np.float32(0.02),
        rz=np.uint8(0),
    )
    result = finish_qdq_with_report(model)
    assert len(result.report.finished["changes"]["fold-affine"]) == 3
    assert {n.op_type for n in result.model.graph.node} == {
        "QuantizeLinear",
        "DequantizeLinear",
        "Conv",
        "Relu",
    }
    feed = _x()
    before, after = run(model, feed, fused=False)[0], run(result.model, feed, fused=False)[0]
    steps = np.abs(before - after) / 0.02
    assert steps.max() <= 1.0 + 1e-4 and np.mean(steps == 0) > 0.99
    assert optimized_op_counts(result.model, tmp_path).get("QLinearConv") == 1


BAD = {
    "scale from an input": (
        "g (float[N, 4] x, float s) => (float[N, 4] y) "
        "{ q = QuantizeLinear(x, s, z) y = DequantizeLinear(q, s, z) }",
        {"z": np.uint8(0)},
        "'QuantizeLinear -> q'",
        "not a constant",
    ),
    "two schemes on one tensor": (
        "g (float[N, 4] x) => (float[N, 4] y, float[N, 4] y2) { q = QuantizeLinear(x, s, z) "
        "y = DequantizeLinear(q, s, z) q2 = QuantizeLinear(x, s, z2) "
        "y2 = DequantizeLinear(q2, s, z2) }",
        {"s": np.float32(0.1), "z": np.uint8(0), "z2": np.uint8(128)},
        "'QuantizeLinear -> q2'",
        "other qparams",
    ),
    "mixed zero points on one tensor": (
        "g (float[N, 4] x) => (float[N, 4] y) "
        "{ q = QuantizeLinear(x, s, z) y = DequantizeLinear(q, s, z2) }",
        {"s": np.float32(0.1), "z": np.uint8(0), "z2": np.uint8(3)},
        "'DequantizeLinear -> y'",
        "other qparams",
    ),
    "uint16 activations": (
        "g (float[N, 4] x) => (float[N, 4] y) "
        "{ q = QuantizeLinear(x, s, z) y = DequantizeLinear(q, s, z) }",
        {"s": np.float32(0.1), "z": np.uint16(0)},
        "'QuantizeLinear -> q'",
        "uint16",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unfinishable_models_are_one_line_errors_naming_the_node(case):
    text, arrays, node, words = BAD[case]
    model = _model(text, opset=21, **arrays)
    with pytest.raises(UnsupportedModelError) as caught:
        finish_qdq(model)
    message = str(caught.value)
    assert "\n" not in message and node in message and words in message


def test_api_quantize_without_data_finishes_a_qdq_model(modelopt):
    finished = quantize(modelopt, None)
    metadata = {p.key: p.value for p in finished.metadata_props}
    assert metadata["onnxq.source"] == "qdq"
    assert _nodes(finished) == _nodes(finish_qdq(modelopt))


UINT8_WEIGHTS = """
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  xq = QuantizeLinear(x, xs, xz)
  xd = DequantizeLinear(xq, xs, xz)
  wd = DequantizeLinear(w, ws, wz)
  c = Conv<pads=[1, 1, 1, 1]>(xd, wd)
  cq = QuantizeLinear(c, cs, cz)
  y = DequantizeLinear(cq, cs, cz)
}
"""


def test_uint8_weights_with_zero_point_128_shift_to_int8_exactly():
    model = _model(
        UINT8_WEIGHTS,
        xs=X_SCALE,
        xz=np.uint8(100),
        w=RNG.integers(0, 256, (4, 4, 3, 3)).astype(np.uint8),
        ws=np.float32(0.004),
        wz=np.uint8(128),
        cs=np.float32(0.05),
        cz=np.uint8(128),
    )
    result = finish_qdq_with_report(model, target="ort-arm64")
    changes = result.report.finished["changes"]
    assert changes["convert-weight"] == ["Conv -> c"]
    assert len(changes["convert-activation"]) == 2
    assert result.report.finished["scheme"]["activation_types"] == ["int8"]
    assert result.report.finished["scheme"]["weight_types"] == ["int8"]
    feed = _x()
    np.testing.assert_array_equal(
        run(model, feed, fused=False)[0], run(result.model, feed, fused=False)[0]
    )
