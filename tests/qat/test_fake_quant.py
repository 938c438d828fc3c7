"""Fake quantization pieces: forward equals ONNX Q/DQ arithmetic, STE and LSQ gradients."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxq.config import QuantType  # noqa: E402
from onnxq.qat.fake_quant import (  # noqa: E402
    FakeQuantize,
    fake_quantize_bias,
    lsq_factor,
    round_ste,
)
from onnxq.qparams import compute_qparams, dequantize, quantize, quantize_bias  # noqa: E402


def _qdq(x: np.ndarray, qp) -> np.ndarray:
    return dequantize(quantize(x, qp), qp)


def _assert_same_levels(got: np.ndarray, x: np.ndarray, qp) -> None:
    """Same integer levels as ONNX QuantizeLinear, dequantized within one float32 ulp
    (ONNX Runtime multiplies in float32, ``onnxq.qparams.dequantize`` in float64)."""
    np.testing.assert_allclose(got, _qdq(x, qp), rtol=1.2e-7, atol=0)


def test_round_ste_rounds_half_to_even_and_passes_gradient() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 0.49], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, 0.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 5


def test_per_tensor_forward_equals_onnx_qdq_with_saturation() -> None:
    rng = np.random.default_rng(0)
    qp = compute_qparams(-1.0, 3.0, QuantType.UINT8)
    x = (rng.standard_normal(4000) * 2).astype(np.float32)  # values beyond both ends
    x[:3] = [qp.scale * 0.5, qp.scale * 1.5, qp.scale * -2.5]  # ties
    fq = FakeQuantize(qp, 0, 255)
    got = fq(torch.from_numpy(x)).detach().numpy()
    _assert_same_levels(got, x, qp)


def test_per_channel_symmetric_7bit_forward_equals_onnx_qdq() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7).reshape(6, 1, 1, 1)
    qp = compute_qparams(
        w.reshape(6, -1).min(1), w.reshape(6, -1).max(1), QuantType.INT8,
        symmetric=True, reduce_range=True, axis=0,
    )  # fmt: skip
    assert (qp.qmin, qp.qmax) == (-63, 63)
    fq = FakeQuantize(qp, qp.qmin, qp.qmax)
    wide = w * 1.3  # beyond the range: saturates at the 7-bit bounds
    _assert_same_levels(fq(torch.from_numpy(wide)).detach().numpy(), wide, qp)


def test_ste_gradient_is_one_inside_and_zero_where_saturated() -> None:
    qp = compute_qparams(-1.0, 1.0, QuantType.INT8, symmetric=True)
    fq = FakeQuantize(qp, -128, 127)
    x = torch.tensor([-5.0, -0.3, 0.0, 0.7, 5.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_gradient_matches_formula() -> None:
    """d out / d t for scale s0 * exp(t): s * g * sum((q - z) - x / s) inside, q_bound - z
    where saturated."""
    qp = compute_qparams(0.0, 2.0, QuantType.UINT8)
    fq = FakeQuantize(qp, 0, 255, learn_scale=True)
    x = torch.tensor([[0.013, 0.5, 1.2345, 3.0, -1.0]])
    fq(x).sum().backward()
    s, z = float(qp.scale), float(qp.zero_point)
    xs = x.numpy().ravel() / np.float32(s)
    q = np.clip(np.rint(xs) + z, 0, 255)
    inside = (np.rint(xs) + z >= 0) & (np.rint(xs) + z <= 255)
    ds = np.where(inside, (q - z) - xs, q - z).sum()
    expected = s * lsq_factor(x[0].numel(), 255) * ds
    assert fq.log_gain.grad.item() == pytest.approx(expected, rel=1e-5)


def test_learned_scale_starts_exactly_at_post_training_value() -> None:
    qp = compute_qparams(np.array([-0.3, -1.7]), np.array([0.9, 2.2]), QuantType.INT8,
                         symmetric=True, axis=0)  # fmt: skip
    fq = FakeQuantize(qp, -127, 127, learn_scale=True)
    out = fq.qparams()
    assert out.scale.dtype == np.float32 and out.scale.tobytes() == qp.scale.tobytes()
    assert out.zero_point.dtype == qp.zero_point.dtype and out.axis == 0
    with torch.no_grad():
        fq.log_gain.fill_(np.log(2.0))
    np.testing.assert_allclose(fq.qparams().scale, 2 * qp.scale, rtol=1e-6)


def test_bias_fake_quant_equals_int32_bias() -> None:
    rng = np.random.default_rng(2)
    bias = rng.standard_normal(8).astype(np.float32)
    input_scale = np.float32(0.02)
    weight_scale = (rng.random(8) * 0.01 + 1e-3).astype(np.float32)
    q, qp = quantize_bias(bias, float(input_scale), weight_scale)
    got = fake_quantize_bias(
        torch.from_numpy(bias), torch.tensor(input_scale), torch.from_numpy(weight_scale)
    )
    np.testing.assert_allclose(got.numpy(), q * qp.scale, rtol=1e-6, atol=0)
