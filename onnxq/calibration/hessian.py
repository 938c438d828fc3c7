"""Streaming second moments of the inputs a weight multiplies: ``H = E[x x^T]``.

A Conv's weight row multiplies im2col patches of its input, a MatMul/Gemm weight column the
last-axis vectors of its input. ``HessianObserver`` folds every batch's patches into
``sum(x x^T)`` and a count, so memory is ``K x K`` per group whatever the data size; two
observers merge by adding. ``H`` is what error-compensating rounding (``onnxq.gptq``) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

MAX_COLUMNS = 1 << 13  # patches kept per batch; more are subsampled evenly


@dataclass(frozen=True)
class InputLayout:
    """How a weighted op turns its input into columns ``[groups, K, n]``.

    ``kernel is None``: MatMul/Gemm (vectors along the last axis, or axis 0 for Gemm transA).
    Otherwise a Conv with explicit pads (``[begin..., end...]``), strides, dilations and groups.
    """

    kernel: tuple[int, ...] | None = None
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1
    transposed: bool = False

    def columns(self, x: np.ndarray) -> np.ndarray:
        """``[groups, K, n]`` float32 columns of ``x``."""
        x = np.asarray(x, dtype=np.float32)
        if self.kernel is None:
            cols = x if self.transposed else x.reshape(-1, x.shape[-1]).T
            return _subsample(cols)[None]
        spatial = len(self.kernel)
        padding = [(0, 0), (0, 0)] + [
            (self.pads[i], self.pads[i + spatial]) for i in range(spatial)
        ]
        x = np.pad(x, padding)
        window = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        axes = tuple(range(2, 2 + spatial))
        view = sliding_window_view(x, window, axis=axes)
        index = (slice(None), slice(None))
        index += tuple(slice(None, None, s) for s in self.strides)
        index += tuple(slice(None, None, d) for d in self.dilations)
        view = view[index]  # N, C, out..., k...
        channels = view.shape[1]
        order = (1, *range(2 + spatial, 2 + 2 * spatial), 0, *range(2, 2 + spatial))
        cols = view.transpose(order).reshape(channels * int(np.prod(self.kernel)), -1)
        per_group = cols.shape[0] // self.group
        cols = _subsample(cols)
        return cols.reshape(self.group, per_group, -1)


def conv_layout(
    node: ir.Node, input_shape: tuple[int, ...], weight_shape: tuple[int, ...]
) -> InputLayout | None:
    """The Conv's layout, or ``None`` when its padding cannot be made explicit."""
    spatial = len(weight_shape) - 2
    attrs = node.attributes

    def ints(name: str, default: list[int]) -> tuple[int, ...]:
        return tuple(attrs[name].as_ints()) if name in attrs else tuple(default)

    kernel = ints("kernel_shape", list(weight_shape[2:]))
    strides = ints("strides", [1] * spatial)
    dilations = ints("dilations", [1] * spatial)
    group = attrs["group"].as_int() if "group" in attrs else 1
    auto_pad = attrs["auto_pad"].as_string() if "auto_pad" in attrs else "NOTSET"
    if auto_pad in ("NOTSET", ""):
        pads = ints("pads", [0] * 2 * spatial)
    elif auto_pad == "VALID":
        pads = (0,) * 2 * spatial
    else:
        sizes = input_shape[2:]
        if len(sizes) != spatial or not all(isinstance(s, int) for s in sizes):
            return None
        begin, end = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = (*begin, *end)
    return InputLayout(kernel, strides, pads, dilations, group)


class HessianObserver:
    """``sum(x x^T)`` over every column seen, per group (float32: ``K x K`` per layer)."""

    def __init__(self, layout: InputLayout) -> None:
        self.layout = layout
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        cols = self.layout.columns(values)
        cols = np.where(np.isfinite(cols), cols, 0.0).astype(np.float32)
        outer = np.matmul(cols, cols.transpose(0, 2, 1))
        self.sum = outer if self.sum is None else self.sum + outer
        self.count += cols.shape[2]

    def merge(self, other: HessianObserver) -> None:
        if other.sum is None:
            return
        self.sum = other.sum.copy() if self.sum is None else self.sum + other.sum
        self.count += other.count

    @property
    def hessian(self) -> np.ndarray | None:
        """``E[x x^T]`` per group, ``[groups, K, K]`` (``None`` before any data)."""
        return None if self.sum is None else self.sum.astype(np.float64) / max(self.count, 1)


def _subsample(cols: np.ndarray) -> np.ndarray:
    if cols.shape[1] <= MAX_COLUMNS:
        return cols
    return cols[:, :: -(-cols.shape[1] // MAX_COLUMNS)]
