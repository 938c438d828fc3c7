"""Read the qparams of QuantizeLinear / DequantizeLinear nodes in an IR graph.

A Q/DQ node's qparams are its constant scale and zero point (``QDQ``); an absent zero point is
0 of the node's integer type (``uint8``, or the Q's ``output_dtype``). ``qdq_of`` refuses what
onnxq cannot finish with an ``UnsupportedModelError`` naming the node: a scale or zero point
that is not a constant, or an activation Q/DQ whose integer type is not 8-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.errors import UnsupportedModelError
from onnxq.passes.fold_constants import constant_tensor
from onnxq.qparams import QParams

Q_OP = "QuantizeLinear"
DQ_OP = "DequantizeLinear"
QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")

ACTIVATION_OPS = frozenset({"Relu", "Clip"})
"""Ops that only clamp: one between an op and its Q may change no integer the Q writes."""

ACTIVATION_TYPES = frozenset({ir.DataType.UINT8, ir.DataType.INT8})
"""Integer types of the activation Q/DQ onnxq finishes (ONNX Runtime's int8 kernels)."""


@dataclass(frozen=True)
class QDQ:
    """Constant qparams of one Q/DQ node: ``scale`` float32, ``zero_point`` of the node's integer
    type (both scalars, or vectors along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def dtype(self) -> ir.DataType:
        return ir.DataType.from_numpy(self.zero_point.dtype)

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.channel_axis)

    @property
    def channel_axis(self) -> int | None:
        """The axis of per-channel qparams, ``None`` for per-tensor ones."""
        return None if self.per_tensor else self.axis

    def same_as(self, other: QDQ) -> bool:
        """Equal type, scale, zero point and axis (what makes ``DQ -> Q`` an identity)."""
        return (
            self.zero_point.dtype == other.zero_point.dtype
            and self.channel_axis == other.channel_axis
            and np.array_equal(self.scale.reshape(-1), other.scale.reshape(-1))
            and np.array_equal(self.zero_point.reshape(-1), other.zero_point.reshape(-1))
        )

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def float_at(self, level: float) -> np.float32:
        """What a per-tensor DQ writes for integer ``level``: ``(level - zero_point) * scale``."""
        zero_point = np.float32(self.zero_point.reshape(()))
        return (np.float32(level) - zero_point) * self.scale.reshape(())

    def integer_at(self, value: float) -> int:
        """What a per-tensor Q writes for ``value`` (round half to even, saturated)."""
        info = np.iinfo(self.zero_point.dtype)
        zero_point = int(self.zero_point.reshape(()))
        level = np.rint(np.float32(value) / self.scale.reshape(())) + zero_point
        return int(np.clip(level, info.min, info.max))

    def centered(self, levels: np.ndarray) -> np.ndarray:
        """``levels - zero_point`` in int32, the zero point broadcast along ``axis``."""
        zero_point = self.zero_point.astype(np.int32)
        if self.per_tensor:
            zero_point = zero_point.reshape(())
        else:
            shape = [1] * levels.ndim
            shape[self.axis % levels.ndim] = -1
            zero_point = zero_point.reshape(shape)
        return levels.astype(np.int32) - zero_point

    def integer_range(self) -> tuple[float, float]:
        """The real values a per-tensor Q/DQ spans: its type's bounds, dequantized."""
        info = np.iinfo(self.zero_point.dtype)
        return float(self.float_at(info.min)), float(self.float_at(info.max))


def is_q(node: ir.Node) -> bool:
    return node.op_type == Q_OP and node.domain in QDQ_DOMAINS


def is_dq(node: ir.Node) -> bool:
    return node.op_type == DQ_OP and node.domain in QDQ_DOMAINS


def label(node: ir.Node) -> str:
    """The node's name, or ``OpType -> first output`` for an unnamed node."""
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type} -> {output}"


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array of a constant value (initializer or Constant output), else ``None``."""
    if value is None:
        return None
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def qdq_of(node: ir.Node) -> QDQ:
    """The node's constant qparams; ``UnsupportedModelError`` naming it when they are not
    constants."""
    scale = constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if scale is None:
        raise UnsupportedModelError(
            f"node {label(node)!r} ({node.op_type}) has a scale that is not a constant; "
            "onnxq finishes Q/DQ models with constant qparams only"
        )
    zero_input = node.inputs[2] if len(node.inputs) > 2 else None
    zero_point = constant_array(zero_input)
    if zero_input is not None and zero_point is None:
        raise UnsupportedModelError(
            f"node {label(node)!r} ({node.op_type}) has a zero point that is not a constant; "
            "onnxq finishes Q/DQ models with constant qparams only"
        )
    if zero_point is None:
        zero_point = np.zeros(scale.shape, dtype=_default_type(node))
    axis = node.attributes.get_int("axis", 1) if scale.ndim else None
    return QDQ(scale.astype(np.float32), zero_point, axis)


def activation_qdq(node: ir.Node) -> QDQ:
    """``qdq_of`` for a Q/DQ of an activation: also refuses integer types other than 8-bit and
    blocked (``block_size``) qparams."""
    qdq = qdq_of(node)
    if qdq.dtype not in ACTIVATION_TYPES:
        raise UnsupportedModelError(
            f"node {label(node)!r} ({node.op_type}) quantizes an activation to "
            f"{qdq.dtype.name.lower()}; onnxq finishes uint8/int8 Q/DQ models only"
        )
    if node.attributes.get_int("block_size", 0):
        raise UnsupportedModelError(
            f"node {label(node)!r} ({node.op_type}) has blocked qparams (block_size) on an "
            "activation; onnxq finishes per-tensor and per-channel Q/DQ only"
        )
    return qdq


def clip_bounds(clip: ir.Node) -> tuple[float, float] | None:
    """Constant ``(min, max)`` of a Clip (absent: infinite), or ``None`` when not constant."""
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = clip.inputs[index] if len(clip.inputs) > index else None
        if value is None:
            bounds.append(default)
            continue
        array = constant_array(value)
        if array is None or array.size != 1:
            return None
        bounds.append(float(array.reshape(())))
    return bounds[0], bounds[1]


def is_noop_under(node: ir.Node, qdq: QDQ) -> bool:
    """A Relu, or a Clip with constant bounds, that changes no integer a per-tensor Q with
    ``qdq`` writes: ``Q(low) == qmin`` and ``Q(high) == qmax`` (ONNX Runtime removes it at load:
    ReluQuantFusion, ClipQuantFusion)."""
    if node.op_type not in ACTIVATION_OPS or node.domain not in ("", "ai.onnx"):
        return False
    bounds = (0.0, np.inf) if node.op_type == "Relu" else clip_bounds(node)
    if bounds is None or not qdq.per_tensor:
        return False
    info = np.iinfo(qdq.zero_point.dtype)
    return (qdq.integer_at(bounds[0]), qdq.integer_at(bounds[1])) == (info.min, info.max)


def _default_type(node: ir.Node) -> type[np.integer]:
    """The integer type of a Q/DQ without a zero point: the Q's ``output_dtype``, the DQ's
    integer input, else uint8."""
    if node.op_type == Q_OP:
        code = node.attributes.get_int("output_dtype", 0)
        return ir.DataType(code).numpy() if code else np.uint8
    source = node.inputs[0]
    if source is not None and source.dtype is not None and source.dtype.is_integer():
        return source.dtype.numpy()
    return np.uint8
