"""Which weights get error-compensating rounding, and how their layout maps to GPTQ's rows
(also for MSE weight ranges, which weigh each weight by the diagonal of the same ``H``).

GPTQ works on a matrix with one row per output channel and one column per input the row
multiplies. Rules:
1. Conv ``W[M, C/g, k...]``: rows ``W.reshape(M, -1)``, group ``g`` owns rows
   ``g*M/g .. (g+1)*M/g`` and the im2col columns of input channels ``g*C/g ..``.
2. Gemm: ``W[N, K]`` with ``transB=1``, else ``W.T``; MatMul's right operand ``B[K, N]``: ``B.T``.
3. Anything else (ConvTranspose, batched MatMul weights, a constant left operand, a weight
   shared by several quantized nodes) keeps round-to-nearest.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from onnxq.calibration.hessian import InputLayout, conv_layout
from onnxq.calibration.weight_ranges import weight_qparams_for
from onnxq.config import QuantConfig, WeightRange, WeightRounding
from onnxq.gptq import gptq_round
from onnxq.qparams import QParams, quantize


def hessian_layout(node: ir.Node, weight_index: int) -> InputLayout | None:
    """How the activation that meets this weight becomes columns, or ``None`` (rule 3)."""
    weight = node.inputs[weight_index]
    activation = node.inputs[0]
    if weight is None or weight.const_value is None or activation is None:
        return None
    if sum(1 for use in weight.uses() if use.node.graph is node.graph) != 1:
        return None
    shape = tuple(weight.const_value.shape)
    if node.op_type == "Conv" and weight_index == 1:
        input_shape = tuple(activation.shape) if activation.shape is not None else ()
        return conv_layout(node, input_shape, shape)
    if node.op_type == "Gemm" and weight_index == 1 and len(shape) == 2:
        trans_a = node.attributes.get("transA")
        return InputLayout(transposed=bool(trans_a is not None and trans_a.as_int()))
    if node.op_type == "MatMul" and weight_index == 1 and len(shape) == 2:
        return InputLayout()
    return None


def round_weight(
    node: ir.Node, weight: np.ndarray, qp: QParams, hessian: np.ndarray | None
) -> np.ndarray:
    """Integers for ``weight``: GPTQ when a Hessian is given (rules 1-2), else nearest."""
    if hessian is None:
        return quantize(weight, qp)
    rows = _as_rows(node, weight)
    row_qp = _row_qparams(qp, rows.shape[0])
    groups = hessian.shape[0]
    per_group = rows.shape[0] // groups
    out = np.empty(rows.shape, dtype=qp.zero_point.dtype)
    for g in range(groups):
        part = slice(g * per_group, (g + 1) * per_group)
        group_qp = replace(row_qp, scale=row_qp.scale[part], zero_point=row_qp.zero_point[part])
        out[part] = gptq_round(rows[part], hessian[g], group_qp)
    return _from_rows(node, out, weight.shape)


def layer_weight_qparams(
    config: QuantConfig, node: ir.Node, weight: np.ndarray, hessian: np.ndarray | None, **kw
) -> QParams:
    """The config's min-max or MSE qparams of ``weight`` (``kw`` as ``weight_qparams``); MSE
    weighs each weight's error by its input's ``E[x**2]`` where ``hessian`` is known."""
    if hessian is not None and config.weight_range is WeightRange.MSE:
        kw["importance"] = input_importance(node, weight, hessian)
    return weight_qparams_for(config.weight_range)(weight, **kw)


def rounding_hessian(config: QuantConfig, hessian: np.ndarray | None) -> np.ndarray | None:
    """``hessian`` where the config rounds with GPTQ, else ``None`` (nearest rounding)."""
    return hessian if config.weight_rounding is WeightRounding.GPTQ else None


def input_importance(node: ir.Node, weight: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """``E[x**2]`` of the input each element of ``weight`` multiplies (``weight``'s shape):
    the diagonal of the group's ``H`` along every row (rules 1-2)."""
    rows = _as_rows(node, weight)
    diagonal = np.diagonal(hessian, axis1=1, axis2=2)  # [groups, K]
    per_row = np.repeat(diagonal, rows.shape[0] // diagonal.shape[0], axis=0)
    return _from_rows(node, per_row.astype(np.float32), weight.shape)


def _transposed(node: ir.Node) -> bool:
    return node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB"))


def _as_rows(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """GPTQ's ``[rows, K]`` view of ``weight`` (rules 1-2)."""
    return weight.T if _transposed(node) else weight.reshape(weight.shape[0], -1)


def _from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``_as_rows``."""
    return rows.T if _transposed(node) else rows.reshape(shape)


def _row_qparams(qp: QParams, rows: int) -> QParams:
    """Per-row scale and zero point (per-tensor ones repeated)."""
    scale = np.broadcast_to(qp.scale.reshape(-1), (rows,)) if qp.scale.size == 1 else qp.scale
    zero = (
        np.broadcast_to(qp.zero_point.reshape(-1), (rows,))
        if qp.zero_point.size == 1
        else (qp.zero_point)
    )
    return replace(qp, scale=np.asarray(scale), zero_point=np.asarray(zero), axis=0)


def _attr(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else 0
