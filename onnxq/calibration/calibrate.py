"""One calibration run over a prepared float model, or the same statistics read from a file.

``calibrate_plan`` observes the plan's root tensors (and, for GPTQ, the inputs of the weighted
nodes) over the calibration data on an ``onnxq.executor`` engine (this process, worker processes
or Ray) and returns a ``Calibration``. Folder and glob sources go to the workers as file paths
(each reads its own batches) unless ``max_samples`` cuts the stream, which only a reader of every
batch in order can do; other sources are read here and their batches sent.
``collect_hessians`` observes only GPTQ's input Hessians (weight-only mode).
``calibration_from_ranges`` rebuilds a ``Calibration`` from a ranges file after checking it
belongs to this model and holds what the configured method needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calibration.cache import RangesFile, load_ranges, model_fingerprint, save_ranges
from onnxq.calibration.collect import Observer
from onnxq.calibration.hessian import HessianObserver, InputLayout
from onnxq.calibration.observers import MinMaxObserver, MovingAverageMinMaxObserver
from onnxq.calibration.ranges import observer_kind, observers_for, pick_observer
from onnxq.calibration.readers import batch_files, open_feeds
from onnxq.config import CalibrationMethod, QuantConfig, WeightRange, WeightRounding
from onnxq.errors import ConfigError, RangesError
from onnxq.executor import Executor, local_executor
from onnxq.model_io import input_specs, serialize
from onnxq.passes.plan import QuantPlan
from onnxq.passes.weight_rounding import hessian_layout

ALL_METHODS = tuple(CalibrationMethod)


@dataclass(frozen=True)
class Calibration:
    """Observed statistics of a prepared float model.

    ``observers``: per root tensor, the range observers (``ranges.pick_observer`` finds the
    one a method needs). ``hessians``: GPTQ's ``E[x x^T]`` per node name, ``None`` when not
    collected. ``notes``: what the caller should be told (e.g. a rounding fallback).
    """

    fingerprint: str
    observers: dict[str, list[MinMaxObserver]]
    hessians: dict[str, np.ndarray] | None
    samples: int
    batches: int
    source: str = "calibration data"
    notes: tuple[str, ...] = ()

    def observer(self, root: str, method: CalibrationMethod) -> MinMaxObserver:
        found = pick_observer(self.observers[root], method)
        if found is None:
            raise RangesError(f"no {observer_kind(method).kind} statistics for {root!r}")
        return found

    @property
    def uncalibrated(self) -> list[str]:
        """Roots that saw no finite value."""
        return sorted(name for name, group in self.observers.items() if group[0].empty)

    def save(self, path: str | os.PathLike[str], details: dict[str, Any]) -> list[Path]:
        """Write a ranges file (plus its Hessians companion when collected)."""
        return save_ranges(
            path,
            fingerprint=self.fingerprint,
            tensors=self.observers,
            samples=self.samples,
            batches=self.batches,
            hessians=self.hessians,
            details=details,
        )


def weight_hessian_observers(plan: QuantPlan) -> dict[str, tuple[str, HessianObserver]]:
    """For each quantized node whose weight GPTQ can round: (input tensor, its observer)."""
    observers = {}
    for node, _ in plan.nodes:
        layout = hessian_layout(node, 1) if len(node.inputs) > 1 else None
        if layout is not None:
            observers[node.name] = (node.inputs[0].name, HessianObserver(layout))
    return observers


def needs_hessians(config: QuantConfig) -> bool:
    """Whether weights use the inputs' ``E[x x^T]``: GPTQ rounding, or MSE weight ranges
    (which weigh each weight's error by its input's ``E[x**2]``)."""
    return config.weight_rounding is WeightRounding.GPTQ or config.weight_range is WeightRange.MSE


def calibrate_plan(
    float_proto: onnx.ModelProto,
    plan: QuantPlan,
    calibration_data: Any,
    config: QuantConfig,
    *,
    methods: Sequence[CalibrationMethod] | None = None,
    hessians: bool | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Calibration:
    """Observe ``plan.roots`` over the data.

    ``methods``: the range methods the statistics must serve (default: the config's).
    ``hessians``: also collect GPTQ Hessians (default: ``needs_hessians(config)``).
    ``executor``: where the shards run (default: ``local_executor(workers)``).
    ``on_batch(samples)`` follows progress: samples of the batches observed so far.
    """
    methods = (config.method,) if methods is None else tuple(methods)
    if hessians is None:
        hessians = needs_hessians(config)
    observers = {root: observers_for(methods, config.averaging_constant) for root in plan.roots}
    hessian_observers = weight_hessian_observers(plan) if hessians else {}
    by_tensor: dict[str, list[Observer]] = {name: list(group) for name, group in observers.items()}
    for tensor, observer in hessian_observers.values():
        by_tensor.setdefault(tensor, []).append(observer)
    samples, batches = _observe(
        float_proto,
        by_tensor,
        calibration_data,
        config,
        executor or local_executor(workers),
        on_batch,
    )
    return Calibration(
        fingerprint=model_fingerprint(float_proto),
        observers=observers,
        hessians=(
            {name: obs.hessian for name, (_, obs) in hessian_observers.items() if obs.count}
            if hessians
            else None
        ),
        samples=samples,
        batches=batches,
    )


def collect_hessians(
    float_proto: onnx.ModelProto,
    inputs: Mapping[str, str],
    calibration_data: Any,
    config: QuantConfig,
    *,
    workers: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """GPTQ's ``E[x x^T]`` (``[1, K, K]``) of each node's input, for ``inputs`` mapping node
    names to the MatMul-style (last-axis) activation they multiply; and the samples seen. Nodes
    reading one tensor share its observer."""
    by_tensor = {tensor: HessianObserver(InputLayout()) for tensor in set(inputs.values())}
    samples, _ = _observe(
        float_proto,
        {tensor: [obs] for tensor, obs in by_tensor.items()},
        calibration_data,
        config,
        local_executor(workers),
        on_batch,
    )
    per_tensor = {tensor: obs.hessian for tensor, obs in by_tensor.items() if obs.count}
    found = {node: per_tensor[tensor] for node, tensor in inputs.items() if tensor in per_tensor}
    return found, samples  # nodes reading one tensor share one array (and GPTQ one factor)


def _observe(
    float_proto: onnx.ModelProto,
    by_tensor: dict[str, list[Observer]],
    calibration_data: Any,
    config: QuantConfig,
    executor: Executor,
    on_batch: Callable[[int], None] | None,
) -> tuple[int, int]:
    """Fill ``by_tensor``'s observers from the data on ``executor``; samples and batches seen."""
    inputs = input_specs(float_proto)
    files = batch_files(calibration_data, inputs) if config.max_samples is None else None
    batches = (
        files[0]
        if files is not None
        else open_feeds(
            calibration_data,
            inputs,
            batch_size=config.batch_size,
            max_samples=config.max_samples,
        )
    )
    done = [0, 0]  # batches, samples

    def progress(_: int, samples: int) -> None:
        done[0] += 1
        done[1] += samples
        if on_batch is not None:
            on_batch(done[1])

    model = _shippable(float_proto, executor)
    executor.collect(model, by_tensor, batches, inputs, on_batch=progress)
    return done[1], done[0]


def _shippable(model: onnx.ModelProto, executor: Executor) -> onnx.ModelProto | bytes:
    """The model as the executor's workers receive it: serialised, or over protobuf's 2 GB limit
    the message itself, which only this process (one worker) can take."""
    data = serialize(model)
    if data is not None:
        return data
    if executor.workers > 1:
        raise ConfigError(
            f"the model is over protobuf's 2 GB limit and cannot be shipped to "
            f"{executor.workers} workers: calibrate it with one (--workers 1)"
        )
    return model


def calibration_from_ranges(
    ranges: RangesFile | str | os.PathLike[str],
    float_proto: onnx.ModelProto,
    plan: QuantPlan,
    config: QuantConfig,
) -> Calibration:
    """The statistics of a ranges file, checked against this model and configuration.

    GPTQ uses the file's Hessians; without them (``onnxq calibrate --no-hessians``) weights
    round to nearest and ``notes`` says so.
    """
    file = ranges if isinstance(ranges, RangesFile) else load_ranges(ranges)
    file.check_model(model_fingerprint(float_proto))
    missing = [root for root in plan.roots if root not in file.tensors]
    if missing:
        listed = ", ".join(repr(name) for name in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise RangesError(
            f"{file.path}: no statistics for {listed}{more}, which this configuration "
            "quantizes; calibrate with the same --op-types/--exclude-* options"
        )
    method = config.method
    observers = {}
    for root in plan.roots:
        observer = pick_observer(file.tensors[root], method)
        if observer is None:
            kinds = ", ".join(obs.kind for obs in file.tensors[root])
            raise RangesError(
                f"{file.path}: --method {method.value} needs {observer_kind(method).kind} "
                f"statistics, the file has {kinds}; run `onnxq calibrate` without --method"
            )
        if (
            isinstance(observer, MovingAverageMinMaxObserver)
            and method is CalibrationMethod.MOVING_AVERAGE
            and observer.averaging_constant != config.averaging_constant
        ):
            raise RangesError(
                f"{file.path}: moving averages were taken with averaging constant "
                f"{observer.averaging_constant}, not {config.averaging_constant}; pass "
                f"--averaging-constant {observer.averaging_constant} or calibrate again"
            )
        observers[root] = [observer]
    hessians, notes = None, []
    if needs_hessians(config):
        hessians = file.hessians()
        if hessians is None:
            notes.append(
                f"GPTQ fell back to nearest rounding and MSE weight ranges to unweighted "
                f"errors: {file.path.name} has no Hessians (calibrated with --no-hessians)"
            )
    return Calibration(
        fingerprint=file.fingerprint,
        observers=observers,
        hessians=hessians,
        samples=file.samples,
        batches=file.batches,
        source=str(file.path),
        notes=tuple(notes),
    )
