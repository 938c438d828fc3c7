"""Measure quantized models against their fp32 original on one execution provider.

Accuracy (every quantized model against fp32, on the same feeds, outputs matched by name in the
fp32 model's output order; float outputs only):

* SQNR ``20*log10(||ref|| / ||ref - x||)`` in dB over all float outputs of all samples
  concatenated (``inf`` when equal);
* cosine similarity of the flattened first output, per sample (axis 0 is the batch), mean and min
  (1 when both vectors are zero, 0 when only one is);
* max abs error over all float outputs;
* top-1 = argmax over the classes of the first output, only where it is classifier-shaped
  (``[N, C]`` with ``C > 1``; a saliency map or an embedding has no top-1): agreement with
  fp32's top-1, and accuracy against ``labels`` when given;
* range coverage (``onnxq.coverage``): a note for each quantized model whose activations clip
  more than 0.1% of the data's values, where calibration did not cover it.

Speed and size (every model, fp32 included):

* latency: batch-1 runs (the first sample of the data), p50/p90 in ms. Each model runs its block
  after ``warmup`` untimed runs, in two rounds (the second in reverse model order) so drift
  (clock, other load) hits all alike; never run by run alternately (see ``_block_times``).
  ``max_seconds`` bounds each model's timing (warm-up included; 80% latency, 20% throughput):
  a block stops early once its share is spent, after at least one timed run;
* throughput in samples/s at ``throughput_batch`` (the first samples of the data, repeated when
  there are fewer), ``batch / median run time``;
* file size in bytes (the ``.onnx`` file plus any external data files it references);
* peak memory: a fresh Python process imports onnxruntime and loads the inputs, records its
  resident set, creates the session and runs the latency and throughput feeds twice each; the
  result is its peak resident set in that window minus the baseline (``onnxq.memory``). Host
  memory only (no GPU memory), and ``None`` where ``resource`` is missing (Windows).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calibration.readers import FeedSource, open_feeds
from onnxq.coverage import CoverageCheck
from onnxq.errors import CalibrationDataError, ConfigError, InvalidModelError, first_line
from onnxq.isa import cpu_features
from onnxq.memory import session_peak_memory
from onnxq.model_io import InputSpec, input_specs, json_safe, load_model, model_proto
from onnxq.runtime import (
    ORT_ERRORS,
    Provider,
    check_provider,
    environment,
    make_session,
)
from onnxq.saturation import NO_VNNI_NOTE, saturation_risk
from onnxq.targets import Target, get_target
from onnxq.targets.check import check_model
from onnxq.targets.sessions import TargetRuntime

PathLike = str | os.PathLike[str]
Feed = dict[str, np.ndarray]

CUDA_NOTE = (
    "the CUDA execution provider has no int8 QLinearConv/QLinearMatMul kernels: a QDQ model "
    "runs there as fake-quant float (an accuracy check), usually slower than fp32"
)


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracyMetrics:
    """One model's outputs against fp32 (``None`` where not applicable, e.g. the fp32 row)."""

    samples: int
    top1: float | None = None
    agreement: float | None = None
    sqnr_db: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs_error: float | None = None


@dataclass(frozen=True)
class LatencyStats:
    """Run times of one feed: ``batch`` samples per run, ``runs`` timed runs."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    mean_ms: float

    @classmethod
    def from_seconds(cls, times: Sequence[float], batch: int) -> LatencyStats:
        ms = np.asarray(times, dtype=np.float64) * 1e3
        return cls(
            batch=batch,
            runs=len(ms),
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
        )


@dataclass(frozen=True)
class ModelMeasurement:
    """One row: a model's size, speed, memory and accuracy."""

    name: str
    path: str
    reference: bool
    size_bytes: int
    latency: LatencyStats
    throughput: float
    throughput_batch: int
    peak_memory_bytes: int | None
    accuracy: AccuracyMetrics


@dataclass(frozen=True)
class ComparisonResult:
    """The fp32 row, one row per quantized model, where it ran, how, and caveats."""

    fp32: ModelMeasurement
    quantized: tuple[ModelMeasurement, ...]
    environment: dict[str, Any]
    settings: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rows(self) -> tuple[ModelMeasurement, ...]:
        return (self.fp32, *self.quantized)

    def ratios(self, row: ModelMeasurement) -> dict[str, float | None]:
        """``row`` relative to fp32: size, p50, p90 and throughput (``x / fp32``)."""
        ref = self.fp32
        return {
            "size": _ratio(row.size_bytes, ref.size_bytes),
            "p50": _ratio(row.latency.p50_ms, ref.latency.p50_ms),
            "p90": _ratio(row.latency.p90_ms, ref.latency.p90_ms),
            "throughput": _ratio(row.throughput, ref.throughput),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an infinite SQNR is the string ``"inf"`` (JSON has no infinity)."""

        def row(m: ModelMeasurement) -> dict[str, Any]:
            return {**asdict(m), "ratios": self.ratios(m)}

        return json_safe(
            {
                "fp32": row(self.fp32),
                "quantized": [row(m) for m in self.quantized],
                "environment": self.environment,
                "settings": self.settings,
                "notes": list(self.notes),
            }
        )


# --- pure metrics ------------------------------------------------------------------------------


def sqnr_db(
    reference: np.ndarray | Sequence[np.ndarray], actual: np.ndarray | Sequence[np.ndarray]
) -> float:
    """``20*log10(||ref|| / ||ref - x||)`` over all arrays concatenated; ``inf`` when equal."""
    signal, noise = _energies(reference, actual)
    return _sqnr_from_energies(signal, noise)


def cosine_per_sample(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine of each sample (axis 0) flattened: 1 when both are zero, 0 when only one is."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    dot = np.einsum("ij,ij->i", ref, out)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    both_zero = ~ref.any(axis=1) & ~out.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def top1(output: np.ndarray) -> np.ndarray:
    """Argmax over the last axis."""
    return np.argmax(np.asarray(output), axis=-1)


def load_labels(labels: PathLike | np.ndarray | Sequence[int]) -> np.ndarray:
    """Labels from an array, an ``.npy`` file, or an ``.npz`` with one array (or ``labels``)."""
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if not path.is_file():
            raise CalibrationDataError(f"{path}: labels file does not exist")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    keys = list(data.files)
                    key = next((k for k in ("labels", "label", "y") if k in keys), None)
                    if key is None and len(keys) == 1:
                        key = keys[0]
                    if key is None:
                        raise CalibrationDataError(
                            f"{path}: .npz holds {', '.join(keys) or 'nothing'}; expected one "
                            "array or one named 'labels'"
                        )
                    array = data[key]
            elif path.suffix == ".npy":
                array = np.load(path, allow_pickle=False)
            else:
                raise CalibrationDataError(f"{path}: labels must be an .npy or .npz file")
        except (OSError, ValueError, EOFError) as exc:
            raise CalibrationDataError(f"{path}: cannot read labels: {first_line(exc)}") from None
    else:
        array = np.asarray(labels)
    if array.ndim == 0 or array.size == 0:
        raise CalibrationDataError(f"labels must be a non-empty array, got shape {array.shape}")
    if array.dtype.kind == "f" and array.ndim == 1:
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise CalibrationDataError("labels are floats that are not whole class indices")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iuf":
        raise CalibrationDataError(f"labels must be integers, got dtype {array.dtype}")
    return array


# --- streaming accumulation --------------------------------------------------------------------


class _Accuracy:
    """Running sums for one quantized model against fp32."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.cosines: list[np.ndarray] = []
        self.agree = 0
        self.predictions = 0
        self.correct = 0
        self.labelled = 0

    def update(
        self,
        ref: Sequence[np.ndarray],
        out: Sequence[np.ndarray],
        ref_pred: np.ndarray | None,
        pred: np.ndarray | None,
        labels: np.ndarray | None,
    ) -> None:
        signal, noise = _energies(ref, out)
        self.signal += signal
        self.noise += noise
        for r, x in zip(ref, out, strict=True):
            if r.size:
                diff = np.abs(r.astype(np.float64) - x.astype(np.float64))
                self.max_abs = max(self.max_abs, float(diff.max()))
        if ref:
            self.cosines.append(cosine_per_sample(_per_sample(ref[0]), _per_sample(out[0])))
        if pred is not None and ref_pred is not None:
            self.agree += int((pred == ref_pred).sum())
            self.predictions += int(pred.size)
        if pred is not None and labels is not None:
            self.correct += int((pred == labels).sum())
            self.labelled += int(labels.size)

    def result(self, samples: int) -> AccuracyMetrics:
        cos = np.concatenate(self.cosines) if self.cosines else None
        return AccuracyMetrics(
            samples=samples,
            top1=self.correct / self.labelled if self.labelled else None,
            agreement=self.agree / self.predictions if self.predictions else None,
            sqnr_db=_sqnr_from_energies(self.signal, self.noise) if self.cosines else None,
            cosine_mean=float(cos.mean()) if cos is not None and cos.size else None,
            cosine_min=float(cos.min()) if cos is not None and cos.size else None,
            max_abs_error=self.max_abs if self.cosines else None,
        )


# --- compare -----------------------------------------------------------------------------------


@dataclass
class _Model:
    name: str
    path: Path
    size: int
    outputs: list[str]
    float_outputs: list[str]
    session: Any = None


def compare(
    fp32_path: PathLike,
    quantized_paths: Sequence[PathLike],
    data: FeedSource,
    *,
    labels: PathLike | np.ndarray | None = None,
    provider: Provider | str = Provider.CPU,
    batch_size: int = 32,
    max_samples: int | None = None,
    latency_runs: int = 100,
    warmup: int = 10,
    throughput_batch: int = 32,
    throughput_runs: int | None = None,
    intra_op_threads: int | None = None,
    measure_memory: bool = True,
    max_seconds: float | None = None,
    target: str | Target | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_run: Callable[[str, int, int], None] | None = None,
) -> ComparisonResult:
    """Measure fp32 and each quantized model on ``provider`` (see the module docstring).

    With ``target``, models run in that target's runtime where this machine has it
    (``onnxq.targets.sessions``), and each quantized model is checked against its rules.

    ``data`` is any source ``open_feeds`` accepts, read once. ``throughput_runs`` defaults to
    ``max(3, latency_runs // 10)``. ``on_batch(samples)`` follows the accuracy pass,
    ``on_run(model, done, total)`` the timed runs (runs a time budget skips count as done).
    """
    chosen = check_provider(provider)
    for label, value, least in (
        ("batch_size", batch_size, 1),
        ("latency_runs", latency_runs, 1),
        ("warmup", warmup, 0),
        ("throughput_batch", throughput_batch, 1),
        ("throughput_runs", throughput_runs, 1),
        ("max_samples", max_samples, 1),
    ):
        if value is not None and value < least:
            raise ConfigError(f"{label} must be >= {least}, got {value}")
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"max_seconds must be > 0, got {max_seconds}")
    throughput_runs = throughput_runs or max(3, latency_runs // 10)
    label_array = load_labels(labels) if labels is not None else None

    fp32_proto = load_model(fp32_path)
    specs = input_specs(fp32_proto)
    models = [_describe(fp32_path, fp32_proto)]
    del fp32_proto
    risks: list[tuple[str, str]] = []  # models whose int8 weights saturate without VNNI
    runtime = None if target is None else TargetRuntime(get_target(target), chosen)
    target_notes = [] if runtime is None else [runtime.note()]
    coverage: list[CoverageCheck] = []
    for path in quantized_paths:
        proto = load_model(path)
        _check_same_interface(models[0], specs, path, proto)
        models.append(_describe(path, proto))
        coverage.append(CoverageCheck(proto, threads=intra_op_threads))
        risk = saturation_risk(proto)
        if risk is not None:
            risks.append((models[-1].name, risk.describe()))
        if runtime is not None:
            target_notes.append(_conformance(models[-1].name, proto, runtime.target))
    _unique_names(models)
    run_paths = [
        m.path if runtime is None else runtime.model_path(m.path, reference=i == 0)
        for i, m in enumerate(models)
    ]
    for model, path in zip(models, run_paths, strict=True):
        if runtime is None:
            model.session = make_session(path, chosen, intra_op_threads=intra_op_threads)
        else:
            model.session = runtime.open(path, intra_op_threads)

    feeds = open_feeds(data, specs, batch_size=batch_size, max_samples=max_samples)
    samples, accuracies, first_feeds = _accuracy_pass(
        models, feeds, specs, label_array, throughput_batch, on_batch, coverage
    )
    if label_array is not None and max_samples is None and len(label_array) != samples:
        raise CalibrationDataError(
            f"{len(label_array)} labels for {samples} evaluation samples; give one label per "
            "sample (or --max-samples to evaluate fewer)"
        )

    one, one_batch = _latency_feed(first_feeds, specs)
    many, many_batch = _throughput_feed(first_feeds, specs, throughput_batch)
    notes = target_notes + [
        note
        for model, check in zip(models[1:], coverage, strict=True)
        if (note := check.note(model.name)) is not None
    ]
    if chosen is Provider.CUDA:
        notes.append(CUDA_NOTE)
    elif cpu_features().u8s8_saturates:
        notes += [NO_VNNI_NOTE.format(name=name, risk=risk) for name, risk in risks]
    peaks: list[int | None] = [None] * len(models)
    if measure_memory and runtime is not None and not runtime.measures_memory:
        notes.append(f"peak memory not measured in {runtime.target.runtime}")
    elif measure_memory:
        peaks = session_peak_memory(
            run_paths,
            [m.name for m in models],
            [one, many],
            chosen,
            intra_op_threads,
            notes,
        )
    sessions = [m.session for m in models]
    progress = _Progress([m.name for m in models], latency_runs + throughput_runs, on_run)
    share = (None, None) if max_seconds is None else (0.8 * max_seconds, 0.2 * max_seconds)
    latency = _block_times(sessions, one, latency_runs, warmup, budget=share[0], on_run=progress)
    throughput = _block_times(
        sessions, many, throughput_runs, min(warmup, 2) or 1, budget=share[1], on_run=progress
    )

    rows = [
        ModelMeasurement(
            name=model.name,
            path=str(model.path),
            reference=i == 0,
            size_bytes=model.size,
            latency=LatencyStats.from_seconds(latency[i], one_batch),
            throughput=many_batch / float(np.median(throughput[i])),
            throughput_batch=many_batch,
            peak_memory_bytes=peaks[i],
            accuracy=accuracies[i],
        )
        for i, model in enumerate(models)
    ]
    settings = {
        "data": _describe_source(data),
        "labels": _describe_source(labels) if labels is not None else None,
        "samples": samples,
        "batch_size": batch_size,
        "max_samples": max_samples,
        "latency_runs": latency_runs,
        "warmup": warmup,
        "latency_batch": one_batch,
        "throughput_batch": many_batch,
        "throughput_runs": throughput_runs,
        "max_seconds": max_seconds,
        "optimization_level": "all",
        "timing": "per model: warm-up then a block of timed runs (time.perf_counter around "
        "session.run); two rounds, the second in reverse model order",
        "memory": "peak RSS growth of a fresh process over session creation + runs"
        if measure_memory
        else "not measured",
    }
    env = environment(chosen, intra_op_threads=intra_op_threads)
    engine = None if runtime is None else runtime.engine()
    if engine is not None:
        env["runtime"] = engine
    return ComparisonResult(
        fp32=rows[0],
        quantized=tuple(rows[1:]),
        environment=env,
        settings=settings,
        notes=tuple(notes),
    )


def _conformance(name: str, proto: onnx.ModelProto, target: Target) -> str:
    """One line: whether the model meets ``target``'s rules, and the target it was written for."""
    written = {p.key: p.value for p in proto.metadata_props}.get("onnxq.target")
    origin = f" (written for {written})" if written and written != target.name else ""
    report = check_model(proto, target)
    if report.ok:
        return f"{name}{origin}: meets target {target.name}'s rules"
    first = report.violations[0].describe()
    return (
        f"{name}{origin}: {len(report.violations)} violation(s) of target {target.name}'s "
        f"rules, first {first} (onnxq check lists them)"
    )


def measure_accuracy(
    fp32: PathLike | onnx.ModelProto,
    quantized: PathLike | onnx.ModelProto,
    data: FeedSource,
    *,
    labels: PathLike | np.ndarray | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
) -> tuple[AccuracyMetrics, AccuracyMetrics]:
    """Accuracy only (no timing, no memory) of ``quantized`` against ``fp32`` on CPU: the fp32
    metrics (top-1 against labels) and the quantized model's (module docstring)."""
    label_array = load_labels(labels) if labels is not None else None
    protos = [model_proto(m) for m in (fp32, quantized)]
    specs = input_specs(protos[0])
    _check_same_interface(_outputs_of("fp32", protos[0]), specs, "quantized model", protos[1])
    models = [
        _outputs_of(name, proto) for name, proto in zip(("fp32", "int8"), protos, strict=True)
    ]
    for model, proto in zip(models, protos, strict=True):
        model.session = make_session(proto)
    feeds = open_feeds(data, specs, batch_size=batch_size, max_samples=max_samples)
    _, (reference, metrics), _ = _accuracy_pass(models, feeds, specs, label_array, 0, None)
    return reference, metrics


def model_size(path: PathLike) -> int:
    """Bytes of the ``.onnx`` file plus the external data files its initializers reference."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(os.fspath(path), load_external_data=False)
    locations = set()
    for init in _all_initializers(proto.graph):
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    for location in locations:
        data = path.parent / location
        if data.is_file():
            total += data.stat().st_size
    return total


# --- helpers -----------------------------------------------------------------------------------


def _accuracy_pass(
    models: Sequence[_Model],
    feeds: Iterable[Feed],
    specs: Sequence[InputSpec],
    labels: np.ndarray | None,
    keep: int,
    on_batch: Callable[[int], None] | None,
    coverage: Sequence[CoverageCheck] = (),
) -> tuple[int, list[AccuracyMetrics], list[Feed]]:
    """One pass over the data: (samples, accuracy per model with fp32 first, first feeds);
    each of ``coverage`` sees every batch too.

    The first feeds (at least ``keep`` samples, where the data has them) are kept for timing.
    """
    ref_model = models[0]
    accs = [_Accuracy() for _ in models]
    first_feeds: list[Feed] = []
    samples = 0
    for index, feed in enumerate(feeds):
        n = _samples_in(feed, specs)
        if samples < keep:
            first_feeds.append(feed)
        outputs = [_run(m, feed, index) for m in models]
        for check in coverage:
            check.update(index, feed)
        ref = [outputs[0][k] for k in ref_model.float_outputs]
        ref_pred = _predictions(outputs[0], ref_model)
        chunk = None if labels is None else _label_chunk(labels, samples, n, ref_pred)
        for acc, out in zip(accs, outputs, strict=True):
            acc.update(
                ref,
                [out[k] for k in ref_model.float_outputs],
                ref_pred,
                _predictions(out, ref_model),
                chunk,
            )
        samples += n
        if on_batch is not None:
            on_batch(samples)
    fp32 = accs[0].result(samples)
    reference = AccuracyMetrics(samples=samples, top1=fp32.top1)  # fp32 against itself: n/a
    return samples, [reference, *(acc.result(samples) for acc in accs[1:])], first_feeds


def _describe(path: PathLike, proto: onnx.ModelProto) -> _Model:
    described = _outputs_of(Path(path).stem, proto)
    described.path, described.size = Path(path), model_size(path)
    return described


def _outputs_of(name: str, proto: onnx.ModelProto) -> _Model:
    """A ``_Model`` named ``name`` with ``proto``'s outputs (no path, no size, no session)."""
    float_types = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    }
    outputs = [o.name for o in proto.graph.output]
    floats = [o.name for o in proto.graph.output if o.type.tensor_type.elem_type in float_types]
    return _Model(name, Path(name), 0, outputs, floats)


def _check_same_interface(
    ref: _Model, specs: list[InputSpec], path: PathLike, proto: onnx.ModelProto
) -> None:
    """A quantized model must take the fp32 inputs and give the fp32 outputs (by name)."""
    names = {s.name for s in input_specs(proto)}
    want = {s.name for s in specs}
    if names != want:
        raise InvalidModelError(
            f"{path}: inputs {sorted(names)} differ from the fp32 model's {sorted(want)}"
        )
    outputs = {o.name for o in proto.graph.output}
    missing = [o for o in ref.outputs if o not in outputs]
    if missing:
        raise InvalidModelError(
            f"{path}: lacks output{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} of the fp32 model"
        )


def _unique_names(models: list[_Model]) -> None:
    seen: dict[str, int] = {}
    for model in models:
        count = seen.get(model.name, 0)
        seen[model.name] = count + 1
        if count:
            model.name = f"{model.name}#{count + 1}"


def _run(model: _Model, feed: Feed, index: int) -> dict[str, np.ndarray]:
    try:
        values = model.session.run(None, feed)
    except ORT_ERRORS as exc:
        raise InvalidModelError(
            f"{model.path}: onnxruntime failed on evaluation batch {index}: {first_line(exc)}"
        ) from None
    names = [o.name for o in model.session.get_outputs()]
    return dict(zip(names, values, strict=True))


def classifier_shaped(array: np.ndarray) -> bool:
    """``[N, C]`` with ``C > 1``: the only output shape top-1 and agreement are measured on."""
    return array.ndim == 2 and array.shape[1] > 1


def _predictions(outputs: dict[str, np.ndarray], ref: _Model) -> np.ndarray | None:
    """Top-1 of the fp32 model's first output (``None`` where it is not classifier-shaped)."""
    first = np.asarray(outputs[ref.outputs[0]])
    return top1(first) if classifier_shaped(first) else None


def _label_chunk(
    labels: np.ndarray, start: int, n: int, predictions: np.ndarray | None
) -> np.ndarray:
    chunk = labels[start : start + n]
    if len(chunk) < n:
        raise CalibrationDataError(
            f"only {len(labels)} labels, but the evaluation data has more samples; give one "
            "label per sample"
        )
    if predictions is None:
        raise CalibrationDataError(
            "labels given, but the model's first output is not classifier-shaped [N, C]"
        )
    if chunk.shape != predictions.shape and chunk.ndim == predictions.ndim + 1:
        chunk = np.argmax(chunk, axis=-1)  # one-hot or scores
    if chunk.shape != predictions.shape:
        raise CalibrationDataError(
            f"labels of shape {chunk.shape[1:]} per batch do not match predictions of shape "
            f"{predictions.shape[1:]} (argmax over the last axis of the first output)"
        )
    return chunk


def _per_sample(array: np.ndarray) -> np.ndarray:
    """Axis 0 as samples; a scalar output is one sample."""
    array = np.asarray(array)
    return array.reshape(1, -1) if array.ndim == 0 else array


def _energies(
    reference: np.ndarray | Sequence[np.ndarray], actual: np.ndarray | Sequence[np.ndarray]
) -> tuple[float, float]:
    refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
    outs = [actual] if isinstance(actual, np.ndarray) else list(actual)
    if len(refs) != len(outs):
        raise ValueError(f"{len(refs)} reference arrays but {len(outs)} actual arrays")
    signal = noise = 0.0
    for r, x in zip(refs, outs, strict=True):
        r64 = np.asarray(r, dtype=np.float64)
        x64 = np.asarray(x, dtype=np.float64)
        if r64.shape != x64.shape:
            raise ValueError(f"shape {x64.shape} differs from reference shape {r64.shape}")
        signal += float(np.square(r64).sum())
        noise += float(np.square(r64 - x64).sum())
    return signal, noise


def _sqnr_from_energies(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _batch_axis(spec: InputSpec) -> int | None:
    """Axis to slice/concatenate samples on; ``None`` when it cannot change (fixed or scalar)."""
    if spec.shape == ():
        return None
    return spec.batch_axis


def _samples_in(feed: Feed, specs: Sequence[InputSpec]) -> int:
    for spec in specs:
        axis = spec.batch_axis if spec.batch_axis is not None else (0 if spec.shape else None)
        arr = feed[spec.name]
        if axis is not None and arr.ndim > axis:
            return int(arr.shape[axis])
    return 1


def _fixed_batch(specs: Sequence[InputSpec]) -> bool:
    return any(s.batch_axis is None and s.shape for s in specs)


def _latency_feed(feeds: list[Feed], specs: Sequence[InputSpec]) -> tuple[Feed, int]:
    """The first sample (or the first batch, where the model's batch size is fixed)."""
    return _throughput_feed(feeds, specs, 1)


def _throughput_feed(feeds: list[Feed], specs: Sequence[InputSpec], batch: int) -> tuple[Feed, int]:
    """The first ``batch`` samples, repeated when the data has fewer."""
    if _fixed_batch(specs):
        return feeds[0], _samples_in(feeds[0], specs)
    out: Feed = {}
    for spec in specs:
        axis = _batch_axis(spec)
        if axis is None:
            out[spec.name] = feeds[0][spec.name]
            continue
        joined = np.concatenate([f[spec.name] for f in feeds], axis=axis)
        index = np.arange(batch) % joined.shape[axis]
        out[spec.name] = np.ascontiguousarray(np.take(joined, index, axis=axis))
    return out, batch


class _Progress:
    """Counts timed runs over all models for ``on_run(model, done, total)``."""

    def __init__(
        self, names: Sequence[str], runs: int, on_run: Callable[[str, int, int], None] | None
    ) -> None:
        self.names, self.total, self.done, self.on_run = names, runs * len(names), 0, on_run

    def __call__(self, index: int, count: int) -> None:
        self.done += count
        if self.on_run is not None:
            self.on_run(self.names[index], self.done, self.total)


def _block_times(
    sessions: Sequence[Any],
    feed: Feed,
    runs: int,
    warmup: int,
    *,
    budget: float | None = None,
    on_run: Callable[[int, int], None] = lambda index, runs: None,
) -> list[list[float]]:
    """Per session, seconds per run, measured in blocks: never two sessions back to back.

    ORT's intra-op threads spin for a while after each run, so alternating sessions run by run
    makes them fight for cores (3x slower on a 2-core host). Instead each session runs its block
    after ``warmup`` untimed runs; the runs are split into two rounds, the second in reverse
    order, so slow drift (clocks, other load) hits every model alike. ``budget`` (seconds per
    session, split over the rounds) ends a block early after at least one timed run;
    ``on_run(session index, runs)`` counts runs, skipped ones included.
    """
    times: list[list[float]] = [[] for _ in sessions]
    first = (runs + 1) // 2
    order = list(range(len(sessions)))
    for count, indices in ((first, order), (runs - first, order[::-1])):
        if count == 0:
            continue
        for i in indices:
            session = sessions[i]
            deadline = None if budget is None else time.perf_counter() + budget / 2
            for _ in range(warmup):
                session.run(None, feed)
            for done in range(count):
                if done and deadline is not None and time.perf_counter() > deadline:
                    on_run(i, count - done)
                    break
                start = time.perf_counter()
                session.run(None, feed)
                times[i].append(time.perf_counter() - start)
                on_run(i, 1)
    return times


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    found += _all_initializers(sub)
    return found


def _describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, np.ndarray):
        return f"array {source.shape}"
    return type(source).__name__


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference else None
