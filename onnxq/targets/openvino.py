"""Ask OpenVINO's CPU plugin what it runs for a model, and how fast (``pip install
"onnxq[openvino]"``; imported only when called).

OpenVINO reads a QDQ ONNX model directly: each Q/DQ pair becomes a FakeQuantize, and its
low-precision transformations (LPT) turn a FakeQuantize in front of a weighted layer into u8/i8
data for an integer kernel. ``runtime_precisions`` compiles the model and reads every layer of
``compiled.get_runtime_model()``: ``layerType`` (``Convolution``, ``FullyConnected``, ...)
and ``runtimePrecision`` (``u8``/``i8`` for an integer kernel, ``f32``/``bf16``/``f16`` for a
float one). A layer *has a weight* when one of its inputs is a constant, possibly through
reorders, transposes or conversions.

``time_models`` measures batch-1 latency of several models in one run, interleaved (round after
round, each model in turn), at a fixed thread count, so that ratios between them are fair on a
shared machine.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import InvalidModelError, OnnxqError, first_line

PathLike = str | os.PathLike[str]

WEIGHTED_LAYERS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul"})
"""Runtime layer types that read a weight (MatMul only when one input is a constant)."""

INTEGER_PRECISIONS = frozenset({"u8", "i8"})
"""``runtimePrecision`` values of an int8 kernel."""

WEIGHT_PATH = frozenset({"Const", "Reorder", "Transpose", "Convert", "Reshape"})
"""Layers through which a constant still counts as a weight (OpenVINO repacks weights)."""


class OpenVINONotInstalledError(OnnxqError):
    """The ``openvino`` package is missing."""


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise OpenVINONotInstalledError(
            'OpenVINO is not installed: pip install "onnxq[openvino]"'
        ) from None
    return openvino


def openvino_version() -> str:
    """The installed OpenVINO's version string."""
    return _openvino().get_version()


@dataclass(frozen=True)
class LayerPrecision:
    """One weighted layer of OpenVINO's runtime model and the precision it runs in."""

    name: str
    layer_type: str
    precision: str

    @property
    def integer(self) -> bool:
        return self.precision in INTEGER_PRECISIONS


@dataclass(frozen=True)
class RuntimeReport:
    """What OpenVINO's CPU plugin runs for the model at ``path``: every layer's type and
    precision counted, and the weighted layers one by one."""

    path: str
    openvino: str
    inference_precision: str
    layers: dict[str, dict[str, int]]
    weighted: tuple[LayerPrecision, ...]

    @property
    def integer_layers(self) -> list[LayerPrecision]:
        return [layer for layer in self.weighted if layer.integer]

    @property
    def float_layers(self) -> list[LayerPrecision]:
        return [layer for layer in self.weighted if not layer.integer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "openvino": self.openvino,
            "inference_precision": self.inference_precision,
            "layers": {k: dict(v) for k, v in self.layers.items()},
            "weighted": [layer.__dict__ for layer in self.weighted],
            "integer": len(self.integer_layers),
            "float": len(self.float_layers),
        }


def compile_model(
    path: PathLike, *, threads: int | None = None, inference_precision: str | None = None
) -> Any:
    """``ov.Core().compile_model(path, "CPU")`` for batch-1 latency (one stream), with
    ``INFERENCE_NUM_THREADS`` and ``INFERENCE_PRECISION_HINT`` when given (``None``: the
    plugin's default, bf16 on CPUs with AMX, else f32)."""
    ov = _openvino()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if inference_precision is not None:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    if not Path(path).is_file():
        raise InvalidModelError(f"{path}: no such file")
    try:
        return ov.Core().compile_model(os.fspath(path), "CPU", config)
    except RuntimeError as exc:
        raise InvalidModelError(f"OpenVINO cannot compile {path}: {_reason(exc)}") from None


def runtime_precisions(path: PathLike, *, inference_precision: str | None = None) -> RuntimeReport:
    """Compile ``path`` for OpenVINO's CPU plugin and read each layer's ``layerType`` and
    ``runtimePrecision`` from the runtime model."""
    ov = _openvino()
    compiled = compile_model(path, inference_precision=inference_precision)
    layers: dict[str, dict[str, int]] = {}
    weighted = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        layer_type, precision = _info(op, "layerType"), _info(op, "runtimePrecision")
        counts = layers.setdefault(layer_type, {})
        counts[precision] = counts.get(precision, 0) + 1
        if layer_type in WEIGHTED_LAYERS and _reads_constant(op):
            weighted.append(LayerPrecision(op.get_friendly_name(), layer_type, precision))
    return RuntimeReport(
        path=str(path),
        openvino=ov.get_version(),
        inference_precision=compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
        layers=layers,
        weighted=tuple(weighted),
    )


def format_runtime(report: RuntimeReport) -> str:
    """A verdict line, then one line per weighted layer type, then the float layers by name."""
    lines = [
        f"{report.path}: as run by OpenVINO {report.openvino} on CPU "
        f"(inference precision {report.inference_precision})",
        f"weighted layers: {len(report.integer_layers)} of {len(report.weighted)} run u8/i8",
    ]
    for layer_type in sorted({layer.layer_type for layer in report.weighted}):
        counts: dict[str, int] = {}
        for layer in report.weighted:
            if layer.layer_type == layer_type:
                counts[layer.precision] = counts.get(layer.precision, 0) + 1
        shown = ", ".join(f"{precision} {n}" for precision, n in sorted(counts.items()))
        lines.append(f"  {layer_type}: {shown}")
    if report.float_layers:
        names = ", ".join(layer.name for layer in report.float_layers)
        lines.append(f"float weighted layers: {names}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency of one model in milliseconds over ``runs`` timed inferences."""

    path: str
    median_ms: float
    mean_ms: float
    runs: int


def time_models(
    paths: Sequence[PathLike],
    feed: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    rounds: int = 10,
    runs_per_round: int = 10,
    inference_precision: str | None = "f32",
) -> list[Latency]:
    """Latency of each model on ``feed`` in OpenVINO, measured in one run: every model is
    compiled with the same thread count and precision hint and warmed up, then each round runs
    every model ``runs_per_round`` times in turn (the order rotates by round)."""
    requests = []
    for path in paths:
        compiled = compile_model(path, threads=threads, inference_precision=inference_precision)
        request = compiled.create_infer_request()
        for _ in range(3):
            request.infer(dict(feed))
        requests.append(request)
    samples: list[list[float]] = [[] for _ in paths]
    for round_index in range(rounds):
        for step in range(len(paths)):
            index = (step + round_index) % len(paths)
            for _ in range(runs_per_round):
                start = time.perf_counter()
                requests[index].infer(dict(feed))
                samples[index].append(time.perf_counter() - start)
    return [
        Latency(
            str(path),
            1e3 * statistics.median(times),
            1e3 * statistics.fmean(times),
            len(times),
        )
        for path, times in zip(paths, samples, strict=True)
    ]


def run_model(path: PathLike, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on ``feed`` in OpenVINO (f32 inference precision)."""
    request = compile_model(path, inference_precision="f32").create_infer_request()
    request.infer(dict(feed))
    return [np.array(tensor.data) for tensor in request.output_tensors]


def _info(op: Any, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def _reads_constant(op: Any) -> bool:
    """Some input of ``op`` comes from a constant, through ``WEIGHT_PATH`` layers only."""
    for port in op.inputs():
        node = port.get_source_output().get_node()
        while _info(node, "layerType") in WEIGHT_PATH:
            if _info(node, "layerType") == "Const":
                return True
            if not node.inputs():
                break
            node = node.inputs()[0].get_source_output().get_node()
    return False


def _reason(exc: BaseException) -> str:
    """OpenVINO's exceptions start with a stack of ``Exception from file:line`` lines."""
    lines = [line for line in str(exc).splitlines() if line and "Exception from" not in line]
    return lines[-1].strip() if lines else first_line(exc)
