"""qparams: boundary tables against the ONNX reference evaluator, and numeric properties.

The oracle for Q/DQ arithmetic is ``onnx.reference.ReferenceEvaluator`` running a one-node
QuantizeLinear / DequantizeLinear model; integers must agree bit for bit. The reference casts
``rint(x / scale)`` to int32 before saturating, so values beyond the int32 range are checked
against ONNX Runtime instead (it saturates them, as the spec says).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxq.config import QuantType
from onnxq.qparams import (
    INT32_MAX,
    QParams,
    compute_qparams,
    dequantize,
    fit_weight_scale_to_bias,
    integer_bounds,
    quantize,
    quantize_bias,
    weight_qparams,
)

U8, I8 = QuantType.UINT8, QuantType.INT8
NP = {U8: np.uint8, I8: np.int8}
ONNX_TYPE = {U8: TensorProto.UINT8, I8: TensorProto.INT8}
F32_MAX = float(np.finfo(np.float32).max)
OPSETS = (13, 19, 21)
# the reference evaluator implements DequantizeLinear from opset 19 only (13 and 19 agree)
DQ_OPSETS = (19, 21)


# --------------------------------------------------------------------------- oracles


def _model(op: str, qtype: QuantType, opset: int, axis: int | None) -> onnx.ModelProto:
    """One Q or DQ node; scale and zero point are graph inputs so one model serves every row."""
    in_type, out_type = (
        (TensorProto.FLOAT, ONNX_TYPE[qtype])
        if op == "QuantizeLinear"
        else (ONNX_TYPE[qtype], TensorProto.FLOAT)
    )
    param_shape = [] if axis is None else ["C"]
    attrs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "scale", "zp"], ["y"], **attrs)],
        "qdq",
        [
            helper.make_tensor_value_info("x", in_type, None),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, param_shape),
            helper.make_tensor_value_info("zp", ONNX_TYPE[qtype], param_shape),
        ],
        [helper.make_tensor_value_info("y", out_type, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@functools.cache
def _reference(op: str, qtype: QuantType, opset: int, axis: int | None) -> ReferenceEvaluator:
    return ReferenceEvaluator(_model(op, qtype, opset, axis))


@functools.cache
def _ort(op: str, qtype: QuantType, axis: int | None) -> ort.InferenceSession:
    model = _model(op, qtype, 21, axis)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(x: np.ndarray, qp: QParams) -> dict[str, np.ndarray]:
    return {
        "x": x,
        "scale": np.asarray(qp.scale, dtype=np.float32),
        "zp": np.asarray(qp.zero_point),
    }


def _ref_quantize(x: np.ndarray, qp: QParams, opset: int) -> np.ndarray:
    qtype = U8 if qp.zero_point.dtype == np.uint8 else I8
    axis = None if qp.axis is None else qp.axis
    (y,) = _reference("QuantizeLinear", qtype, opset, axis).run(None, _feeds(x, qp))
    return y


def _ref_dequantize(q: np.ndarray, qp: QParams, opset: int) -> np.ndarray:
    opset = max(opset, DQ_OPSETS[0])
    qtype = U8 if qp.zero_point.dtype == np.uint8 else I8
    (y,) = _reference("DequantizeLinear", qtype, opset, qp.axis).run(None, _feeds(q, qp))
    return y


def _qp(qtype: QuantType, scale, zero_point, axis: int | None = None) -> QParams:
    return QParams(
        np.asarray(scale, dtype=np.float32), np.asarray(zero_point, dtype=NP[qtype]), axis
    )


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, same shape, same bits."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.tobytes() == expected.tobytes(), f"\n{actual!r}\n!=\n{expected!r}"


# --------------------------------------------------------------------------- boundary tables

# (qtype, scale, zero_point, x, expected q). Every expected value is worked out by hand from
# q = saturate(round_half_to_even(x / scale) + zero_point).
QUANTIZE_ROWS = [
    pytest.param(U8, 1.0, 0, [0.5, 1.5, 2.5, 3.5, 254.5], [0, 2, 2, 4, 254], id="u8-halves"),
    pytest.param(
        I8, 1.0, 0, [0.5, 1.5, 2.5, -0.5, -1.5, -2.5], [0, 2, 2, 0, -2, -2], id="i8-halves"
    ),
    pytest.param(
        U8, 1.0, 128, [-0.5, -1.5, 0.5, 1.5, -127.5], [128, 126, 128, 130, 0], id="u8-halves-zp128"
    ),
    pytest.param(I8, 0.5, 0, [0.25, 0.75, -0.25, -0.75], [0, 2, 0, -2], id="i8-halves-scale0.5"),
    pytest.param(
        I8,
        1.0,
        0,
        [1e6, -1e6, 127.0, 127.4, 127.5, 128.0, -128.0, -128.5, -129.0],
        [127, -128, 127, 127, 127, 127, -128, -128, -128],
        id="i8-saturate",
    ),
    pytest.param(
        U8,
        1.0,
        0,
        [1e6, -1e6, 255.0, 255.5, 256.0, -0.5, -0.6, -1.0],
        [255, 0, 255, 255, 255, 0, 0, 0],
        id="u8-saturate",
    ),
    pytest.param(
        U8,
        1.0,
        255,
        [0.0, -255.0, -256.0, 1.0, -254.5, -252.5],
        [255, 0, 0, 255, 1, 3],
        id="u8-zp255",
    ),
    pytest.param(
        I8,
        1.0,
        -128,
        [0.0, 255.0, 256.0, -1.0, 254.5, 253.5],
        [-128, 127, 127, -128, 126, 126],
        id="i8-zp-128",
    ),
    pytest.param(
        I8,
        1.0,
        127,
        [0.0, -255.0, -256.0, 1.0, -0.5, -1.5],
        [127, -128, -128, 127, 127, 125],
        id="i8-zp127",
    ),
    pytest.param(
        I8, 0.5, 0, [63.5, -64.0, 63.75, -64.25], [127, -128, 127, -128], id="i8-exact-qmin-qmax"
    ),
    pytest.param(
        U8, 0.25, 0, [63.75, 0.0, 63.875, -0.125], [255, 0, 255, 0], id="u8-exact-qmin-qmax"
    ),
    pytest.param(
        U8, 0.1, 37, [0.0, -0.0, 21.8, -3.7], [37, 37, 255, 0], id="u8-zp37-zero-and-ends"
    ),
]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize(("qtype", "scale", "zp", "x", "expected"), QUANTIZE_ROWS)
def test_quantize_boundary_table(qtype, scale, zp, x, expected, opset):
    qp = _qp(qtype, scale, zp)
    x = np.asarray(x, dtype=np.float32)
    expected = np.asarray(expected, dtype=NP[qtype])
    _assert_same(quantize(x, qp), expected)
    _assert_same(_ref_quantize(x, qp, opset), expected)


@pytest.mark.parametrize(
    ("qtype", "zp", "expected"),
    [
        (I8, 0, [127, -128, 127, -128, 127, -128]),
        (I8, 127, [127, -128, 127, -128, 127, -128]),
        (U8, 0, [255, 0, 255, 0, 255, 0]),
        (U8, 255, [255, 0, 255, 0, 255, 0]),
    ],
)
def test_quantize_saturates_beyond_int32(qtype, zp, expected):
    """Far beyond int32 (and +-inf) saturate; ONNX Runtime is the oracle here."""
    qp = _qp(qtype, 1.0, zp)
    x = np.array([1e30, -1e30, np.inf, -np.inf, 3e9, -3e9], dtype=np.float32)
    expected = np.asarray(expected, dtype=NP[qtype])
    _assert_same(quantize(x, qp), expected)
    (ort_q,) = _ort("QuantizeLinear", qtype, None).run(None, _feeds(x, qp))
    _assert_same(ort_q, expected)


@pytest.mark.parametrize("opset", DQ_OPSETS)
@pytest.mark.parametrize(
    ("qtype", "scale", "zp"),
    [
        (U8, 0.1, 0),
        (U8, 0.37, 255),
        (U8, 1.0, 128),
        (I8, 3e-3, -128),
        (I8, 1.0, 127),
        (I8, 2.5, 0),
        (I8, 1e-30, -7),
    ],
)
def test_dequantize_every_integer(qtype, scale, zp, opset):
    info = np.iinfo(NP[qtype])
    q = np.arange(info.min, info.max + 1).astype(NP[qtype])
    qp = _qp(qtype, scale, zp)
    ours = dequantize(q, qp)
    _assert_same(ours, _ref_dequantize(q, qp, opset))
    # the zero point is exactly 0.0 and the ends are (qmin - zp) * scale, (qmax - zp) * scale
    assert ours[zp - info.min] == 0.0
    assert ours[0] == np.float32(info.min - zp) * np.float32(scale)
    assert ours[-1] == np.float32(info.max - zp) * np.float32(scale)


# Per-axis rows: x[2, 3, 4] with channel axis 1; every channel has its own scale / zero point,
# zero points at both extremes, and halves / saturation in every channel.
PER_AXIS_X = np.array(
    [
        [[0.5, 1.5, 2.5, -0.5], [0.25, 0.75, -0.25, 1e6], [-1.5, 3.0, 5.0, -1e6]],
        [[300.0, -300.0, 127.5, -128.5], [63.5, -64.0, 64.0, -64.5], [253.0, -3.0, 2.0, 1.0]],
    ],
    dtype=np.float32,
)
PER_AXIS_ROWS = [
    pytest.param(
        I8,
        [1.0, 0.5, 2.0],
        [0, -128, 127],
        [
            [[0, 2, 2, 0], [-128, -126, -128, 127], [126, 127, 127, -128]],
            [[127, -128, 127, -128], [-1, -128, 0, -128], [127, 125, 127, 127]],
        ],
        id="i8",
    ),
    pytest.param(
        U8,
        [1.0, 0.5, 2.0],
        [0, 128, 255],
        [
            [[0, 2, 2, 0], [128, 130, 128, 255], [254, 255, 255, 0]],
            [[255, 0, 128, 0], [255, 0, 255, 0], [255, 253, 255, 255]],
        ],
        id="u8",
    ),
]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("axis", [1, -2])
@pytest.mark.parametrize(("qtype", "scales", "zps", "expected"), PER_AXIS_ROWS)
def test_quantize_per_axis_table(qtype, scales, zps, expected, axis, opset):
    qp = _qp(qtype, scales, zps, axis)
    expected = np.asarray(expected, dtype=NP[qtype])
    _assert_same(quantize(PER_AXIS_X, qp), expected)
    _assert_same(_ref_quantize(PER_AXIS_X, qp, opset), expected)
    deq = dequantize(expected, qp)
    _assert_same(deq, _ref_dequantize(expected, qp, opset))


@pytest.mark.parametrize("opset", DQ_OPSETS)
@pytest.mark.parametrize("qtype", [U8, I8])
def test_dequantize_per_axis_last_axis(qtype, opset):
    info = np.iinfo(NP[qtype])
    q = np.stack([np.arange(info.min, info.max + 1)] * 3, axis=-1).astype(NP[qtype])  # [256, 3]
    qp = _qp(qtype, [0.1, 1.0, 7.5], [info.min, info.max, (info.min + info.max) // 2], axis=1)
    _assert_same(dequantize(q, qp), _ref_dequantize(q, qp, opset))


# --------------------------------------------------------------------------- strategies

F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
POSITIVE = st.floats(width=32, min_value=0.0, allow_nan=False, allow_infinity=False)
E30 = float(np.float32(1e30))
TINY_END = float(np.float32(1e-30))
TINY = st.floats(width=32, min_value=-TINY_END, max_value=TINY_END, allow_nan=False)
HUGE = st.floats(width=32, min_value=E30, max_value=F32_MAX)


def _sorted(pair: tuple[float, float]) -> tuple[float, float]:
    return min(pair), max(pair)


RANGES = st.one_of(
    st.tuples(F32, F32).map(_sorted),
    st.tuples(TINY, TINY).map(_sorted),
    st.tuples(HUGE.map(lambda v: -v), HUGE),
    st.tuples(HUGE.map(lambda v: -v), F32).map(_sorted),
    st.tuples(POSITIVE, POSITIVE).map(_sorted),  # all positive
    st.tuples(POSITIVE, POSITIVE).map(lambda p: (-max(p), -min(p))),  # all negative
    F32.map(lambda v: (v, v)),  # rmin == rmax
    st.just((0.0, 0.0)),
    st.just((-F32_MAX, F32_MAX)),
    st.just((0.0, F32_MAX)),
    st.just((-F32_MAX, 0.0)),
)


@st.composite
def scheme(draw) -> tuple[QuantType, bool, bool]:
    qtype = draw(st.sampled_from([U8, I8]))
    symmetric = qtype is I8 and draw(st.booleans())
    return qtype, symmetric, draw(st.booleans())


def _points_in(rmin: float, rmax: float) -> np.ndarray:
    """rmin, rmax, 0 and a spread of float32 values between them (no overflow)."""
    t = np.linspace(0.0, 1.0, 101)
    inner = rmin * (1.0 - t) + rmax * t  # float64: no overflow for float32 ends
    return np.concatenate([[rmin, rmax], inner]).astype(np.float32).clip(rmin, rmax)


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(RANGES, scheme())
def test_qparams_properties(rng_pair, sch):
    rmin, rmax = rng_pair
    qtype, symmetric, reduce_range = sch
    if max(abs(rmin), abs(rmax)) > F32_MAX / 2:
        # near float32's limit the grid's ends may overflow: then, and only then, an error
        try:
            qp = compute_qparams(rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range)
        except ValueError as exc:
            assert "float32" in str(exc)
            return
    qp = compute_qparams(rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range)
    qmin, qmax = integer_bounds(qtype, symmetric=symmetric, reduce_range=reduce_range)

    assert qp.scale.dtype == np.float32 and qp.zero_point.dtype == NP[qtype]
    assert np.isfinite(qp.scale) and qp.scale > 0
    assert qmin <= int(qp.zero_point) <= qmax
    if symmetric:
        assert int(qp.zero_point) == 0 and qmin == -qmax

    # 0.0 (and -0.0) is exact
    zeros = np.array([0.0, -0.0], dtype=np.float32)
    q0 = quantize(zeros, qp)
    assert (q0 == qp.zero_point).all()
    assert (dequantize(q0, qp) == 0.0).all()

    # every value inside the range: integer within bounds, round trip within scale / 2
    x = _points_in(rmin, rmax)
    q = quantize(x, qp)
    assert q.min() >= qmin and q.max() <= qmax, (q.min(), q.max(), qmin, qmax)
    back = dequantize(q, qp).astype(np.float64)
    # float slack: a few float32 ulps of the largest magnitude and of the scale (+ subnormals)
    magnitude = max(abs(rmin), abs(rmax))
    slack = (magnitude + float(qp.scale)) * 2.0**-21 + 2.0**-147
    err = np.abs(back - x.astype(np.float64))
    assert np.isfinite(back).all()
    assert err.max() <= float(qp.scale) / 2 + slack, (err.max(), float(qp.scale), slack)


@pytest.mark.parametrize(
    ("qtype", "symmetric", "reduce_range", "bounds"),
    [
        (U8, False, False, (0, 255)),
        (I8, False, False, (-128, 127)),
        (I8, True, False, (-127, 127)),
        (U8, False, True, (0, 127)),
        (I8, False, True, (-64, 63)),
        (I8, True, True, (-63, 63)),
    ],
)
def test_integer_bounds_table(qtype, symmetric, reduce_range, bounds):
    assert integer_bounds(qtype, symmetric=symmetric, reduce_range=reduce_range) == bounds


def test_symmetric_uint8_is_rejected():
    with pytest.raises(ValueError, match="signed"):
        compute_qparams(-1.0, 1.0, U8, symmetric=True)


@pytest.mark.parametrize(("reduce_range", "qmax"), [(False, 127), (True, 63)])
def test_symmetric_uses_narrow_range(reduce_range, qmax):
    qp = compute_qparams(-3.0, 1.0, I8, symmetric=True, reduce_range=reduce_range)
    assert float(qp.scale) == np.float32(3.0 / qmax)
    q = quantize(np.array([-3.0, 3.0, -1e9], dtype=np.float32), qp)
    # the range ends land on -qmax / qmax, never on -qmax - 1; values beyond saturate to int8,
    # or, for 7-bit ranges, at their own bounds
    assert q.tolist() == [-qmax, qmax, -qmax if reduce_range else -128]


@pytest.mark.parametrize(("qtype", "bounds"), [(U8, (0, 127)), (I8, (-64, 63))])
def test_reduce_range_uses_seven_bits(qtype, bounds):
    qp = compute_qparams(-1.0, 3.0, qtype, reduce_range=True)
    assert float(qp.scale) == np.float32(4.0 / 127)
    q = quantize(np.array([-1.0, 3.0], dtype=np.float32), qp)
    assert q.tolist() == list(bounds)


@pytest.mark.parametrize(("qtype", "bounds"), [(U8, (0, 127)), (I8, (-64, 63))])
@pytest.mark.parametrize("half", [0.5, 1.0, 2.0, 1e30])
def test_reduce_range_balanced_range_stays_in_seven_bits(qtype, bounds, half):
    """(-a, a) spans 127 steps with both ends half-way between integers; round half to even
    must not push either end past the 7-bit bounds (it gave 128 for uint8 before)."""
    qp = compute_qparams(-half, half, qtype, reduce_range=True)
    assert bounds[0] <= int(qp.zero_point) <= bounds[1]
    x = np.array([-half, half], dtype=np.float32)
    q = quantize(x, qp)
    assert bounds[0] <= q.min() and q.max() <= bounds[1], q
    err = np.abs(dequantize(q, qp).astype(np.float64) - x)
    assert (err <= float(qp.scale) * (0.5 + 1e-6)).all()


@pytest.mark.parametrize("qtype", [U8, I8])
@pytest.mark.parametrize("rmax", [3.66e-42, 1e-40, 1e-45, 1e-37])
def test_tiny_range_gets_a_normal_scale(qtype, rmax):
    """A subnormal scale keeps a few bits only (3.66e-42 / 255 -> 1.4e-44, 2.4% off, and the
    top of the range came back six steps short); the smallest normal float32 is used instead."""
    qp = compute_qparams(-rmax / 3, rmax, qtype)
    assert float(qp.scale) >= float(np.finfo(np.float32).tiny)
    x = np.array([-rmax / 3, 0.0, rmax / 2, rmax], dtype=np.float32)
    err = np.abs(dequantize(quantize(x, qp), qp).astype(np.float64) - x)
    assert (err <= float(qp.scale) / 2).all(), (err, qp)


WEIGHTS = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
    elements=st.floats(width=32, min_value=-E30, max_value=E30, allow_nan=False),
)


@settings(max_examples=150, deadline=None)
@given(WEIGHTS, st.data(), scheme())
def test_per_channel_equals_per_tensor_on_each_slice(weight, data, sch):
    qtype, symmetric, reduce_range = sch
    axis = data.draw(st.integers(-weight.ndim, weight.ndim - 1))
    qp = weight_qparams(weight, qtype, axis=axis, symmetric=symmetric, reduce_range=reduce_range)
    channels = weight.shape[axis]
    assert qp.scale.shape == (channels,) and qp.zero_point.shape == (channels,)
    for c in range(channels):
        slice_qp = weight_qparams(
            np.take(weight, c, axis=axis),
            qtype,
            axis=None,
            symmetric=symmetric,
            reduce_range=reduce_range,
        )
        assert qp.scale[c].tobytes() == slice_qp.scale.tobytes()
        assert qp.zero_point[c] == slice_qp.zero_point
    # per-channel quantize equals per-tensor quantize of each slice
    q = quantize(weight, qp)
    for c in range(channels):
        slice_w = np.take(weight, c, axis=axis)
        slice_qp = QParams(qp.scale[c], qp.zero_point[c])
        _assert_same(np.take(q, c, axis=axis), quantize(slice_w, slice_qp))


@settings(max_examples=60, deadline=None)
@given(
    RANGES.filter(lambda r: max(-r[0], r[1]) <= F32_MAX / 2),
    scheme(),
    st.sampled_from(OPSETS),
    st.integers(0, 2**32 - 1),
)
def test_reference_agrees_per_tensor(rng_pair, sch, opset, seed):
    rmin, rmax = rng_pair
    qtype, symmetric, reduce_range = sch
    qp = compute_qparams(rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range)
    rng = np.random.default_rng(seed)
    # up to 3x the range on either side (|x / scale| stays far below the reference's int32 cast)
    reach = min(3.0 * max(abs(rmin), abs(rmax), float(qp.scale)), F32_MAX)
    x = rng.uniform(-reach, reach, 64)
    halves = (rng.integers(-300, 300, 16) + 0.5) * float(qp.scale)
    x = np.concatenate([x, halves[np.abs(halves) <= F32_MAX]]).astype(np.float32)
    _assert_bounded_reference(x, qp, opset)


@settings(max_examples=40, deadline=None)
@given(WEIGHTS, st.data(), scheme(), st.sampled_from(OPSETS))
def test_reference_agrees_per_axis(weight, data, sch, opset):
    qtype, symmetric, reduce_range = sch
    axis = data.draw(st.integers(0, weight.ndim - 1))
    qp = weight_qparams(weight, qtype, axis=axis, symmetric=symmetric, reduce_range=reduce_range)
    _assert_bounded_reference(weight, qp, opset)


def _assert_bounded_reference(x: np.ndarray, qp, opset: int) -> None:
    """numpy's quantize is ONNX QuantizeLinear, then clipped to ``qp.bounds`` where set (7-bit
    and narrow symmetric weights); dequantize is DequantizeLinear."""
    reference = _ref_quantize(x, replace(qp, bounds=None), opset)
    q = quantize(x, qp)
    _assert_same(q, np.clip(reference, qp.qmin, qp.qmax).astype(reference.dtype))
    with np.errstate(over="ignore"):  # saturated q of a near-float32-max range: inf in both
        _assert_same(dequantize(q, qp), _ref_dequantize(q, qp, opset))


# --------------------------------------------------------------------------- bias


def test_quantize_bias_scale_and_values():
    bias = np.array([0.5, -1.25, 3.0, 0.0], dtype=np.float32)
    input_scale = 0.0123
    weight_scale = np.array([0.01, 0.02, 0.003, 0.5], dtype=np.float32)
    q, qp = quantize_bias(bias, input_scale, weight_scale)
    expected_scale = np.float32(input_scale) * weight_scale
    assert expected_scale.dtype == np.float32
    _assert_same(qp.scale, expected_scale)
    assert q.dtype == np.int32 and qp.zero_point.dtype == np.int32
    assert (qp.zero_point == 0).all() and qp.axis == 0
    expected_q = np.rint(bias.astype(np.float64) / expected_scale.astype(np.float64))
    _assert_same(q, expected_q.astype(np.int32))
    err = np.abs(q * expected_scale.astype(np.float64) - bias)
    assert (err <= expected_scale.astype(np.float64) / 2).all()


def test_quantize_bias_per_tensor_weight_scale():
    bias = np.array([0.5, -0.25], dtype=np.float32)
    q, qp = quantize_bias(bias, 0.5, np.float32(0.25))
    assert qp.axis is None and qp.scale.shape == ()
    assert qp.scale == np.float32(0.125) and q.tolist() == [4, -2]


BIAS = hnp.arrays(
    np.float32,
    st.integers(1, 8),
    elements=st.floats(width=32, min_value=-E30, max_value=E30, allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(
    BIAS,
    st.floats(min_value=1e-12, max_value=10.0),
    st.floats(width=32, min_value=TINY_END, max_value=1.0),
)
def test_fit_weight_scale_to_bias_prevents_overflow(bias, input_scale, weight_scale):
    weight_scale = np.full(bias.shape, weight_scale, dtype=np.float32)
    fitted = fit_weight_scale_to_bias(weight_scale, input_scale, bias)
    assert fitted.dtype == np.float32 and fitted.shape == weight_scale.shape
    assert (fitted >= weight_scale).all()
    q, qp = quantize_bias(bias, input_scale, fitted)
    assert (np.abs(q.astype(np.int64)) <= INT32_MAX).all()
    scale = qp.scale.astype(np.float64)
    err = np.abs(q.astype(np.float64) * scale - bias.astype(np.float64))
    assert (err <= scale / 2 * (1 + 1e-9)).all(), (err / scale).max()


def test_fit_weight_scale_to_bias_with_subnormal_and_underflowing_products():
    """``input_scale * weight_scale`` rounds to a coarse subnormal float32, or to 0."""
    bias = np.array([2.4e-04, 4.3e17, -5.2e-44, 3.3e28, 1.8e-22, -2.9e-37], dtype=np.float32)
    weight_scale = np.full(bias.shape, 3.0e-35, dtype=np.float32)
    fitted = fit_weight_scale_to_bias(weight_scale, 7.0e-12, bias)
    q, qp = quantize_bias(bias, 7.0e-12, fitted)
    scale = qp.scale.astype(np.float64)
    assert (scale > 0).all() and (fitted >= weight_scale).all()
    assert (np.abs(q.astype(np.float64) * scale - bias) <= scale / 2 * (1 + 1e-9)).all()


def test_fit_weight_scale_to_bias_crafted_overflow():
    # bias / (input_scale * weight_scale) = 1e4 / 1e-6 = 1e10: five times int32
    bias = np.array([1e4, -1e4, 1.0], dtype=np.float32)
    weight_scale = np.full(3, 1e-3, dtype=np.float32)
    unfitted, _ = quantize_bias(bias, 1e-3, weight_scale)
    assert abs(int(unfitted[0])) == INT32_MAX  # without fitting, the bias is clipped
    fitted = fit_weight_scale_to_bias(weight_scale, 1e-3, bias)
    assert fitted[2] == weight_scale[2]  # channels that fit keep their scale
    assert fitted[0] > weight_scale[0] and fitted[1] > weight_scale[1]
    q, qp = quantize_bias(bias, 1e-3, fitted)
    assert (np.abs(q.astype(np.int64)) <= INT32_MAX).all()
    err = np.abs(q * qp.scale.astype(np.float64) - bias)
    assert (err <= qp.scale.astype(np.float64) / 2).all()


def test_fit_weight_scale_to_bias_is_identity_when_bias_fits():
    bias = np.array([1.0, -2.0], dtype=np.float32)
    weight_scale = np.array([0.01, 0.02], dtype=np.float32)
    _assert_same(fit_weight_scale_to_bias(weight_scale, 0.1, bias), weight_scale)


# --------------------------------------------------------------------------- degenerate ranges


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize(
    ("qtype", "symmetric", "zero_q"), [(I8, True, 0), (U8, False, 0), (I8, False, -128)]
)
def test_all_zero_weight(axis, qtype, symmetric, zero_q):
    weight = np.zeros((3, 4), dtype=np.float32)
    qp = weight_qparams(weight, qtype, axis=axis, symmetric=symmetric)
    assert (qp.scale == 1.0).all()
    q = quantize(weight, qp)
    assert (q == zero_q).all() and (qp.zero_point == zero_q).all()
    assert (dequantize(q, qp) == 0.0).all()


def test_one_zero_channel_gets_scale_one():
    weight = np.array([[0.0, 0.0], [1.27, -0.5]], dtype=np.float32)
    qp = weight_qparams(weight, I8, axis=0, symmetric=True)
    assert qp.scale[0] == 1.0 and qp.scale[1] == np.float32(1.27 / 127)
    assert quantize(weight, qp).tolist() == [[0, 0], [127, -50]]


@pytest.mark.parametrize(
    ("rmin", "rmax"),
    [(np.nan, 1.0), (-1.0, np.nan), (-np.inf, 0.0), (0.0, np.inf), (-np.inf, np.inf)],
)
@pytest.mark.parametrize("qtype", [U8, I8])
def test_non_finite_range_is_rejected(rmin, rmax, qtype):
    with pytest.raises(ValueError, match="finite"):
        compute_qparams(rmin, rmax, qtype)


def test_non_finite_per_channel_range_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        compute_qparams(np.array([-1.0, -np.inf]), np.array([1.0, 1.0]), I8, axis=0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weight_is_rejected(bad):
    weight = np.array([[0.5, bad], [1.0, 2.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="finite"):
        weight_qparams(weight, I8, axis=0, symmetric=True)


@pytest.mark.parametrize(
    ("qtype", "symmetric", "reduce_range", "rmin", "rmax"),
    [
        (U8, False, False, -1e300, 1e300),  # the float32 scale would be inf
        (I8, True, False, 0.0, 1e39),
        (U8, False, False, -F32_MAX, F32_MAX),  # (0 - 128) * scale overflows
        (I8, False, False, -F32_MAX, F32_MAX),
        (I8, True, False, -F32_MAX, 1.0),  # 127 * fl(max / 127) overflows
        (U8, False, True, 0.0, F32_MAX),
    ],
)
def test_range_beyond_float32_is_rejected(qtype, symmetric, reduce_range, rmin, rmax):
    """No float32 scale covers it, or its dequantized ends overflow: an error, not a silent
    scale of 1 or an infinite dequantized value."""
    with pytest.raises(ValueError, match="float32"):
        compute_qparams(rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range)


@pytest.mark.parametrize("qtype", [U8, I8])
def test_wide_float32_range_still_works(qtype):
    qp = compute_qparams(-F32_MAX / 4, F32_MAX / 4, qtype)
    info = np.iinfo(NP[qtype])
    ends = dequantize(np.array([info.min, info.max], dtype=NP[qtype]), qp)
    assert np.isfinite(ends).all() and ends[0] <= -F32_MAX / 4 * 0.99
