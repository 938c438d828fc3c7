"""The variants of one model: onnxq, ONNX Runtime's quantizers and PyTorch's int8.

Each quantizer takes the job and the calibration feeds (already in memory) and either writes a
quantized ONNX model to ``job.out`` or returns a PyTorch module. It runs inside
``benchmarks.worker`` (a fresh process, so its wall time and peak memory are its own).
A quantizer that does not apply raises ``NotApplicable`` with the reason.

ONNX Runtime settings follow https://onnxruntime.ai/docs/performance/model-optimizations/
quantization.html ("Pre-processing", "Method selection", "Data type selection",
"Transformer-based models", FAQ on accuracy: per-channel, reduce_range) and the
``quantize_static`` docstring for ``extra_options``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.zoo import batches
from onnxq.errors import first_line

Feeds = dict[str, np.ndarray]
CALIB_BATCH = 8


class NotApplicable(Exception):
    """This variant does not apply to this model (or this checkout); the message says why."""


@dataclass(frozen=True)
class Variant:
    """A row of the results table."""

    slug: str
    label: str
    engine: str  # "onnx" (measured by onnxq.evaluate) or "torch" (timed in PyTorch)
    quantizes: bool = True
    target: str | None = None  # measured by ``compare(target=...)``: in that target's runtime


VARIANTS: tuple[Variant, ...] = (
    Variant("onnxq-static", "onnxq static (default config: percentile 99.999)", "onnx"),
    Variant("onnxq-static-minmax", "onnxq static (minmax)", "onnx"),
    Variant("onnxq-static-entropy", "onnxq static (entropy)", "onnx"),
    Variant("onnxq-static-mse", "onnxq static (mse)", "onnx"),
    Variant("onnxq-static-nearest", "onnxq static (nearest rounding)", "onnx"),
    Variant("onnxq-static-vnni", "onnxq static --target ort-x86-vnni (VNNI CPUs only)", "onnx"),
    Variant("onnxq-static-arm64", "onnxq static --target ort-arm64 (run here on x86)", "onnx"),
    Variant(
        "onnxq-static-mobile",
        "onnxq static --target ort-mobile (its .ort file, in ORT)",
        "onnx",
        target="ort-mobile",
    ),
    Variant(
        "onnxq-static-openvino",
        "onnxq static --target openvino (in OpenVINO, f32 hint)",
        "onnx",
        target="openvino",
    ),
    Variant(
        "onnxq-static-tensorrt",
        "onnxq static --target tensorrt (run in ORT CPU)",
        "onnx",
        target="tensorrt",
    ),
    Variant("onnxq-static-qnn", "onnxq static --target qnn (run in ORT CPU)", "onnx", target="qnn"),
    Variant("onnxq-dynamic", "onnxq dynamic (no data)", "onnx"),
    Variant("onnxq-dynamic-smooth", "onnxq dynamic (SmoothQuant from calibration data)", "onnx"),
    Variant("onnxq-dynamic-plain", "onnxq dynamic (no data, no SmoothQuant)", "onnx"),
    Variant("onnxq-dynamic-vnni", "onnxq dynamic --target ort-x86-vnni (no data)", "onnx"),
    Variant("ort-static-defaults", "ORT quantize_static (defaults)", "onnx"),
    Variant("ort-static-best", "ORT quantize_static (best CPU settings)", "onnx"),
    Variant("ort-dynamic", "ORT quantize_dynamic", "onnx"),
    Variant("torch-fp32", "PyTorch eager fp32", "torch", quantizes=False),
    Variant("torch-int8", "PyTorch eager int8", "torch"),
)
BY_SLUG = {v.slug: v for v in VARIANTS}
ORT_PEER = "ort-static-best"


@dataclass
class Job:
    """One quantization to run in a worker process (JSON-serialisable fields only)."""

    model: str
    kind: str
    variant: str
    fp32: str
    calib: str
    eval: str
    out: str
    torch_state: str
    threads: int
    eval_batch: int
    latency_runs: int
    warmup: int
    input_names: list[str] = field(default_factory=list)


@dataclass
class Quantized:
    """What a quantizer made: notes for the table, and the module for PyTorch rows."""

    notes: list[str] = field(default_factory=list)
    module: Any = None


# --- onnxq -------------------------------------------------------------------------------------


def onnxq_static(job: Job, calib: Feeds, **changes: Any) -> Quantized:
    """``onnxq.pipeline.quantize_with_report`` with the default ``QuantConfig`` (+ changes)."""
    from onnxq.config import QuantConfig
    from onnxq.model_io import save_model
    from onnxq.pipeline import quantize_with_report
    from onnxq.targets import get_target
    from onnxq.targets.ort_format import write_extra_files

    config = QuantConfig(batch_size=CALIB_BATCH).replace(**changes)
    result = quantize_with_report(job.fp32, calib, config)
    save_model(result.model, job.out)
    write_extra_files(job.out, get_target(config.target).extra_files)
    report = result.report
    return Quantized(
        [
            f"{len(report.quantized)}/{len(report.decisions)} nodes int8",
            f"target {report.config['target']}",
            f"reduce_range={str(report.reduce_range).lower()}",
        ]
    )


def onnxq_dynamic(job: Job, calib: Feeds, *, from_data: bool = False, **changes: Any) -> Quantized:
    """``onnxq.dynamic.quantize_dynamic_with_report`` with the default ``QuantConfig`` (+
    changes); with ``from_data`` the calibration data feeds SmoothQuant (dynamic mode needs no
    data otherwise; token models are then smoothed from random tokens unless ``smooth=False``)."""
    from onnxq.config import QuantConfig
    from onnxq.dynamic import quantize_dynamic_with_report
    from onnxq.model_io import save_model

    result = quantize_dynamic_with_report(
        job.fp32,
        QuantConfig().replace(**changes),
        calibration_data=calib if from_data else None,
    )
    save_model(result.model, job.out)
    report = result.report
    return Quantized([f"{len(report.quantized)} nodes int8", *report.notes])


# --- ONNX Runtime ------------------------------------------------------------------------------


def _reader(calib: Feeds) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches(calib, CALIB_BATCH))

        def get_next(self) -> Feeds | None:
            return next(self._batches, None)

    return Reader()


def ort_static_defaults(job: Job, calib: Feeds) -> Quantized:
    """``quantize_static`` with every default: QDQ, per-tensor, MinMax, S8S8 (QInt8/QInt8)."""
    from onnxruntime.quantization import quantize_static

    quantize_static(job.fp32, job.out, _reader(calib))
    return Quantized(["QDQ, per-tensor, MinMax, S8S8"])


def ort_static_best(job: Job, calib: Feeds) -> Quantized:
    """``quantize_static`` with ORT's documented CPU recommendations.

    Pre-processing (symbolic shape inference + optimization) first ("Pre-processing");
    QDQ, per-channel weights, U8S8 (activations QUInt8, weights QInt8), ``reduce_range`` only
    on x86 without VNNI ("Data type selection": VPMADDUBSW saturation); for transformers only
    the weight MatMuls (``op_types_to_quantize=['MatMul']`` and ``MatMulConstBOnly``,
    "Transformer-based models"). Not ``CalibMaxIntermediateOutputs``: in ORT 1.32 it drops
    the collected ranges instead of merging them ("No data is collected").
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxq.isa import cpu_features

    reduce_range = cpu_features().u8s8_saturates
    pre = Path(job.out).with_suffix(".pre.onnx")
    notes = ["pre-processed, QDQ, per-channel, U8S8", f"reduce_range={str(reduce_range).lower()}"]
    try:
        quant_pre_process(job.fp32, str(pre))
    except Exception as exc:  # ORT's symbolic shape inference gives up on some graphs
        notes.append(f"symbolic shape inference skipped ({first_line(exc)})")
        quant_pre_process(job.fp32, str(pre), skip_symbolic_shape=True)
    extra: dict[str, Any] = {}
    op_types = None
    if job.kind == "transformer":
        op_types = ["MatMul"]
        extra["MatMulConstBOnly"] = True
    try:
        quantize_static(
            str(pre),
            job.out,
            _reader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
            extra_options=extra,
        )
    finally:
        pre.unlink(missing_ok=True)
    if op_types:
        notes.append("weight MatMuls only")
    return Quantized(notes)


def ort_dynamic(job: Job, calib: Feeds) -> Quantized:
    """``quantize_dynamic`` QInt8 per-channel (``reduce_range`` on x86 without VNNI)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxq.isa import cpu_features

    reduce_range = cpu_features().u8s8_saturates
    quantize_dynamic(
        job.fp32, job.out, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8
    )
    notes = ["QInt8 weights, per-channel"]
    if job.kind == "cnn":
        notes.append("Conv -> ConvInteger (ORT recommends static for CNNs)")
    return Quantized(notes)


# --- PyTorch -----------------------------------------------------------------------------------


def torch_fp32(job: Job, calib: Feeds, module: Any) -> Quantized:
    """The float module itself: the PyTorch baseline (nothing to quantize)."""
    return Quantized(["no quantization"], module)


def torch_int8(job: Job, calib: Feeds, module: Any) -> Quantized:
    """FX graph-mode static int8 (x86 backend) for CNNs; dynamic int8 for LSTM/Linear models."""
    import torch
    from torch import nn

    torch.backends.quantized.engine = "x86"
    if job.kind == "cnn":
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        example = tuple(torch.from_numpy(calib[n][:1]) for n in job.input_names)
        prepared = prepare_fx(copy.deepcopy(module), get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for feed in batches(calib, CALIB_BATCH):
                prepared(*(torch.from_numpy(feed[n]) for n in job.input_names))
        return Quantized(["FX static, x86 qconfig (per-channel weights)"], convert_fx(prepared))
    types = {nn.LSTM, nn.Linear} if job.kind == "rnn" else {nn.Linear}
    quantized = torch.ao.quantization.quantize_dynamic(module, types, dtype=torch.qint8)
    names = "+".join(sorted(t.__name__ for t in types))
    return Quantized([f"dynamic int8 ({names})"], quantized)


ONNX_QUANTIZERS: dict[str, Callable[..., Quantized]] = {
    "onnxq-static": onnxq_static,
    "onnxq-static-minmax": lambda job, calib: onnxq_static(job, calib, method="minmax"),
    "onnxq-static-entropy": lambda job, calib: onnxq_static(job, calib, method="entropy"),
    "onnxq-static-mse": lambda job, calib: onnxq_static(job, calib, method="mse"),
    "onnxq-static-nearest": lambda job, calib: onnxq_static(job, calib, weight_rounding="nearest"),
    "onnxq-dynamic": onnxq_dynamic,
    "onnxq-static-vnni": lambda job, calib: onnxq_static(job, calib, target="ort-x86-vnni"),
    "onnxq-static-arm64": lambda job, calib: onnxq_static(job, calib, target="ort-arm64"),
    "onnxq-static-mobile": lambda job, calib: onnxq_static(job, calib, target="ort-mobile"),
    "onnxq-static-openvino": lambda job, calib: onnxq_static(job, calib, target="openvino"),
    "onnxq-static-tensorrt": lambda job, calib: onnxq_static(job, calib, target="tensorrt"),
    "onnxq-static-qnn": lambda job, calib: onnxq_static(job, calib, target="qnn"),
    "onnxq-dynamic-smooth": lambda job, calib: onnxq_dynamic(job, calib, from_data=True),
    "onnxq-dynamic-plain": lambda job, calib: onnxq_dynamic(job, calib, smooth=False),
    "onnxq-dynamic-vnni": lambda job, calib: onnxq_dynamic(job, calib, target="ort-x86-vnni"),
    "ort-static-defaults": ort_static_defaults,
    "ort-static-best": ort_static_best,
    "ort-dynamic": ort_dynamic,
}
TORCH_QUANTIZERS: dict[str, Callable[..., Quantized]] = {
    "torch-fp32": torch_fp32,
    "torch-int8": torch_int8,
}
