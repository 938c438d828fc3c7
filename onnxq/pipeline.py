"""Orchestration only: load -> prepare -> plan -> calibrate -> qparams -> insert Q/DQ -> check.

No math and no graph rules live here; each step is a function of its own module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.calibration.collect import Observer, observe
from onnxq.calibration.hessian import HessianObserver
from onnxq.calibration.observers import HistogramObserver, MinMaxObserver, mse_range
from onnxq.calibration.readers import open_feeds
from onnxq.config import CalibrationMethod, QuantConfig, QuantType, WeightRounding
from onnxq.errors import OnnxqError, UnsupportedModelError
from onnxq.isa import cpu_features
from onnxq.model_io import input_specs, load_model
from onnxq.passes.insert_qdq import insert_qdq
from onnxq.passes.plan import NodeDecision, QuantPlan, plan_quantization
from onnxq.passes.prepare import prepare
from onnxq.passes.quantize_embeddings import quantize_embeddings
from onnxq.passes.weight_rounding import hessian_layout
from onnxq.qparams import QParams, compute_qparams

ModelSource = str | os.PathLike[str] | onnx.ModelProto


class QuantizationError(OnnxqError):
    """onnxq produced a model the ONNX checker rejects (a bug: please report it)."""


@dataclass(frozen=True)
class QuantizationReport:
    """What a run did: per-node decisions, sizes, calibration, and the settings it used."""

    decisions: list[NodeDecision]
    size_before: int
    size_after: int
    samples: int
    reduce_range: bool
    reduce_range_reason: str
    uncalibrated: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> list[NodeDecision]:
        return [d for d in self.decisions if d.quantized]

    @property
    def left_float(self) -> list[NodeDecision]:
        return [d for d in self.decisions if not d.quantized]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size_ratio"] = self.size_after / self.size_before if self.size_before else None
        return out


@dataclass(frozen=True)
class QuantResult:
    model: onnx.ModelProto
    report: QuantizationReport


def quantize(
    model: ModelSource, calibration_data: Any, config: QuantConfig | None = None
) -> onnx.ModelProto:
    """Static int8 QDQ quantization of ``model`` calibrated on ``calibration_data``.

    ``calibration_data`` is any source ``onnxq.calibration.readers.open_feeds`` accepts: an
    ``.npz`` path, a folder, a mapping, an iterable of feed dicts, an ORT-style reader with
    ``get_next()``, or a torch DataLoader.
    """
    return quantize_with_report(model, calibration_data, config).model


def quantize_with_report(
    model: ModelSource,
    calibration_data: Any,
    config: QuantConfig | None = None,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> QuantResult:
    """``quantize`` plus a ``QuantizationReport``; ``on_batch(samples)`` follows calibration."""
    config = config or QuantConfig()
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    _refuse_quantized(proto)
    size_before = proto.ByteSize()
    reduce_range, reduce_reason = resolve_reduce_range(config)

    float_model = prepare(ir.from_proto(proto))
    float_proto = ir.to_proto(float_model)
    plan = plan_quantization(float_model, config)
    feeds = open_feeds(
        calibration_data,
        input_specs(float_proto),
        batch_size=config.batch_size,
        max_samples=config.max_samples,
    )
    samples = 0

    def count(feed: Mapping[str, np.ndarray]) -> None:
        nonlocal samples
        samples = feeds.samples_seen
        if on_batch is not None:
            on_batch(samples)

    observers = range_observers(plan.roots, config)
    hessian_observers = (
        weight_hessian_observers(plan) if config.weight_rounding is WeightRounding.GPTQ else {}
    )
    by_tensor: dict[str, list[Observer]] = {name: [obs] for name, obs in observers.items()}
    for tensor, observer in hessian_observers.values():
        by_tensor.setdefault(tensor, []).append(observer)
    observe(float_proto, by_tensor, feeds, on_batch=count)
    hessians = {name: obs.hessian for name, (_, obs) in hessian_observers.items() if obs.count}
    uncalibrated = sorted(name for name, obs in observers.items() if obs.empty)
    if uncalibrated:
        plan = plan_quantization(float_model, config, skip_tensors=uncalibrated)
    qparams = {root: activation_qparams(observers[root], config) for root in plan.roots}
    quantized = insert_qdq(
        float_model, plan, qparams, config, reduce_range=reduce_range, hessians=hessians
    )
    decisions = list(plan.decisions)
    if config.quantize_embeddings:
        decisions += quantize_embeddings(quantized)
    out = ir.to_proto(quantized)
    _stamp(out, config, reduce_range)
    try:
        onnx.checker.check_model(out, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise QuantizationError(f"the quantized model fails the ONNX checker: {first}") from None
    report = QuantizationReport(
        decisions=decisions,
        size_before=size_before,
        size_after=out.ByteSize(),
        samples=samples,
        reduce_range=reduce_range,
        reduce_range_reason=reduce_reason,
        uncalibrated=uncalibrated,
        config=config.to_dict(),
        cpu=cpu_features().to_dict(),
    )
    return QuantResult(out, report)


def range_observers(roots: list[str], config: QuantConfig) -> dict[str, MinMaxObserver]:
    """One range observer per root tensor: a histogram unless the method is plain min-max."""
    kind = MinMaxObserver if config.method is CalibrationMethod.MINMAX else HistogramObserver
    return {root: kind() for root in roots}


def weight_hessian_observers(plan: QuantPlan) -> dict[str, tuple[str, HessianObserver]]:
    """For each quantized node whose weight GPTQ can round: (input tensor, its observer)."""
    observers = {}
    for node, _ in plan.nodes:
        layout = hessian_layout(node, 1) if len(node.inputs) > 1 else None
        if layout is not None:
            observers[node.name] = (node.inputs[0].name, HessianObserver(layout))
    return observers


def activation_qparams(observer: MinMaxObserver, config: QuantConfig) -> QParams:
    """Range from the configured method, then affine (or symmetric int8) qparams."""
    if config.method is CalibrationMethod.PERCENTILE and isinstance(observer, HistogramObserver):
        rmin, rmax = observer.percentile_range(config.percentile)
    elif config.method is CalibrationMethod.MSE and isinstance(observer, HistogramObserver):
        qmin, qmax = config.activation_type.bounds
        rmin, rmax = mse_range(observer, qmax - qmin + 1)
    else:
        rmin, rmax = observer.min, observer.max
    return compute_qparams(
        rmin, rmax, config.activation_type, symmetric=config.activation_symmetric
    )


def resolve_reduce_range(config: QuantConfig) -> tuple[bool, str]:
    """The config's choice, or: 7-bit weights where u8s8 int8 kernels can saturate."""
    if config.reduce_range is not None:
        return config.reduce_range, "set by the user"
    cpu = cpu_features()
    u8s8 = config.activation_type is QuantType.UINT8 and config.weight_type is QuantType.INT8
    if u8s8 and cpu.u8s8_saturates:
        return True, "auto: x86 CPU without VNNI, u8s8 products could saturate int16"
    if not u8s8:
        return False, "auto: not a u8s8 scheme, no saturation risk"
    return False, "auto: CPU has VNNI (or is not x86), no saturation risk"


def _refuse_quantized(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type in {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "MatMulInteger"}:
            raise UnsupportedModelError(
                f"the model is already quantized (node {node.name or node.op_type!r} is "
                f"{node.op_type}); give onnxq the float model"
            )


def _stamp(model: onnx.ModelProto, config: QuantConfig, reduce_range: bool) -> None:
    """Record provenance in the model's metadata."""
    import json

    from onnxq import __version__

    entries = {
        "onnxq.version": __version__,
        "onnxq.config": json.dumps(config.to_dict(), sort_keys=True),
        "onnxq.reduce_range": str(reduce_range).lower(),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
