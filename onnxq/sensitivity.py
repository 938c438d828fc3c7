"""Accuracy-driven mixed precision: which layers int8 hurts most, and the fewest to keep float.

One calibration serves every variant: the prepared (and smoothed) float model is calibrated once
and ``pipeline.build_quantized`` rebuilds the int8 model with some nodes excluded.

* Per-layer sensitivity of every quantized anchor (Conv, Gemm, weight MatMul):
  ``output_sqnr_db``, the SQNR of its output in the all-int8 model against fp32 (where error has
  accumulated), and ``gain``, how much the end metric improves when only that layer is float.
* ``quantize_to_target``: layers sorted by gain; the smallest prefix left float that meets
  ``min_cosine`` (mean cosine of the first output against fp32), ``min_sqnr`` (SQNR of the
  first output against fp32, dB) or ``max_drop`` (top-1 points, against labels or else
  against fp32's predictions), found by bisection.

The per-layer variants are independent tasks on an ``onnxq.executor`` engine: the study (float
model, calibration, eval feeds, fp32 reference, the weights GPTQ already rounded) is shipped once
per worker and each task rebuilds and scores one variant, so every engine ranks alike. The
bisection's probes depend on each other and run here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxq.calibration.calibrate import calibrate_plan
from onnxq.calibration.collect import augment_outputs, graph_session
from onnxq.calibration.readers import open_feeds
from onnxq.config import QuantConfig, QuantMode
from onnxq.errors import ConfigError
from onnxq.evaluate import sqnr_db
from onnxq.executor import Executor, local_executor
from onnxq.ir_io import from_proto
from onnxq.model_io import input_specs, model_bytes, model_proto
from onnxq.passes.plan import NodeDecision, plan_quantization
from onnxq.pipeline import (
    ModelSource,
    QuantizationReport,
    QuantResult,
    build_quantized,
    prepare_float,
    quality_fields,
    refuse_quantized,
    resolve_config,
)
from onnxq.quality import measure_quality
from onnxq.runtime import make_session
from onnxq.targets import get_target

ANCHORS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class LayerSensitivity:
    """One quantized layer: its output SQNR in the int8 model and the metric gain if float."""

    name: str
    op_type: str
    output_sqnr_db: float
    gain: float


@dataclass(frozen=True)
class SensitivityReport:
    """The metric of fp32 and all-int8, and every layer, most sensitive first."""

    metric: str
    fp32: float
    int8: float
    layers: list[LayerSensitivity]


class _Study:
    """A model prepared and calibrated once, rebuilt and scored with any exclusions; called with
    the nodes to leave float it returns the metric of that variant (picklable: a task's state)."""

    def __init__(
        self,
        model: ModelSource,
        calibration_data: Any,
        eval_data: Any,
        config: QuantConfig,
        labels: np.ndarray | None,
        metric: str,
        executor: Executor,
    ) -> None:
        proto = model_proto(model)
        refuse_quantized(proto)
        self.size_before = model_bytes(proto)
        self.config, self.reduce_reason = resolve_config(config, QuantMode.STATIC)
        config = self.config
        float_model, self.float_proto, self.notes = prepare_float(proto, config, calibration_data)
        plan = plan_quantization(float_model, config)
        self.calibration = calibrate_plan(
            self.float_proto, plan, calibration_data, config, executor=executor
        )
        self.threads = executor.threads  # where the study runs, ORT gets the worker's threads
        self.feeds = list(
            open_feeds(eval_data, input_specs(self.float_proto), batch_size=config.batch_size)
        )
        self.reference = self.outputs(self.float_proto)
        self.labels = labels
        self.rounded: dict = {}
        self.metric = metric

    def __call__(self, excluded: Sequence[str]) -> float:
        return self.evaluate(self.build(excluded)[0])

    def build(self, excluded: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[NodeDecision]]:
        patterns = tuple(f"^{re.escape(name)}$" for name in excluded)
        config = self.config.replace(exclude_nodes=self.config.exclude_nodes + patterns)
        float_model = from_proto(self.float_proto)  # each variant rewrites its own copy
        return build_quantized(float_model, self.calibration, config, self.rounded)

    def outputs(self, model: onnx.ModelProto, names: Sequence[str] = ()) -> list[np.ndarray]:
        """Per requested tensor, all eval batches joined. The first graph output runs with ORT's
        optimisations (the int8 kernels a user gets); intermediate tensors run unfused."""
        if names:
            session = graph_session(augment_outputs(model, names), threads=self.threads)
        else:
            names = [model.graph.output[0].name]
            session = make_session(model, intra_op_threads=self.threads)
        runs = [session.run(names, feed) for feed in self.feeds]
        return [np.concatenate([run[i] for run in runs]) for i in range(len(names))]

    def evaluate(self, model: onnx.ModelProto) -> float:
        output = self.outputs(model)[0]
        return getattr(self, f"_{self.metric}")(output)  # _cosine, _sqnr or _top1

    def _cosine(self, output: np.ndarray) -> float:
        ref = self.reference[0].reshape(len(self.reference[0]), -1).astype(np.float64)
        out = output.reshape(len(output), -1).astype(np.float64)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        return float(np.mean((ref * out).sum(axis=1) / np.maximum(norms, 1e-30)))

    def _sqnr(self, output: np.ndarray) -> float:
        return sqnr_db(self.reference[0], output)

    def _top1(self, output: np.ndarray) -> float:
        target = self.labels if self.labels is not None else self.reference[0].argmax(-1)
        return float(100.0 * np.mean(output.argmax(-1) == np.asarray(target).reshape(-1)))


def analyze_sensitivity(
    model: ModelSource,
    calibration_data: Any,
    eval_data: Any,
    config: QuantConfig | None = None,
    *,
    metric: str = "cosine",
    labels: np.ndarray | None = None,
    workers: int = 1,
    executor: Executor | None = None,
) -> SensitivityReport:
    """Rank the quantized layers of ``model`` by how much int8 costs each (module docstring).

    ``executor``: where calibration and the variants run (default: ``local_executor(workers)``).
    """
    running = executor or local_executor(workers)
    study = _study(model, calibration_data, eval_data, config, labels, metric, running)
    return _sensitivity(study, running)


def quantize_to_target(
    model: ModelSource,
    calibration_data: Any,
    eval_data: Any,
    config: QuantConfig | None = None,
    *,
    min_cosine: float | None = None,
    max_drop: float | None = None,
    min_sqnr: float | None = None,
    labels: np.ndarray | None = None,
    workers: int = 1,
    executor: Executor | None = None,
) -> QuantResult:
    """Static int8 leaving the fewest layers float that meets the target (module docstring).

    ``executor``: where calibration and the per-layer variants run (default:
    ``local_executor(workers)``).
    """
    targets = {"cosine": min_cosine, "sqnr": min_sqnr, "top1": max_drop}
    given = [(metric, value) for metric, value in targets.items() if value is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one target: min_cosine, min_sqnr or max_drop")
    ((metric, value),) = given
    running = executor or local_executor(workers)
    study = _study(model, calibration_data, eval_data, config, labels, metric, running)
    report = _sensitivity(study, running)
    fp32 = report.fp32
    goal = fp32 - value if metric == "top1" else value
    ranked = [layer.name for layer in report.layers]
    low, high = 0, len(ranked)  # the answer lies in [low, high]
    if study(ranked) < goal:
        raise ConfigError(
            f"the target {metric} >= {goal:.4f} is not met even with every layer float "
            f"(all-int8 gives {report.int8:.4f}); relax the target"
        )
    if report.int8 >= goal:
        high = 0
    while low < high:
        middle = (low + high) // 2
        if study(ranked[:middle]) >= goal:
            high = middle
        else:
            low = middle + 1
    model_proto, decisions = study.build(ranked[:high])
    reached = study.evaluate(model_proto)
    gains = {layer.name: layer.gain for layer in report.layers}
    decisions = [
        NodeDecision(
            d.name,
            d.op_type,
            False,
            f"left float to meet {metric} >= {goal:.4f} (int8 cost {gains[d.name]:+.4f})",
        )
        if d.name in ranked[:high]
        else d
        for d in decisions
    ]
    outcome = (
        f"target {metric} >= {goal:.4f}: reached {reached:.4f} with {high} of {len(ranked)} "
        f"layers float (fp32 {fp32:.4f}, all-int8 {report.int8:.4f})"
    )
    notes = [*study.notes, outcome]
    return QuantResult(model_proto, _report(study, model_proto, decisions, notes))


def _study(model, calibration_data, eval_data, config, labels, metric, executor) -> _Study:
    if metric not in ("cosine", "sqnr", "top1"):
        raise ConfigError(f"metric must be cosine, sqnr or top1, got {metric!r}")
    return _Study(
        model, calibration_data, eval_data, config or QuantConfig(), labels, metric, executor
    )


def _sensitivity(study: _Study, executor: Executor) -> SensitivityReport:
    int8, decisions = study.build()
    anchors = [d for d in decisions if d.quantized and d.op_type in ANCHORS]
    names = [_output_of(study.float_proto, d.name) for d in anchors]
    reference = study.outputs(study.float_proto, names)
    quantized = study.outputs(int8, names)
    all_int8 = study.evaluate(int8)
    scores = executor.map(study, [(decision.name,) for decision in anchors])
    layers = []
    for decision, ref, out, score in zip(anchors, reference, quantized, scores, strict=True):
        noise = float(np.linalg.norm(ref - out))
        sqnr = float("inf") if noise == 0 else float(20 * np.log10(np.linalg.norm(ref) / noise))
        layers.append(LayerSensitivity(decision.name, decision.op_type, sqnr, score - all_int8))
    layers.sort(key=lambda layer: (-layer.gain, layer.output_sqnr_db))
    fp32 = study.evaluate(study.float_proto)
    return SensitivityReport(study.metric, fp32, all_int8, layers)


def _output_of(model: onnx.ModelProto, node_name: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == node_name)


def _report(
    study: _Study, model: onnx.ModelProto, decisions: list[NodeDecision], notes: list[str]
) -> QuantizationReport:
    return QuantizationReport(
        decisions=decisions,
        size_before=study.size_before,
        size_after=model_bytes(model),
        samples=study.calibration.samples,
        reduce_range=study.config.reduce_range,
        reduce_range_reason=study.reduce_reason,
        uncalibrated=study.calibration.uncalibrated,
        config=study.config.to_dict(),
        target=get_target(study.config.target).to_dict(),
        notes=notes,
        **quality_fields(measure_quality(study.float_proto, model, study.feeds, decisions)),
    )
