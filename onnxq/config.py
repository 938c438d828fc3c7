"""Quantization configuration: frozen, validated, serialisable.

``QuantConfig`` is the one object that says how a model is quantized. It is immutable, checks
itself in ``__post_init__`` (raising ``ConfigError``), and round-trips through ``to_dict`` /
``from_dict`` so a run can be recorded next to the model it produced.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from onnxq.errors import ConfigError

CONFIG_VERSION = 1


class QuantType(str, enum.Enum):
    """Integer type of a quantized tensor (16-bit for QNN activations, 4-bit for weight-only)."""

    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"
    UINT4 = "uint4"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return int(self.value.removeprefix("u").removeprefix("int"))

    @property
    def signed(self) -> bool:
        return not self.value.startswith("u")

    @property
    def bounds(self) -> tuple[int, int]:
        """Full integer range (qmin, qmax)."""
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


ACTIVATION_TYPES = tuple(t for t in QuantType if t.bits >= 8)


class CalibrationMethod(str, enum.Enum):
    """How an activation range is chosen from the observed values."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"
    MOVING_AVERAGE = "moving_average"


class WeightRange(str, enum.Enum):
    """How a weight channel's range is chosen: its min and max, or the clipped range with the
    least squared rounding error, each weight's error weighed by its input's ``E[x**2]`` where
    calibration gives it (``onnxq.calibration.weight_ranges``)."""

    MINMAX = "minmax"
    MSE = "mse"


class WeightRounding(str, enum.Enum):
    """How weights are rounded to integers: to the nearest level, or GPTQ's error-compensating
    rounding that keeps ``W x`` close on the calibration inputs."""

    NEAREST = "nearest"
    GPTQ = "gptq"


class QuantMode(str, enum.Enum):
    """Static: activation ranges from calibration. Dynamic: ranges computed at run time.
    Weight-only: integer weights, float activations."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight-only"


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    Attributes:
        method: activation range method: ``minmax``, ``moving_average`` (EMA of per-batch
            min/max), ``percentile``, ``entropy`` (least KL divergence) or ``mse``
            (see ``onnxq.calibration.ranges``).
        percentile: for ``percentile``, the two-sided coverage in percent: the range is
            ``[P(100 - p), P(p)]`` of the observed values (default 99.999).
        target: the deployment target (``onnxq.targets``): it chooses every scheme field
            left ``None`` below and the op types quantized by default. The host CPU never does.
        per_channel: weights get one scale per output channel where the target allows it.
        activation_type: ``uint8`` (asymmetric), ``int8`` or ``uint16``.
        activation_symmetric: force zero point 0 for activations (signed types only).
        weight_type: ``int8`` (symmetric, zero point 0) or ``uint8`` (asymmetric); weight-only
            mode also ``int4`` (symmetric) and ``uint4`` (asymmetric).
        weight_rounding: ``gptq`` (error-compensating, uses calibration inputs) or ``nearest``.
        reduce_range: 7-bit weights, avoiding u8s8 saturation on x86 without VNNI.
        op_types: op types that may be quantized; empty means the target's ops with an int8
            kernel.
        exclude_op_types: op types always left in float.
        exclude_nodes: regular expressions; a node whose name matches any is left in float.
        batch_size: calibration batch size for sources that are split into batches.
        max_samples: stop calibration after this many samples (``None``: all).
        averaging_constant: for ``moving_average``, the EMA weight ``c`` of each new batch:
            ``m <- m + c * (batch_min - m)`` (PyTorch's default 0.01).
        weight_range: ``minmax`` or ``mse`` (clipping search, input-weighted in static mode)
            weight ranges.
        quantize_outputs: also quantize tensors that are graph outputs. Off by default:
            MatMul/Gemm keep an int8 kernel with a float output, and the model's
            outputs keep full precision.
        quantize_activation_matmuls: static mode quantizes MatMuls of two activations
            (attention scores and context) on their own, not only inside an int8 region.
            Off by default: at short sequences they cost more in Q/DQ than int8 saves.
        merge_matmuls: weight MatMuls reading one input (query/key/value) become one MatMul
            and a Split, where weights are per channel (exact there): one int8 GEMM instead
            of several (``onnxq.passes.merge_matmuls``).
        smooth: SmoothQuant on the inputs of weight MatMuls. Static mode smooths from the
            calibration data; dynamic mode from the calibration data when given, else (token
            models) from random token sequences.
        smooth_alpha: its migration strength (``None``: from the weight precision, see
            ``onnxq.targets.SMOOTH_ALPHA``).
        smooth_fold_only: smooth only the inputs whose factor folds into a producer, so that
            SmoothQuant adds no node; by default the others get a ``Mul``.
        quantize_embeddings: store embedding tables (Gather of a constant matrix) as int8
            with per-row scales.
        block_size: weight-only mode: weights along K that share one scale (a power of two
            >= 16, which ONNX Runtime fuses into ``MatMulNBits``).
    """

    target: str = "ort-cpu"
    method: CalibrationMethod = CalibrationMethod.PERCENTILE
    percentile: float = 99.999
    per_channel: bool | None = None
    activation_type: QuantType | None = None
    activation_symmetric: bool | None = None
    weight_type: QuantType | None = None
    weight_rounding: WeightRounding = WeightRounding.GPTQ
    reduce_range: bool | None = None
    op_types: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    batch_size: int = 8
    max_samples: int | None = None
    averaging_constant: float = 0.01
    weight_range: WeightRange = WeightRange.MINMAX
    quantize_outputs: bool = False
    quantize_activation_matmuls: bool = False
    merge_matmuls: bool = True
    quantize_embeddings: bool = True
    smooth: bool = True
    smooth_alpha: float | None = None
    smooth_fold_only: bool = False
    block_size: int = 32
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        for name, enum_type in (
            ("method", CalibrationMethod),
            ("activation_type", QuantType),
            ("weight_type", QuantType),
            ("weight_rounding", WeightRounding),
            ("weight_range", WeightRange),
        ):
            value = getattr(self, name)
            if value is None and name in ("activation_type", "weight_type"):
                continue  # the target's choice
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                choices = ", ".join(m.value for m in enum_type)
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}") from None
        for name in ("op_types", "exclude_op_types", "exclude_nodes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ConfigError(
                f"averaging_constant must be in (0, 1], got {self.averaging_constant}"
            )
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise ConfigError(f"smooth_alpha must be in (0, 1), got {self.smooth_alpha}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.activation_type is not None and self.activation_type.bits < 8:
            choices = ", ".join(t.value for t in ACTIVATION_TYPES)
            raise ConfigError(
                f"activation_type must be one of {choices}, got {self.activation_type.value} "
                "(4-bit types are for weight-only weights)"
            )
        unsigned = self.activation_type is not None and not self.activation_type.signed
        if self.activation_symmetric and unsigned:
            raise ConfigError("symmetric activations need a signed activation_type (int8)")
        from onnxq.targets import get_target

        get_target(self.target)  # unknown names list the known ones
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"exclude_nodes: invalid regex {pattern!r}: {exc}") from None
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is not supported")

    @property
    def is_resolved(self) -> bool:
        """Every scheme field is set (``resolved`` ran, or the user set them all)."""
        from onnxq.targets.spec import SCHEME_FIELDS

        return all(getattr(self, name) is not None for name in SCHEME_FIELDS)

    def resolved(self) -> QuantConfig:
        """A copy whose scheme fields left ``None`` take the target's values; a value the
        target cannot run is a ``ConfigError`` (``onnxq.targets.resolve_scheme``)."""
        from onnxq.targets import resolve_scheme

        return resolve_scheme(self)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (enums as their values)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, enum.Enum):
                out[key] = value.value
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)
