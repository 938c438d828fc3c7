"""Orchestration only: load -> prepare -> plan -> calibrate -> qparams -> insert Q/DQ -> check.

No math and no graph rules live here; each step is a function of its own module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
import onnx_ir as ir

from onnxq.calibration.cache import RangesFile
from onnxq.calibration.calibrate import (
    ALL_METHODS,
    Calibration,
    calibrate_plan,
    calibration_from_ranges,
)
from onnxq.calibration.observers import MinMaxObserver
from onnxq.calibration.ranges import range_for
from onnxq.calibration.readers import open_feeds
from onnxq.config import CalibrationMethod, QuantConfig, QuantMode
from onnxq.errors import ConfigError, OnnxqError, UnsupportedModelError, first_line
from onnxq.executor import Executor
from onnxq.ir_io import from_proto, to_proto
from onnxq.isa import cpu_features
from onnxq.model_io import CHECKER_ERRORS, input_specs, model_bytes, model_proto, serialize
from onnxq.passes.dynamic_quant import DYNAMIC_OPS, NO_DYNAMIC_KERNEL, quantize_dynamic_graph
from onnxq.passes.half_precision import store_half_weights
from onnxq.passes.infer_shapes import drop_value_info
from onnxq.passes.insert_qdq import insert_qdq
from onnxq.passes.merge_matmuls import merge_matmuls, merged_note
from onnxq.passes.op_rules import QUANTIZABLE_OPS
from onnxq.passes.plan import (
    NodeDecision,
    QuantPlan,
    check_op_types,
    non_tensor_note,
    plan_quantization,
)
from onnxq.passes.prepare import prepare
from onnxq.passes.quantize_embeddings import quantize_embeddings
from onnxq.passes.weight_only import WEIGHT_OPS
from onnxq.qparams import QParams, compute_qparams
from onnxq.quality import OutputQuality, measure_quality
from onnxq.smoothing import smooth_from_data
from onnxq.targets import check_activation_type, check_mode, get_target

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
    target: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=lambda: cpu_features().to_dict())
    ranges_file: str | None = None
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    finished: dict[str, Any] | None = None  # set when finished from a QDQ model (onnxq.finish)

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
    model: ModelSource,
    calibration_data: Any = None,
    config: QuantConfig | None = None,
    *,
    ranges: RangesFile | str | os.PathLike[str] | None = None,
    workers: int = 1,
    executor: Executor | None = None,
) -> onnx.ModelProto:
    """Static int8 QDQ quantization of ``model`` calibrated on ``calibration_data``.

    ``calibration_data`` is any source ``onnxq.calibration.readers.open_feeds`` accepts: an
    ``.npz`` path, a folder, a mapping, an iterable of feed dicts, an ORT-style reader with
    ``get_next()``, or a torch DataLoader. ``ranges``: a ranges file from ``calibrate`` used
    instead (no calibration runs). ``workers``: calibration processes (batch ``i`` goes to
    worker ``i % workers``; the result does not depend on it, except for ``moving_average``).
    ``executor``: the engine calibration runs on instead (``onnxq.executor.open_executor``,
    e.g. Ray), same shard rule.
    """
    return quantize_with_report(
        model, calibration_data, config, ranges=ranges, workers=workers, executor=executor
    ).model


def calibrate(
    model: ModelSource,
    calibration_data: Any,
    config: QuantConfig | None = None,
    *,
    methods: tuple[CalibrationMethod, ...] = ALL_METHODS,
    hessians: bool = True,
    workers: int = 1,
    executor: Executor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Calibration:
    """Observe the tensors ``quantize`` would calibrate, for later use (``Calibration.save``).

    The statistics serve every method in ``methods`` (default: all, so a ranges file can be
    quantized with any method); ``hessians`` adds GPTQ's input Hessians. The plan (hence the
    tensors observed) follows the config's op-type and node filters.
    """
    config, _ = resolve_config(config, QuantMode.STATIC)
    proto = model_proto(model)
    float_model, float_proto, _ = prepare_float(proto, config)
    plan = plan_quantization(float_model, config)
    return calibrate_plan(
        float_proto,
        plan,
        calibration_data,
        config,
        methods=methods,
        hessians=hessians,
        workers=workers,
        executor=executor,
        on_batch=on_batch,
    )


def quantize_with_report(
    model: ModelSource,
    calibration_data: Any = None,
    config: QuantConfig | None = None,
    *,
    ranges: RangesFile | str | os.PathLike[str] | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> QuantResult:
    """``quantize`` plus a ``QuantizationReport``; ``on_batch(samples)`` follows calibration.

    A QDQ model from another tool, given without data or ranges, is finished with its own
    qparams instead (``onnxq.finish.finish_qdq_with_report``): without a config it keeps its
    scheme, with one it is converted to ``config.target``'s where exact.
    """
    proto = model_proto(model)
    if calibration_data is None and ranges is None:
        from onnxq.finish import carries_qdq, finish_qdq_with_report

        if carries_qdq(proto):
            return finish_qdq_with_report(proto, target=config.target if config else None)
    if (calibration_data is None) == (ranges is None):
        raise ConfigError("give calibration data or a ranges file (exactly one of them)")
    config, reduce_reason = resolve_config(config, QuantMode.STATIC)
    refuse_quantized(proto)
    float_model, float_proto, notes = prepare_float(proto, config, calibration_data)
    plan = plan_quantization(float_model, config)
    if ranges is not None:
        calibration = calibration_from_ranges(ranges, float_proto, plan, config)
    else:
        calibration = calibrate_plan(
            float_proto,
            plan,
            calibration_data,
            config,
            workers=workers,
            executor=executor,
            on_batch=on_batch,
        )
    out, decisions = build_quantized(float_model, calibration, config)
    quality = check_quality(float_proto, out, decisions, calibration_data, config)
    report = QuantizationReport(
        decisions=decisions,
        size_before=model_bytes(proto),
        size_after=model_bytes(out),
        samples=calibration.samples,
        reduce_range=config.reduce_range,
        reduce_range_reason=reduce_reason,
        uncalibrated=calibration.uncalibrated,
        config=config.to_dict(),
        target=get_target(config.target).to_dict(),
        ranges_file=None if ranges is None else calibration.source,
        notes=notes + list(calibration.notes),
        **quality_fields(quality),
    )
    return QuantResult(out, report)


def check_quality(
    float_proto: onnx.ModelProto,
    quantized: onnx.ModelProto,
    decisions: list[NodeDecision],
    data: Any,
    config: QuantConfig,
) -> OutputQuality | None:
    """``onnxq.quality.measure_quality`` on the run's own data (``None`` without data, or when
    the data can be read only once)."""
    if data is None:
        return None
    feeds = open_feeds(data, input_specs(float_proto), batch_size=config.batch_size)
    if not feeds.reiterable:
        return None
    return measure_quality(float_proto, quantized, feeds, decisions)


def quality_fields(quality: OutputQuality | None) -> dict[str, Any]:
    """The report's ``quality`` and ``warnings`` from a measured quality."""
    if quality is None:
        return {}
    warning = quality.warning()
    return {"quality": quality.to_dict(), "warnings": [warning] if warning else []}


def build_quantized(
    float_model: ir.Model,
    calibration: Calibration,
    config: QuantConfig,
    rounded: dict | None = None,
) -> tuple[onnx.ModelProto, list[NodeDecision]]:
    """Plan, qparams, Q/DQ insertion, LSTM and embedding weights, check: one quantized model
    from a prepared float model (rewritten in place), its calibration and a resolved config.
    ``rounded`` memoises integer weights across calls, so variants of one model round each
    weight once."""
    plan, _ = calibrated_plan(float_model, calibration, config)
    qparams = {
        root: activation_qparams(calibration.observer(root, config.method), config)
        for root in plan.roots
    }
    quantized = insert_qdq(
        float_model,
        plan,
        qparams,
        config,
        hessians=calibration.hessians or {},
        rounded=rounded,
    )
    decisions = list(plan.decisions)
    target = get_target(config.target)
    if "LSTM" not in config.exclude_op_types and QuantMode.DYNAMIC in target.modes:
        # no static LSTM kernel: int8 weights (DynamicQuantizeLSTM) where the runtime has it
        decisions += quantize_dynamic_graph(quantized, config.replace(op_types=("LSTM",)))
    if config.quantize_embeddings:
        decisions += quantize_embeddings(quantized)
    return finish(quantized, config), decisions


def calibrated_plan(
    float_model: ir.Model, calibration: Calibration, config: QuantConfig
) -> tuple[QuantPlan, frozenset[str]]:
    """The plan restricted to tensors the calibration saw finite values of, and the tensors
    it had to leave float for that (replanning with them skipped gives the same plan)."""
    skip = set(calibration.uncalibrated)
    plan = plan_quantization(float_model, config, skip_tensors=skip)
    while missing := set(plan.roots) - set(calibration.observers):  # not observed: stay float
        skip |= missing
        plan = plan_quantization(float_model, config, skip_tensors=skip)
    return plan, frozenset(skip)


def prepare_float(
    proto: onnx.ModelProto,
    config: QuantConfig,
    calibration_data: Any = None,
    *,
    min_opset: int | None = None,
    merge: bool = True,
) -> tuple[ir.Model, onnx.ModelProto, list[str]]:
    """The clean float graph (``prepare``, then SmoothQuant when the config asks and data is
    given, then with ``merge`` the weight MatMuls of one input merged) as an IR model and as a
    proto, and notes for the report. The opset is raised to the target's ``min_opset``, or to
    ``min_opset`` where that is higher (a mode's need)."""
    opset = max(get_target(config.target).min_opset, min_opset or 0)
    float_model = prepare(from_proto(proto), min_opset=opset)
    float_proto = to_proto(float_model)
    notes = non_tensor_note(float_model)
    changed = False
    if config.smooth and calibration_data is not None:
        changed, smooth_notes = smooth_from_data(float_model, float_proto, calibration_data, config)
        notes += smooth_notes
    if merge and (merged := merge_matmuls(float_model, config)):
        changed = True
        notes.append(merged_note(merged))
    if changed:
        float_proto = to_proto(float_model)
    return float_model, float_proto, notes


def activation_qparams(observer: MinMaxObserver, config: QuantConfig) -> QParams:
    """Range from the configured method (``onnxq.calibration.ranges``), then affine (or
    symmetric int8) qparams."""
    rmin, rmax = range_for(observer, config)
    return compute_qparams(
        rmin, rmax, config.activation_type, symmetric=config.activation_symmetric
    )


MODE_OP_RULES = {
    QuantMode.STATIC: frozenset(QUANTIZABLE_OPS),
    QuantMode.DYNAMIC: DYNAMIC_OPS | NO_DYNAMIC_KERNEL.keys(),
    QuantMode.WEIGHT_ONLY: WEIGHT_OPS,
}
"""Op types each mode has rules for (``op_types`` may name only these)."""


def resolve_config(config: QuantConfig | None, mode: QuantMode) -> tuple[QuantConfig, str]:
    """``config`` (default: ``QuantConfig()``) with its target's scheme filled in and checked
    against ``mode``, and why weights are (or are not) 7-bit. The host CPU plays no part."""
    config = config or QuantConfig()
    target = get_target(config.target)
    check_mode(target, mode)
    if config.weight_type is not None and config.weight_type.bits < 8:
        raise ConfigError(
            f"{config.weight_type.value} weights are written by --mode weight-only only, "
            f"not {mode.value}"
        )
    fixed = check_activation_type(config, mode)
    check_op_types(config, MODE_OP_RULES[mode], mode.value)
    if config.reduce_range is not None:
        reason = "set by the user"
    elif target.reduce_range:
        reason = (
            f"target {target.name}: 7-bit weights keep u8 x s8 pair sums inside int16 on x86 "
            "without VNNI"
        )
    else:
        needs = " (x86 deployment CPUs need VNNI)" if target.requires_vnni else ""
        reason = f"target {target.name}: 8-bit weights{needs}"
    resolved = config.resolved()
    if fixed is not None:  # dynamic: what DynamicQuantizeLinear writes, whatever the target's
        resolved = resolved.replace(activation_type=fixed, activation_symmetric=False)
    return resolved, reason


QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
    }
)


def refuse_quantized(model: onnx.ModelProto) -> None:
    """An already quantized model is refused: onnxq starts from the float model, or finishes a
    QDQ model with its own qparams (static mode without data, ``onnxq.finish``)."""
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            raise UnsupportedModelError(
                f"the model is already quantized (node {node.name or node.op_type!r} is "
                f"{node.op_type}) and carries its own qparams: drop --calib/--ranges (static "
                "mode) and onnxq finishes it with them, or give onnxq the float model"
            )
        if node.op_type in QUANTIZED_OPS:
            raise UnsupportedModelError(
                f"the model is already quantized (node {node.name or node.op_type!r} is "
                f"{node.op_type}); give onnxq the float model"
            )


def finish(
    model: ir.Model, config: QuantConfig, mode: QuantMode = QuantMode.STATIC
) -> onnx.ModelProto:
    """Weights left float back in the model's half type (if it had one), serialise without
    intermediate shapes, record provenance, and check with ``full_check`` (a failure is our
    bug)."""
    store_half_weights(model)
    out = to_proto(model)
    drop_value_info(out)
    stamp_provenance(out, config, mode)
    data = serialize(out)
    if data is None:  # over 2 GB the checker cannot take it: save_model checks its files
        return out
    try:
        onnx.checker.check_model(data, full_check=True)
    except CHECKER_ERRORS as exc:
        raise QuantizationError(
            f"the quantized model fails the ONNX checker: {first_line(exc)}"
        ) from None
    return out


def stamp_provenance(
    model: onnx.ModelProto, config: QuantConfig, mode: QuantMode = QuantMode.STATIC
) -> None:
    """Record provenance in the model's metadata: onnxq's version, the config, the mode, the
    target and the scheme the file was written with."""
    import json

    from onnxq import __version__

    target = get_target(config.target)
    entries = {
        "onnxq.version": __version__,
        "onnxq.config": json.dumps(config.to_dict(), sort_keys=True),
        "onnxq.mode": mode.value,
        "onnxq.target": target.name,
        "onnxq.scheme": json.dumps(scheme_of(config, mode), sort_keys=True),
        "onnxq.reduce_range": str(bool(config.reduce_range)).lower(),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def scheme_of(config: QuantConfig, mode: QuantMode = QuantMode.STATIC) -> dict[str, Any]:
    """The integer scheme a resolved config writes in ``mode``, as plain values."""
    if mode is QuantMode.WEIGHT_ONLY:  # float activations, blocked weights
        return {
            "target": config.target,
            "mode": mode.value,
            "activation_type": "float",
            "weight_type": config.weight_type.value,
            "weight_symmetric": config.weight_type.signed,
            "weight_bits": config.weight_type.bits,
            "block_size": config.block_size,
        }
    return {
        "target": config.target,
        "activation_type": config.activation_type.value,
        "activation_symmetric": bool(config.activation_symmetric),
        "weight_type": config.weight_type.value,
        "weight_bits": 7 if config.reduce_range else config.weight_type.bits,
        "per_channel": bool(config.per_channel),
    }
