"""Fake quantization in plain torch: what ONNX ``QuantizeLinear -> DequantizeLinear`` computes,
with gradients for training.

Forward (the same float32 arithmetic as ONNX, round half to even like ``torch.round``)::

    q = clamp(round(x / s) + z, qmin, qmax)        x' = (q - z) * s

Backward:
1. Straight-through estimator: ``round`` passes its gradient unchanged, so ``dx'/dx = 1``
   inside ``[qmin, qmax]`` and 0 where the value saturates.
2. LSQ (Esser et al. 2020), when the scale is learnable: the same expression differentiated in
   ``s`` gives ``dx'/ds = (q - z) - x / s`` inside the range and ``qmin - z`` / ``qmax - z``
   where it saturates; that gradient is multiplied by ``g = 1 / sqrt(n * qmax)`` (``n`` the
   values one scale covers) so the step size learns at the pace of the weights.
3. Zero points are integers and stay fixed; a scale never drops below the smallest normal
   float32 (``onnxq.qparams`` rule 4). A learned scale is ``s0 * exp(t)``: positive, and
   exactly the post-training ``s0`` before training.
4. Int32 biases (``scale = input_scale * weight_scale``) are fake-quantized too, so the module
   computes what ONNX Runtime's int8 kernels compute.
5. A learned scale may have a ceiling (``max_scale``): where the quantized tensor is a Clip's
   output, the Q's range ``[(qmin - z) s, (qmax - z) s]`` must stay inside the Clip's bounds,
   or ONNX Runtime keeps the Clip and cannot fuse the int8 kernel (``clip_scale_ceiling``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from onnxq.qparams import QParams

INT32_BOUND = 2**31 - 1
TINY_SCALE = float(np.finfo(np.float32).tiny)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) forward, identity backward (rule 1)."""
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward (rule 2)."""
    return (x - x.detach()) * factor + x.detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; ``scale`` and ``zero_point`` are
    broadcast against ``x`` by the caller. Gradients: rules 1 and 2 (``scale`` may require
    grad)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def lsq_factor(values_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(n * qmax)`` (rule 2)."""
    return 1.0 / math.sqrt(max(values_per_scale, 1) * max(qmax, 1))


class FakeQuantize(nn.Module):
    """Fake quantization of one tensor with fixed or learnable (LSQ) scales.

    ``scale`` starts at onnxq's post-training qparams (per tensor, or per channel along
    ``axis``); ``qmin``/``qmax`` are the integers the quantized tensor may use. A learnable
    scale is ``s0 * exp(t)`` with ``t`` trained from 0 (rule 2): the scale starts exactly at
    ``s0``, stays positive, and Adam's steps on ``t`` are relative changes of the scale.
    """

    def __init__(
        self,
        qparams: QParams,
        qmin: int,
        qmax: int,
        *,
        learn_scale: bool = False,
        max_scale: float | None = None,
    ) -> None:
        super().__init__()
        scale = torch.as_tensor(np.asarray(qparams.scale, dtype=np.float32).copy())
        if max_scale is not None:  # never below the post-training scale (rule 5)
            max_scale = max(float(max_scale), float(scale.max()))
        self.max_scale = max_scale
        zero = torch.as_tensor(np.asarray(qparams.zero_point).astype(np.float32))
        self.register_buffer("initial_scale", scale)
        self.register_buffer("zero_point", zero)
        self.log_gain = nn.Parameter(torch.zeros_like(scale), requires_grad=learn_scale)
        self.axis = qparams.axis if scale.ndim else None
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.zero_dtype = np.asarray(qparams.zero_point).dtype
        self.bounds = qparams.bounds

    @property
    def learn_scale(self) -> bool:
        return self.log_gain.requires_grad

    @property
    def scale(self) -> torch.Tensor:
        """The current scale ``s0 * exp(t)`` (exactly ``s0`` while ``t`` is 0), clamped to
        ``[TINY_SCALE, max_scale]``."""
        return (self.initial_scale * torch.exp(self.log_gain)).clamp(TINY_SCALE, self.max_scale)

    def broadcast(self, value: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-channel vector shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
        if self.axis is None or value.ndim == 0:
            return value
        shape = [1] * ndim
        shape[self.axis % ndim] = -1
        return value.reshape(shape)

    def current_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale used on ``x``, with LSQ's gradient factor when it is learned."""
        scale = self.scale
        if self.learn_scale:
            per_scale = x.numel() // max(scale.numel(), 1)
            if self.axis is None and x.ndim > 1:
                per_scale = x[0].numel()  # activations: per sample, as LSQ counts features
            scale = scale_gradient(scale, lsq_factor(per_scale, self.qmax))
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.broadcast(self.current_scale(x), x.ndim)
        zero = self.broadcast(self.zero_point, x.ndim)
        return fake_quantize(x, scale, zero, self.qmin, self.qmax)

    def qparams(self) -> QParams:
        """The current scale and zero point as onnxq ``QParams`` (what ``export_qat`` writes)."""
        scale = self.scale.detach().cpu().numpy().astype(np.float32)
        zero = self.zero_point.detach().cpu().numpy().astype(self.zero_dtype)
        return QParams(scale, zero, self.axis, self.bounds)


def clip_scale_ceiling(
    low: float | None, high: float | None, qmin: int, qmax: int, zero_point: int
) -> float | None:
    """The largest float32 scale whose Q range ``[(qmin - z) s, (qmax - z) s]`` stays inside
    ``[low, high]`` (rule 5): ``s <= high / (qmax - z)``, and ``s <= low / (qmin - z)`` for a
    negative ``low``. Bounds the range cannot meet (a Relu's 0 with a signed zero point 0) or
    that are absent impose nothing; ``None`` when nothing is imposed."""
    ceilings = []
    if high is not None and np.isfinite(high) and high > 0 and qmax > zero_point:
        ceilings.append((high, qmax - zero_point))
    if low is not None and np.isfinite(low) and low < 0 and qmin < zero_point:
        ceilings.append((low, qmin - zero_point))
    best = None
    for bound, steps in ceilings:
        scale = np.float32(bound / steps)
        while abs(np.float32(steps) * scale) > abs(np.float32(bound)):  # float32 as ORT checks
            scale = np.nextafter(scale, np.float32(0))
        best = float(scale) if best is None else min(best, float(scale))
    return best


def fake_quantize_bias(
    bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """Int32 bias with ``scale = input_scale * weight_scale`` and zero point 0 (rule 4)."""
    scale = input_scale * weight_scale
    q = torch.clamp(round_ste(bias / scale), -INT32_BOUND, INT32_BOUND)
    return q * scale
