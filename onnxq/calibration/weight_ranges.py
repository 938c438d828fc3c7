"""Weight ranges (pure numpy): per-channel min-max, or the per-channel clipping with least error.

``mse_weight_qparams`` searches, independently for every channel ``c`` along ``axis``, the
clip ratio ``alpha`` in ``1, 1 - 1/candidates, ..., lowest`` and then geometrically down to
``2**-10`` whose range ``alpha * [min_c, max_c]`` minimises the real rounding error of that
channel::

    err_c(alpha) = sum_i m_ci (w_ci - dequantize(quantize(w_ci)))**2

``m_ci`` is the importance of weight ``i``: 1, or with calibration data ``E[x_i**2]`` of the
input that weight multiplies (the diagonal of GPTQ's ``H = E[x x^T]``), so the sum estimates
the squared error the rounding adds to the layer's output. A weight whose input is always zero
(a dead channel, whose BatchNorm-folded weights can be huge) costs nothing and is clipped
instead of stretching the range of every other weight it shares a scale with.

with the exact float32 quantize/dequantize arithmetic of ``onnxq.qparams`` (scales, zero
points and saturation at the type's bounds included). ``alpha = 1`` is min-max, and ties keep
the larger ``alpha``, so a channel without outliers keeps its min-max range. With 8-bit levels
clipping pays only for channels with many values and rare large ones (the rounding error of
``n`` values, ``n s**2 / 12``, must outweigh the clipped values' squared excess).

With ``reduce_range`` the search runs over 7-bit levels, and clipped weights saturate at the
7-bit bounds (``QParams.bounds``), never beyond them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from onnxq.config import QuantType, WeightRange
from onnxq.qparams import QParams, compute_qparams, weight_qparams

WeightQParams = Callable[..., QParams]


def weight_qparams_for(method: WeightRange) -> WeightQParams:
    """The qparams function of a weight-range method (same signature as ``weight_qparams``)."""
    return mse_weight_qparams if WeightRange(method) is WeightRange.MSE else weight_qparams


def mse_weight_qparams(
    weight: np.ndarray,
    qtype: QuantType,
    *,
    axis: int | None,
    symmetric: bool,
    reduce_range: bool = False,
    importance: np.ndarray | None = None,
    candidates: int = 100,
    lowest: float = 0.3,
    tail: int = 30,
) -> QParams:
    """QParams of ``weight`` (per channel along ``axis``, or per tensor) with MSE clipping;
    ``importance`` (``weight``'s shape) weighs each weight's squared error."""
    weight = np.asarray(weight, dtype=np.float32)
    rows = _rows(weight, axis)
    weights = None if importance is None else _rows(np.asarray(importance, np.float32), axis)
    rmin = np.minimum(rows.min(axis=1), 0.0).astype(np.float64)
    rmax = np.maximum(rows.max(axis=1), 0.0).astype(np.float64)
    linear = np.arange(candidates, int(np.ceil(lowest * candidates)) - 1, -1) / candidates
    alphas = np.concatenate([linear, np.geomspace(linear[-1], 2.0**-10, tail + 1)[1:]])
    best_alpha = np.ones(rows.shape[0])
    best_error = np.full(rows.shape[0], np.inf)
    for alpha in alphas:
        qp = compute_qparams(
            alpha * rmin,
            alpha * rmax,
            qtype,
            symmetric=symmetric,
            reduce_range=reduce_range,
            bounded=True,
        )
        error = _rounding_error(rows, qp, weights)
        better = error < best_error
        best_alpha = np.where(better, alpha, best_alpha)
        best_error = np.where(better, error, best_error)
    qp = compute_qparams(
        best_alpha * rmin,
        best_alpha * rmax,
        qtype,
        symmetric=symmetric,
        reduce_range=reduce_range,
        bounded=True,
    )
    if axis is None:
        return replace(qp, scale=qp.scale.reshape(()), zero_point=qp.zero_point.reshape(()))
    return replace(qp, axis=axis)


def _rows(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """``[channels, values]``: one row per channel along ``axis`` (one row when per tensor)."""
    if axis is None:
        return weight.reshape(1, -1)
    return np.moveaxis(weight, axis % weight.ndim, 0).reshape(weight.shape[axis], -1)


def _rounding_error(rows: np.ndarray, qp: QParams, weights: np.ndarray | None) -> np.ndarray:
    """Per-row ``sum(m * (x - dequantize(quantize(x)))**2)`` with per-row scale and zero point
    (``m``: ``weights``, or 1)."""
    qmin, qmax = qp.qmin, qp.qmax
    scale = qp.scale.reshape(-1, 1)
    zero = qp.zero_point.astype(np.float32).reshape(-1, 1)
    q = np.clip(np.rint(rows / scale) + zero, qmin, qmax)
    diff = rows - (q - zero) * scale
    weighted = diff if weights is None else diff * weights
    return np.einsum("ij,ij->i", weighted, diff, dtype=np.float64)
