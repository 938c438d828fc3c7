"""ONNX Runtime sessions on a named execution provider, and a record of where they ran.

Rules:

1. A provider that this onnxruntime build lacks is a ``ProviderError``, never a silent CPU
   fallback. After creating a CUDA session the session's first provider must be
   ``CUDAExecutionProvider`` (ORT quietly falls back to CPU when the CUDA libraries fail to load).
2. A CUDA session still lists ``CPUExecutionProvider`` second: ORT places the few nodes CUDA has
   no kernel for on the CPU (that is per-node placement, not a session-level fallback).
3. Session-creation and run failures inside ORT become ``InvalidModelError`` with one line;
   a run that fails on the caller's data (``run_float_outputs``), ``CalibrationDataError``.
"""

from __future__ import annotations

import enum
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxq.errors import CalibrationDataError, InvalidModelError, ProviderError, first_line
from onnxq.isa import cpu_features, cpuinfo_value
from onnxq.model_io import runnable_path, serialize

PathLike = str | os.PathLike[str]

# Exceptions ORT's C++ layer raises (they all derive from ``Exception`` directly).
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(_ort_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoSuchFile",
        "NoModel",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
        "ModelLoaded",
        "EngineError",
    )
    if isinstance(getattr(_ort_state, name, None), type)
)


class Provider(str, enum.Enum):
    """An ONNX Runtime execution provider onnxq can run on."""

    CPU = "cpu"
    CUDA = "cuda"

    @property
    def ort_name(self) -> str:
        """ORT's name for it, e.g. ``CUDAExecutionProvider``."""
        return {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[self.value]


class OptimizationLevel(str, enum.Enum):
    """ORT graph optimization levels (``extended`` holds the QDQ -> int8 kernel fusions)."""

    DISABLED = "disabled"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"

    @property
    def ort_level(self) -> ort.GraphOptimizationLevel:
        return {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.value]


def available_providers() -> list[Provider]:
    """The onnxq providers this onnxruntime build offers (CPU is always there)."""
    names = set(ort.get_available_providers())
    return [p for p in Provider if p.ort_name in names]


def check_provider(provider: Provider | str) -> Provider:
    """Parse ``provider`` and raise ``ProviderError`` when this onnxruntime build lacks it."""
    try:
        chosen = Provider(provider)
    except ValueError:
        known = ", ".join(p.value for p in Provider)
        raise ProviderError(
            f"unknown execution provider {provider!r}; expected one of: {known}"
        ) from None
    have = ort.get_available_providers()
    if chosen.ort_name not in have:
        raise ProviderError(_missing_message(chosen, have))
    return chosen


def make_session(
    model: PathLike | bytes | onnx.ModelProto,
    provider: Provider | str = Provider.CPU,
    *,
    optimization_level: OptimizationLevel | str = OptimizationLevel.ALL,
    optimized_model_path: PathLike | None = None,
    intra_op_threads: int | None = None,
    exact_int8: bool = False,
) -> ort.InferenceSession:
    """An ``InferenceSession`` on ``provider`` (see the module rules; no silent fallback) for a
    path, a serialised model or a ``ModelProto`` (one over 2 GB through a temporary file with
    external data).

    ``optimized_model_path`` makes ORT write the graph it will run (after its optimizations).
    ``intra_op_threads`` ``None`` keeps ORT's default (one thread per physical core).
    ``exact_int8`` (``session.x64quantprecision``): exact u8 x s8 sums on x86 without VNNI too,
    where ORT's default kernels saturate 8-bit weight pairs; for checks of a model, not a CPU.
    """
    chosen = check_provider(provider)
    level = OptimizationLevel(optimization_level)
    if intra_op_threads is not None and intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = level.ort_level
    options.log_severity_level = 3  # errors only: the checks below say what went wrong
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if exact_int8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    providers = [chosen.ort_name]
    if chosen is not Provider.CPU:
        providers.append(Provider.CPU.ort_name)
    source = serialize(model) if isinstance(model, onnx.ModelProto) else model
    if source is None:  # over 2 GB
        with runnable_path(model) as path:
            session = _open(os.fspath(path), "model", options, providers)
    elif isinstance(source, bytes):
        session = _open(source, "model", options, providers)
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidModelError(f"{path}: no such file")
        session = _open(os.fspath(path), str(path), options, providers)
    active = session.get_providers()
    if not active or active[0] != chosen.ort_name:
        raise ProviderError(
            f"onnxruntime created the session on {', '.join(active) or 'nothing'} instead of "
            f"{chosen.ort_name} (are the CUDA and cuDNN libraries installed and matching this "
            "onnxruntime-gpu build?); refusing to measure on the wrong device"
        )
    return session


def _open(
    source: str | bytes, label: str, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """``ort.InferenceSession`` with its failure as one line (rule 3)."""
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except ORT_ERRORS as exc:
        raise InvalidModelError(
            f"{label}: onnxruntime cannot load the model on {providers[0]}: {first_line(exc)}"
        ) from None


def run_float_outputs(
    session: ort.InferenceSession, feed: dict[str, Any], names: list[str] | None = None
) -> list[np.ndarray]:
    """The float tensor outputs of one run (sequences, maps and other types left out); an ORT
    failure on this feed is a one-line ``CalibrationDataError``."""
    try:
        outputs = session.run(names, feed)
    except Exception as exc:  # ORT raises several unrelated exception types
        raise CalibrationDataError(f"ONNX Runtime fails on the data: {first_line(exc)}") from None
    return [o for o in outputs if isinstance(o, np.ndarray) and o.dtype.kind == "f"]


def environment(
    provider: Provider | str = Provider.CPU, *, intra_op_threads: int | None = None
) -> dict[str, Any]:
    """Where a measurement ran: provider, onnxruntime, CPU features and model, threads, Python."""
    chosen = Provider(provider)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    env: dict[str, Any] = {
        "provider": chosen.value,
        "ort_provider": chosen.ort_name,
        "onnxruntime": ort.__version__,
        "onnxruntime_build": _build_kind(),
        "available_providers": list(ort.get_available_providers()),
        "cpu_model": cpu_model_name(),
        "cpu_features": cpu_features().to_dict(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "intra_op_threads": intra_op_threads if intra_op_threads is not None else "ort default",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if chosen is Provider.CUDA:
        env["gpu"] = gpu_name()
    return env


@cache
def cpu_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` model name, else ``platform.processor()``)."""
    name = cpuinfo_value("model name", "Model", "Hardware")
    return name or platform.processor() or platform.machine() or "unknown"


@cache
def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi``, or ``None`` when it cannot be asked."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return names[0] if done.returncode == 0 and names else None


def _build_kind() -> str:
    """``onnxruntime`` or ``onnxruntime-gpu`` etc., from the installed distribution's name."""
    from importlib import metadata

    for dist in ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return f"onnxruntime {ort.__version__}"


def _missing_message(provider: Provider, have: list[str]) -> str:
    hint = {
        Provider.CUDA: "install the onnxruntime-gpu build on a machine with an NVIDIA GPU",
        Provider.CPU: "reinstall onnxruntime",
    }[provider]
    return (
        f"{provider.value.upper()} execution provider is not available "
        f"({_build_kind()} has: {', '.join(have) or 'none'}); {hint}"
    )
