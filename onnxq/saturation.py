"""What an x86 CPU without VNNI computes for ``uint8 x int8`` dot products, in numpy.

ONNX Runtime's AVX2 u8s8 kernels multiply with ``vpmaddubsw``: adjacent pairs along the
reduction axis are summed into int16 *with saturation*, ``sat16(a[2k] w[2k] + a[2k+1] w[2k+1])``,
and only then accumulated in int32 (``vpmaddwd``). With ``a <= 255`` a pair can leave int16 only
when its two weights have the same sign and ``|w[2k]| + |w[2k+1]| > 128``: 7-bit weights
(``|w| <= 64``) never saturate, whatever the pairing. VNNI (``vpdpbusd``) sums in int32 and is
exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

INT16 = np.iinfo(np.int16)
_U8_MAX = 255
# Weighted op -> (weight input index, how its integer weight becomes a [K, N] matrix)
_REDUCTION = {
    "Conv": lambda w, node: w.reshape(w.shape[0], -1).T,
    "MatMul": lambda w, node: w.reshape(-1, w.shape[-1]),
    "Gemm": lambda w, node: w.T if _trans_b(node) else w,
}


def pair_saturated_matmul(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``activations [M, K] (uint8) @ weights [K, N] (int8)`` as ``vpmaddubsw`` + ``vpmaddwd``
    compute it: int16-saturated sums of adjacent K pairs, accumulated in int32."""
    a = activations.astype(np.int32)
    w = weights.astype(np.int32)
    if a.shape[1] % 2:  # the kernels pad K with zeros
        a = np.pad(a, ((0, 0), (0, 1)))
        w = np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]
    return np.clip(pairs, INT16.min, INT16.max).sum(axis=1, dtype=np.int64).astype(np.int32)


def exact_matmul(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The same product in int32 (what VNNI, ARM and the reference compute)."""
    return activations.astype(np.int64) @ weights.astype(np.int64)


def risky_pairs(weights: np.ndarray) -> np.ndarray:
    """Per adjacent K pair of ``weights [K, N]``: True where some uint8 activations saturate
    it (same-sign weights with ``|w1| + |w2| > 128``)."""
    w = weights.astype(np.int32)
    if w.shape[0] % 2:
        w = np.pad(w, ((0, 1), (0, 0)))
    high = _U8_MAX * (np.maximum(w[0::2], 0) + np.maximum(w[1::2], 0))
    low = _U8_MAX * (np.minimum(w[0::2], 0) + np.minimum(w[1::2], 0))
    return (high > INT16.max) | (low < INT16.min)


NO_VNNI_NOTE = "this x86 CPU has no VNNI; {name}: {risk}"


@dataclass(frozen=True)
class SaturationRisk:
    """Weighted ops of a QDQ model whose int8 weights can saturate u8s8 pair sums."""

    nodes: tuple[str, ...]
    risky_fraction: float  # of all adjacent weight pairs of u8s8 ops

    def describe(self) -> str:
        return (
            f"{len(self.nodes)} int8 layer(s) with 8-bit weights ({100 * self.risky_fraction:.2f}% "
            "of weight pairs can saturate int16 here): on an x86 CPU without VNNI ONNX Runtime's "
            "u8s8 kernels lose accuracy on them (up to 20+ dB SQNR on CNNs); quantize with "
            "--target ort-cpu (7-bit weights) for such CPUs"
        )


def saturation_risk(model: onnx.ModelProto) -> SaturationRisk | None:
    """Where a u8 x s8 model's weights can saturate on x86 without VNNI (``None``: nowhere).

    A weighted op counts when its weight is an int8 initializer behind a DequantizeLinear and
    its activation comes from a uint8 DequantizeLinear (or the model is dynamic: activations
    are uint8 at run time).
    """
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    dynamic = any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)
    nodes, risky, total = [], 0, 0
    for node in graph.node:
        weights = _int8_weights(node, producer, constants, dynamic)
        if weights is None:
            continue
        pairs = risky_pairs(weights)
        total += pairs.size
        if pairs.any():
            nodes.append(node.name or node.op_type)
            risky += int(pairs.sum())
    return SaturationRisk(tuple(nodes), risky / total) if nodes else None


def _int8_weights(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    constants: dict[str, onnx.TensorProto],
    dynamic: bool,
) -> np.ndarray | None:
    """The [K, N] int8 weight matrix of a u8s8 op, or ``None``."""
    if node.op_type == "MatMulInteger" and len(node.input) > 1:
        weight = constants.get(node.input[1])
        if weight is not None and weight.data_type == onnx.TensorProto.INT8:
            return numpy_helper.to_array(weight).reshape(-1, weight.dims[-1])
        return None
    reshape = _REDUCTION.get(node.op_type)
    if reshape is None or len(node.input) < 2:
        return None
    w_dq, a_dq = producer.get(node.input[1]), producer.get(node.input[0])
    if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in constants:
        return None
    levels = constants[w_dq.input[0]]
    if levels.data_type != onnx.TensorProto.INT8:
        return None
    u8_input = a_dq is not None and a_dq.op_type == "DequantizeLinear" and _is_u8(a_dq, constants)
    if not (u8_input or dynamic):
        return None
    return reshape(numpy_helper.to_array(levels), node)


def _is_u8(dq: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    zero_point = constants.get(dq.input[2]) if len(dq.input) > 2 else None
    return zero_point is None or zero_point.data_type == onnx.TensorProto.UINT8


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)
