"""Quantization parameters: pure numpy, no graph knowledge.

Affine quantization maps a real value ``r`` to an integer ``q``::

    q = saturate(round_half_to_even(r / scale) + zero_point)      r' = (q - zero_point) * scale

Rules every function here keeps:
1. The real range always contains 0, and 0 is exactly representable (``zero_point`` is an integer).
2. Symmetric parameters have ``zero_point`` 0 and use the narrow range ``[-qmax, qmax]``.
3. ``reduce_range`` drops one bit (int8 -> [-64, 63], uint8 -> [0, 127]).
4. A degenerate range (``rmin == rmax == 0``) gets ``scale = 1``: every value is 0 and is exact.
   A scale is never subnormal: tiny ranges get the smallest normal float32 scale.
5. Ranges must be finite; observers drop non-finite values before they get here. A range so
   wide that the scale or the dequantized ends overflow float32 is a ``ValueError`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.config import QuantType

INT32_MAX = np.iinfo(np.int32).max
_FLOAT32_MAX = float(np.finfo(np.float32).max)

_NUMPY_TYPES = {
    QuantType.UINT8: np.uint8,
    QuantType.INT8: np.int8,
    QuantType.UINT16: np.uint16,
    QuantType.INT16: np.int16,
    QuantType.UINT4: np.uint8,  # 4-bit integers are held one per byte until written
    QuantType.INT4: np.int8,
}


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one tensor: scalars (per-tensor) or vectors along ``axis``;
    ``bounds`` are the integers it may use when narrower than its type (7-bit weights)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    bounds: tuple[int, int] | None = None

    @property
    def qmin(self) -> int:
        return self.bounds[0] if self.bounds else int(np.iinfo(self.zero_point.dtype).min)

    @property
    def qmax(self) -> int:
        return self.bounds[1] if self.bounds else int(np.iinfo(self.zero_point.dtype).max)


def integer_bounds(
    qtype: QuantType, *, symmetric: bool = False, reduce_range: bool = False
) -> tuple[int, int]:
    """The integers a tensor may use (rules 2 and 3)."""
    qmin, qmax = qtype.bounds
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    if symmetric:
        if not qtype.signed:
            raise ValueError("symmetric quantization needs a signed type")
        qmin = -qmax
    return qmin, qmax


def compute_qparams(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    qtype: QuantType,
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
    axis: int | None = None,
    bounded: bool = False,
) -> QParams:
    """Scale and zero point covering ``[rmin, rmax]`` (elementwise for per-channel ranges).

    ``bounded`` (weights) or ``reduce_range``: rounding never leaves the integers the range
    uses (``QParams.bounds``: 7-bit, or ``[-qmax, qmax]`` when symmetric); otherwise values
    beyond the range saturate at the type's bounds, as ONNX QuantizeLinear does.

    Asymmetric: ``scale = (rmax - rmin) / (qmax - qmin)``, ``zp = round(qmin - rmin / scale)``.
    Symmetric: ``scale = max(|rmin|, |rmax|) / qmax``, ``zp = 0``.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(rmin)) and np.all(np.isfinite(rmax))):
        raise ValueError("quantization range must be finite")
    qmin, qmax = integer_bounds(qtype, symmetric=symmetric, reduce_range=reduce_range)
    span = np.maximum(-rmin, rmax) / qmax if symmetric else (rmax - rmin) / (qmax - qmin)
    too_wide = ValueError("quantization range is too wide for float32 (scale or ends overflow)")
    if np.any(span > _FLOAT32_MAX):
        raise too_wide
    # a subnormal float32 scale keeps only a few significant bits (and runtimes may flush it to
    # zero): a tiny but non-zero span gets the smallest normal scale instead
    scale = np.maximum(span.astype(np.float32), np.finfo(np.float32).tiny)
    scale = np.where(span > 0, scale, np.float32(1.0)).astype(np.float32)
    if symmetric:
        zero_point = np.zeros_like(scale, dtype=np.float64)
    else:
        zero_point = _zero_point(rmin, scale, qmin, qmax)
        if (qmin, qmax) != qtype.bounds:
            scale, zero_point = _fit_reduced_bounds(rmin, rmax, scale, zero_point, qmin, qmax)
    # the dequantized ends (qmin - zp) * scale and (qmax - zp) * scale must be finite float32
    reach = np.maximum(qmax - zero_point, zero_point - qmin) * scale.astype(np.float64)
    with np.errstate(over="ignore"):
        if not np.all(np.isfinite(reach.astype(np.float32))):
            raise too_wide
    dtype = _NUMPY_TYPES[qtype]
    # narrower than the type (7-bit), or than the numpy type that holds it (4-bit)
    narrow = ((bounded or reduce_range) and (qmin, qmax) != qtype.bounds) or (
        qtype.bounds != _dtype_bounds(dtype)
    )
    narrowed = (qmin, qmax) if narrow else None
    return QParams(scale, zero_point.astype(dtype), axis, narrowed)


def _dtype_bounds(dtype: type[np.integer]) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _zero_point(rmin: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip(np.round(qmin - rmin / scale.astype(np.float64)), qmin, qmax)


def _fit_reduced_bounds(
    rmin: np.ndarray,
    rmax: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qmin: int,
    qmax: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep ``quantize(rmin)`` and ``quantize(rmax)`` inside reduced bounds.

    The ends span exactly ``qmax - qmin`` steps; when they sit half-way between integers, round
    half to even sends both outwards (``(-1, 1)`` with uint8 reduce_range gives 0 and 128), and
    the float32 division in ``quantize`` can disagree with the float64 zero point by one. The
    full type range absorbs that by saturating; a reduced range cannot, so such scales grow by
    one float32 ulp (breaking the tie) and the zero point is recomputed.
    """
    ends = np.stack(np.broadcast_arrays(rmin, rmax)).astype(np.float32)
    for _ in range(16):
        q = np.rint(ends / scale) + zero_point
        outside = (q[0] < qmin) | (q[1] > qmax)
        if not np.any(outside):
            break
        scale = np.where(outside, np.nextafter(scale, np.float32(np.inf)), scale)
        scale = scale.astype(np.float32)
        zero_point = _zero_point(rmin, scale, qmin, qmax)
    return scale, zero_point


def weight_qparams(
    weight: np.ndarray,
    qtype: QuantType,
    *,
    axis: int | None,
    symmetric: bool,
    reduce_range: bool = False,
) -> QParams:
    """Min-max qparams of a constant tensor, per channel along ``axis`` or per tensor."""
    weight = np.asarray(weight, dtype=np.float32)
    if axis is None:
        rmin, rmax = weight.min(initial=0.0), weight.max(initial=0.0)
    else:
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
        rmin = weight.min(axis=reduce_axes, initial=0.0)
        rmax = weight.max(axis=reduce_axes, initial=0.0)
    return compute_qparams(
        rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range, axis=axis, bounded=True
    )


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """``saturate(round_half_to_even(x / scale) + zero_point)``, as ONNX QuantizeLinear."""
    scale, zero_point = _broadcast(qp, np.ndim(x))
    q = np.rint(np.asarray(x, dtype=np.float32) / scale) + zero_point.astype(np.float32)
    return np.clip(q, qp.qmin, qp.qmax).astype(qp.zero_point.dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """``(q - zero_point) * scale``, as ONNX DequantizeLinear."""
    scale, zero_point = _broadcast(qp, np.ndim(q))
    return ((q.astype(np.int32) - zero_point.astype(np.int32)) * scale).astype(np.float32)


def fit_weight_scale_to_bias(
    weight_scale: np.ndarray, input_scale: float, bias: np.ndarray
) -> np.ndarray:
    """Raise weight scales where ``bias / (input_scale * weight_scale)`` would overflow int32.

    The check repeats ``quantize_bias``'s float32 arithmetic: rounding the needed scale (and the
    product ``input_scale * weight_scale``) to float32 can leave the quotient above
    ``INT32_MAX`` (by a few units, or by far more where the product is subnormal and coarse), so
    such scales are raised by the remaining shortfall, with a margin that doubles on every
    round, until it fits.
    """
    input_scale32 = np.float32(input_scale)
    magnitude = np.abs(np.asarray(bias, dtype=np.float64))
    needed = magnitude / (float(input_scale32) * INT32_MAX)
    fitted = np.maximum(weight_scale, needed.astype(np.float32)).astype(np.float32)
    smallest = float(np.finfo(np.float32).smallest_subnormal)  # a product may underflow to 0
    for attempt in range(64):
        product = (input_scale32 * fitted).astype(np.float64)
        over = magnitude > product * INT32_MAX
        if not np.any(over):
            break
        target = np.maximum(magnitude / INT32_MAX, smallest)
        margin = 1.0 + 2.0 ** (min(attempt, 30) - 24)
        shortfall = np.where(over, target / np.maximum(product, smallest) * margin, 1.0)
        raised = (fitted * shortfall).astype(np.float32)
        fitted = np.where(
            over, np.maximum(raised, np.nextafter(fitted, np.float32(np.inf))), fitted
        )
    return np.asarray(fitted, dtype=np.float32)


def quantize_bias(
    bias: np.ndarray, input_scale: float, weight_scale: np.ndarray
) -> tuple[np.ndarray, QParams]:
    """Int32 bias with ``scale = input_scale * weight_scale`` and zero point 0."""
    scale = np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)
    scale = np.broadcast_to(scale, bias.shape) if scale.ndim else scale
    scale = np.asarray(scale, dtype=np.float32)
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    q = np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32)
    axis = 0 if scale.ndim else None
    return q, QParams(scale, np.zeros_like(scale, dtype=np.int32), axis)


def _broadcast(qp: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    if qp.axis is None or qp.scale.ndim == 0:
        return qp.scale, qp.zero_point
    shape = [1] * ndim
    shape[qp.axis % ndim] = -1
    return qp.scale.reshape(shape), qp.zero_point.reshape(shape)
