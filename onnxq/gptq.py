"""Error-compensating weight rounding (GPTQ; Frantar et al., 2022), pure numpy.

Rounding each weight to its nearest grid point ignores what the layer computes. GPTQ rounds the
columns of ``W`` (one row per output channel) one at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse of ``H = E[x x^T]``, so that
``|| W x - W_q x ||^2`` over the calibration inputs stays small:

    e_i = (w_i - q(w_i)) / [U]_ii          W[:, j>i] -= e_i [U]_i,j>i

with ``U`` the upper Cholesky factor of ``(H + damp I)^-1``. Scales and zero points are fixed
beforehand (per row or per tensor); only the integers change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from onnxq.qparams import QParams

DAMPING = 0.01  # fraction of mean(diag H) added to the diagonal
BLOCK = 128


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs from ``H``: ``upper`` (``U`` above; ``None`` when ``H + damp I`` is not
    positive definite, and rounding falls back to nearest) and the ``dead`` inputs (``H_ii =
    0``: never seen non-zero, their weights are dropped). Layers reading the same input share
    one factor."""

    upper: np.ndarray | None
    dead: np.ndarray


def factor_hessian(hessian: np.ndarray) -> HessianFactor:
    """Dampen ``H`` and factor it (``K^3`` flops: the costly step of GPTQ)."""
    h = hessian.astype(np.float64).copy()
    k = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += DAMPING * np.mean(np.diag(h))
    return HessianFactor(_inverse_cholesky(h), dead)


def gptq_round(weight: np.ndarray, hessian: np.ndarray, qp: QParams) -> np.ndarray:
    """Integers for ``weight`` (``[rows, K]``) on ``qp``'s grid (per-row or per-tensor)."""
    rows, k = weight.shape
    scale = np.broadcast_to(np.asarray(qp.scale, np.float64).reshape(-1, 1), (rows, 1))
    zero = np.broadcast_to(np.asarray(qp.zero_point, np.float64).reshape(-1, 1), (rows, 1))
    factor = factor_hessian(hessian)
    q = gptq_round_groups(weight, factor, scale, zero, k, (qp.qmin, qp.qmax))
    return q.astype(qp.zero_point.dtype)


def gptq_round_groups(
    weight: np.ndarray,
    factor: HessianFactor,
    scale: np.ndarray,
    zero: np.ndarray,
    group_size: int,
    bounds: tuple[int, int],
) -> np.ndarray:
    """Integer levels (float64) of ``weight[rows, K]`` when column ``i`` is on the grid of group
    ``i // group_size``: ``scale``/``zero`` are ``[rows, ceil(K / group_size)]``, fixed
    beforehand (group-wise GPTQ: the groups' ranges come from the original weights)."""
    k = weight.shape[1]
    qmin, qmax = bounds
    scale = np.asarray(scale, np.float64)
    zero = np.asarray(zero, np.float64)
    upper = factor.upper
    if upper is None:
        index = np.arange(k) // group_size
        return np.clip(np.rint(weight / scale[:, index]) + zero[:, index], qmin, qmax)
    w = weight.astype(np.float64).copy()
    w[:, factor.dead] = 0.0
    q = np.empty_like(w)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        block = w[:, start:stop].copy()
        errors = np.empty_like(block)
        u = upper[start:stop, start:stop]
        for i in range(stop - start):
            group = (start + i) // group_size
            s, z = scale[:, group : group + 1], zero[:, group : group + 1]
            column = block[:, i : i + 1]
            levels = np.clip(np.rint(column / s) + z, qmin, qmax)
            q[:, start + i : start + i + 1] = levels
            error = (column - (levels - z) * s) / u[i, i]
            block[:, i:] -= error * u[i, i:]
            errors[:, i : i + 1] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return q


def _inverse_cholesky(h: np.ndarray) -> np.ndarray | None:
    """Upper ``U`` with ``H^-1 = U^T U``, without forming ``H^-1``.

    With ``J`` the order reversal and ``J H J = L L^T``, ``R = J L J`` is upper triangular and
    ``H = R R^T``, so ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = J L^-1 J``: one Cholesky and one
    triangular inverse (``K^3 / 3`` flops each). ``None`` if ``H`` is not positive definite.
    """
    reversed_h = np.ascontiguousarray(h[::-1, ::-1])
    lower, info = lapack.dpotrf(reversed_h, lower=1, clean=1)
    if info != 0:
        return None
    lower_inverse, info = lapack.dtrtri(lower, lower=1)
    if info != 0 or not np.all(np.isfinite(lower_inverse)):
        return None
    return np.ascontiguousarray(lower_inverse[::-1, ::-1])
