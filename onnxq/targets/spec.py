"""What a deployment target is: frozen data that the passes read, never a name they compare.

A ``Target`` says which integer types and symmetry its runtime runs, which op types have int8
kernels there, where Q/DQ go, how biases are stored, the opset it needs, the CPU features it
assumes and the files it writes. The host CPU plays no part: the same target writes the same
file on every machine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from onnxq.config import QuantMode, QuantType


class BiasForm(str, enum.Enum):
    """How a Conv/Gemm bias is stored: int32 behind a DequantizeLinear with ``scale =
    input_scale * weight_scale`` (ONNX Runtime, QNN fuse only that), or left float (TensorRT,
    OpenVINO fold it themselves)."""

    INT32 = "int32"
    FLOAT = "float"


SCHEME_FIELDS = (
    "activation_type",
    "activation_symmetric",
    "weight_type",
    "per_channel",
    "reduce_range",
    "smooth_alpha",
)
"""The ``QuantConfig`` fields a target chooses when the user leaves them unset (``None``)."""


@dataclass(frozen=True)
class Target:
    """A runtime (and CPU class) a quantized model is written for.

    Attributes:
        name: the ``--target`` value.
        summary: one line for ``--help`` and reports.
        runtime: the runtime that executes the model (``onnxruntime``, ``openvino``, ...).
        activation_type / activation_symmetric: activation integers; symmetric means zero
            point 0.
        weight_type: weight integers (``int8``: symmetric, zero point 0; ``uint8``: affine).
        reduce_range: 7-bit weights, so that ``uint8 x int8`` pair sums fit int16
            (``vpmaddubsw`` on x86 without VNNI): ``255 * 64 * 2 < 2**15``.
        quantized_ops: op types with an int8 kernel in this runtime (the plan's default set).
        per_channel_ops: op types whose weights get one scale per output channel.
        fold_activations: ops (Relu, Clip) the output Q may move past because the runtime
            fuses them into the kernel.
        float_output_ops: op types whose int8 kernel in this runtime may write a float output,
            so they need Q/DQ on their inputs only (ONNX Runtime's QLinearConv needs an output
            Q; OpenVINO's Convolution does not). MatMul and Gemm have one everywhere.
        bias: ``BiasForm`` of Conv/Gemm biases.
        min_opset: default-domain opset the written model needs (raised by ``prepare``).
        wide_qdq_domain: domain of Q/DQ nodes with 16-bit types below opset 21
            (``com.microsoft``, as ONNX Runtime's QNN tooling writes them).
        forbidden_ops: op types the runtime rejects in a QDQ model (e.g. ``QLinear*``).
        residual_add_inputs: an Add with one quantized input needs the other quantized too
            (TensorRT fuses the residual Add into the Conv only then).
        static_shapes: the runtime compiles a static graph: fixed input shapes (set at
            deployment) and no control flow (If/Loop/Scan): QNN.
        modes: quantization modes that make sense for this runtime.
        requires_vnni: the deployment CPU must have VNNI/AMX (x86), or u8s8 sums saturate.
        extra_files: suffixes of files written beside ``OUT.onnx`` (``.ort``).
        fixed: scheme fields a user may not override (the runtime accepts nothing else).
        python_extra: ``pip install "onnxq[EXTRA]"`` that installs the runtime, if optional.
        notes: what a user should know about the target, for reports.
    """

    name: str
    summary: str
    runtime: str
    activation_type: QuantType
    weight_type: QuantType
    quantized_ops: frozenset[str]
    per_channel_ops: frozenset[str]
    activation_symmetric: bool = False
    reduce_range: bool = False
    fold_activations: frozenset[str] = frozenset({"Relu", "Clip"})
    float_output_ops: frozenset[str] = frozenset()
    bias: BiasForm = BiasForm.INT32
    min_opset: int = 13
    wide_qdq_domain: str = "com.microsoft"
    forbidden_ops: frozenset[str] = frozenset()
    residual_add_inputs: bool = False
    static_shapes: bool = False
    modes: frozenset[QuantMode] = frozenset(QuantMode)
    requires_vnni: bool = False
    extra_files: tuple[str, ...] = ()
    fixed: frozenset[str] = frozenset()
    python_extra: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def scheme(self) -> dict[str, Any]:
        """The target's choice for every ``SCHEME_FIELDS`` entry (``per_channel`` True)."""
        return {
            "activation_type": self.activation_type,
            "activation_symmetric": self.activation_symmetric,
            "weight_type": self.weight_type,
            "per_channel": True,
            "reduce_range": self.reduce_range,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable description (for reports and ``metadata_props``)."""
        return {
            "name": self.name,
            "runtime": self.runtime,
            "activation_type": self.activation_type.value,
            "activation_symmetric": self.activation_symmetric,
            "weight_type": self.weight_type.value,
            "weight_bits": 7 if self.reduce_range else self.weight_type.bits,
            "quantized_ops": sorted(self.quantized_ops),
            "per_channel_ops": sorted(self.per_channel_ops),
            "bias": self.bias.value,
            "min_opset": self.min_opset,
            "requires_vnni": self.requires_vnni,
            "extra_files": list(self.extra_files),
        }
