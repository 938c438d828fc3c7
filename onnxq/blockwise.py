"""Blocked (group-wise) weight quantization, pure numpy, in ONNX's blocked DequantizeLinear layout.

A weight ``W[K, N]`` (MatMul's ``B``) is cut along ``K`` into blocks of ``block_size`` rows; each
block of each output column ``n`` gets its own scale (and zero point)::

    scale[k // block_size, n],  zero_point[k // block_size, n]        (shape [ceil(K / B), N])
    W'[k, n] = (q[k, n] - zero_point[k // B, n]) * scale[k // B, n]

which is ``DequantizeLinear(q, scale, zero_point, axis=0, block_size=B)`` (opset 21). ``K`` need
not be a multiple of ``B``: the last block is shorter (the ONNX spec and ONNX Runtime's fused
kernel both accept that), and its range is taken over its real rows only.

Ranges follow ``onnxq.qparams`` (0 is always exact; symmetric types use ``[-qmax, qmax]`` and no
zero point), per block: min-max, or the clipped range with least squared rounding error
(``onnxq.calibration.weight_ranges``), each block a channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.calibration.weight_ranges import weight_qparams_for
from onnxq.config import QuantType, WeightRange
from onnxq.qparams import QParams


@dataclass(frozen=True)
class BlockQParams:
    """Scales and zero points ``[blocks, N]`` of a blocked ``[K, N]`` weight, and the integers
    the weight may use."""

    scale: np.ndarray
    zero_point: np.ndarray
    block_size: int
    bounds: tuple[int, int]

    def expand(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point repeated to every row of a ``[rows, N]`` weight."""
        index = np.arange(rows) // self.block_size
        return self.scale[index], self.zero_point[index]


def block_count(rows: int, block_size: int) -> int:
    return -(-rows // block_size)


def block_qparams(
    weight: np.ndarray,
    qtype: QuantType,
    block_size: int,
    *,
    symmetric: bool,
    method: WeightRange = WeightRange.MINMAX,
) -> BlockQParams:
    """QParams of every ``block_size x 1`` block of ``weight[K, N]`` (see the module docstring)."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, columns = weight.shape
    blocks = block_count(rows, block_size)
    padded = np.zeros((blocks * block_size, columns), dtype=np.float32)
    padded[:rows] = weight  # zero padding: the range holds 0 anyway, and 0 rounds exactly
    # one channel per (block, column): [blocks * N, block_size]
    channels = padded.reshape(blocks, block_size, columns).transpose(0, 2, 1)
    channels = channels.reshape(blocks * columns, block_size)
    qp: QParams = weight_qparams_for(method)(channels, qtype, axis=0, symmetric=symmetric)
    return BlockQParams(
        scale=qp.scale.reshape(blocks, columns),
        zero_point=qp.zero_point.reshape(blocks, columns),
        block_size=block_size,
        bounds=(qp.qmin, qp.qmax),
    )


def quantize_blocks(weight: np.ndarray, qp: BlockQParams) -> np.ndarray:
    """``saturate(round_half_to_even(W / scale) + zero_point)``, as ONNX QuantizeLinear."""
    scale, zero = qp.expand(weight.shape[0])
    q = np.rint(np.asarray(weight, dtype=np.float32) / scale) + zero.astype(np.float32)
    return np.clip(q, *qp.bounds).astype(qp.zero_point.dtype)


def dequantize_blocks(q: np.ndarray, qp: BlockQParams) -> np.ndarray:
    """``(q - zero_point) * scale``, as ONNX DequantizeLinear with ``block_size``."""
    scale, zero = qp.expand(q.shape[0])
    return ((q.astype(np.int32) - zero.astype(np.int32)) * scale).astype(np.float32)
