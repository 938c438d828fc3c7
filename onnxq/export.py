"""PyTorch -> ONNX export, verified against PyTorch with ONNX Runtime before it is saved.

This is the only module of onnxq that imports torch, and only inside functions:
``import onnxq.export`` works without torch installed.

``export_torch`` puts the module in eval mode, exports it with the TorchScript exporter
(``torch.onnx.export(dynamo=False)``) or the ``torch.export``-based one (``dynamo=True``), runs the
result in ONNX Runtime on the example inputs and compares with PyTorch. Every symbolic axis is
proven by one more check: a dynamic batch on the example inputs concatenated with themselves
along axis 0, each extra named axis (``dynamic_axes``, e.g. a sequence) on the example inputs cut
to half their length along it. Only a model that reproduces PyTorch within
``atol + rtol * |torch|`` is written, atomically.

``load_factory`` turns ``"package.module:factory"`` into the factory's result. A factory takes no
arguments and returns either a ``torch.nn.Module`` or ``(module, example_inputs)``.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from onnxq.errors import ConfigError, ExportError, first_line, message_lines
from onnxq.model_io import CHECKER_ERRORS, check_output_path, save_model

PathLike = str | os.PathLike[str]
Exporter = Literal["torchscript", "dynamo"]

EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
BATCH_DIM = "batch"
# The dynamo exporter has no translations below opset 18; the onnx version converter then fails
# on common graphs (ReduceMean with an ``axes`` input), so a lower request is refused up front.
DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET: dict[str, int] = {"torchscript": 17, "dynamo": 18}

_TORCH_MISSING = "torch is not installed: pip install 'onnxq[torch]'"
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True)
class ExportResult:
    """What ``export_torch`` wrote and how closely ONNX Runtime reproduced PyTorch.

    ``max_abs_error`` is the worst ``|ort - torch|`` over every output element of every check
    (example batch and, with a dynamic batch, the doubled batch); ``tolerance`` is
    ``(rtol, atol)``; ``opset`` is the default-domain opset of the written model.
    """

    path: Path
    max_abs_error: float
    tolerance: tuple[float, float]
    opset: int


def export_torch(
    module: Any,
    example_inputs: Any,
    path: PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    exporter: Exporter = "torchscript",
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``module`` to ONNX at ``path``, verified with ONNX Runtime (CPU) against PyTorch.

    Args:
        module: a ``torch.nn.Module``; exported in eval mode, its training flags are restored.
        example_inputs: a tensor or a tuple of tensors (the positional arguments of ``forward``).
        path: the ``.onnx`` file to write; nothing is written unless verification passes.
        input_names: graph input names (default ``input``, ``input_1``, ...).
        output_names: graph output names (default ``output``, ``output_1``, ...).
        dynamic_batch: make axis 0 of every input and output the symbolic dim ``batch``, and
            prove it by also checking the doubled batch.
        dynamic_axes: more symbolic input axes, ``{input name: {axis: dim name}}`` (axis >= 1;
            inputs sharing a dim name share the dim); each name is proven by also checking the
            inputs cut to half their length along it.
        opset: default-domain opset; ``None`` picks 17 (torchscript) or 18 (dynamo, its minimum).
        exporter: ``"torchscript"`` or ``"dynamo"``.
        rtol, atol: an element fails when ``|ort - torch| > atol + rtol * |torch|``.

    Raises:
        ConfigError: invalid options or example inputs.
        OutputPathError: the output folder is missing or not writable.
        ExportError: torch is missing, the exporter fails, or ONNX Runtime disagrees with torch.
    """
    torch = _require_torch()
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    _check_opset(opset, exporter)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(module).__name__}")
    out = check_output_path(path)
    inputs = _as_input_tuple(torch, example_inputs)
    in_names = _names(input_names, len(inputs), "input")
    extra_axes = _extra_axes(dynamic_axes, in_names, inputs)
    if dynamic_batch:
        for name, tensor in zip(in_names, inputs, strict=True):
            if tensor.dim() == 0:
                raise ConfigError(
                    f"input {name!r} is a scalar and has no batch axis; use dynamic_batch=False"
                )

    flags = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        expected = _run_torch(torch, module, inputs)
        out_names = _names(output_names, len(expected), "output")
        doubled_inputs = doubled_expected = None
        if dynamic_batch:
            doubled_inputs = tuple(torch.cat([t, t], dim=0) for t in inputs)
            doubled_expected = _run_torch(
                torch, module, doubled_inputs, "the doubled example batch (dynamic batch check)"
            )
        halved = {
            dim: _halved(torch, inputs, in_names, extra_axes, dim)
            for dim in sorted({d for axes in extra_axes.values() for d in axes.values()})
        }
        halved_expected = {
            dim: _run_torch(torch, module, cut, f"the inputs with {dim!r} halved")
            for dim, cut in halved.items()
        }
        batch_outputs = [n for n, e in zip(out_names, expected, strict=True) if e.ndim > 0]
        with tempfile.TemporaryDirectory(prefix="onnxq-export-") as tmp:
            proto = _export(
                torch,
                module,
                inputs,
                Path(tmp),
                exporter=exporter,
                opset=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_batch=dynamic_batch,
                extra_axes=extra_axes,
                batch_outputs=batch_outputs,
            )
    finally:
        for sub, flag in flags.items():
            sub.training = flag

    try:
        onnx.checker.check_model(proto)
    except CHECKER_ERRORS as exc:
        reason = first_line(exc)
        raise ExportError(f"the exported model fails the ONNX checker: {reason}") from None
    if dynamic_batch:
        _check_batch_axis(proto, in_names)
    _check_extra_axes(proto, extra_axes)
    checks = [(inputs, expected, "")]
    if doubled_inputs is not None:
        checks.append((doubled_inputs, doubled_expected, " (dynamic batch check)"))
    checks += [(halved[d], halved_expected[d], f" ({d!r} halved)") for d in halved]
    worst = _verify(proto, in_names, out_names, checks, rtol=rtol, atol=atol)
    save_model(proto, out)
    return ExportResult(out, worst, (float(rtol), float(atol)), _default_opset(proto))


def load_factory(spec: str) -> object:
    """Import ``"package.module:factory"``, call ``factory()`` and return its result.

    A factory takes no arguments and returns either a ``torch.nn.Module`` or a tuple
    ``(module, example_inputs)``. The current directory is searched too, so a local
    ``mymodel.py`` works as ``mymodel:build``. Every failure is a one-line ``ConfigError``.
    """
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ConfigError(
            f"bad factory spec {spec!r}: expected 'package.module:factory', e.g. "
            "'models.resnet:resnet18_factory'"
        )
    module_name, attr_path = spec.split(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError(
                f"factory {spec!r}: cannot import module {module_name!r}: "
                f"{type(exc).__name__}: {first_line(exc)}"
            ) from None
        for part in attr_path.split("."):
            if not hasattr(target, part):
                raise ConfigError(
                    f"factory {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
                )
            target = getattr(target, part)
        if not callable(target):
            raise ConfigError(
                f"factory {spec!r}: {attr_path!r} is a {type(target).__name__}, not callable"
            )
        try:
            result = target()
        except Exception as exc:
            raise ConfigError(
                f"factory {spec!r} raised {type(exc).__name__}: {first_line(exc)}"
            ) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    torch = _require_torch()
    candidate = result[0] if isinstance(result, tuple) and len(result) == 2 else result
    if not isinstance(candidate, torch.nn.Module):
        raise ConfigError(
            f"factory {spec!r} returned {type(result).__name__}; expected a torch.nn.Module "
            "or (module, example_inputs)"
        )
    return result


def compare_outputs(
    actual: np.ndarray, expected: np.ndarray, *, rtol: float, atol: float
) -> tuple[float, bool]:
    """Worst ``|actual - expected|`` and whether every element is within ``atol + rtol*|expected|``.

    NaN in the same places on both sides is a match; a shape mismatch is never within tolerance.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        return math.inf, False
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if np.any(nan_a != nan_e):
        return math.inf, False
    finite = np.isfinite(e)
    if np.any(~finite & ~nan_e & (a != e)):  # an infinity not reproduced exactly
        return math.inf, False
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(a - e), 0.0)
    bound = atol + rtol * np.where(finite, np.abs(e), 0.0)
    worst = float(diff.max()) if diff.size else 0.0
    return worst, bool(np.all(diff <= bound))


def _require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ExportError(_TORCH_MISSING) from None
    return torch


def _check_opset(opset: int, exporter: str) -> None:
    latest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not 7 <= opset <= latest:
        raise ConfigError(f"opset must be an integer from 7 to {latest}, got {opset!r}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ConfigError(
            f"the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET} (got {opset}); "
            "raise the opset or use the torchscript exporter"
        )


def _as_input_tuple(torch: Any, example_inputs: Any) -> tuple[Any, ...]:
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise ConfigError("example_inputs must be a tensor or a non-empty tuple of tensors")
    return tuple(t.detach() for t in items)


def _names(names: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if names is None:
        return [stem if i == 0 else f"{stem}_{i}" for i in range(count)]
    names = list(names)
    if len(names) != count:
        raise ConfigError(f"got {len(names)} {stem} names for {count} {stem}s")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{stem} names must be distinct non-empty strings, got {names}")
    return names


def _run_torch(
    torch: Any, module: Any, inputs: tuple[Any, ...], what: str = "the example inputs"
) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            result = module(*inputs)
    except Exception as exc:
        raise ExportError(
            f"the module fails on {what}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    flat: list[Any] = []
    _flatten(torch, result, flat)
    return [t.detach().cpu().numpy() for t in flat]


def _flatten(torch: Any, value: Any, into: list[Any]) -> None:
    if isinstance(value, torch.Tensor):
        into.append(value)
    elif isinstance(value, (tuple, list)) and value:
        for item in value:
            _flatten(torch, item, into)
    else:
        raise ExportError(
            f"the module returns a {type(value).__name__}; expected tensors (or tuples of them)"
        )


def _export(
    torch: Any,
    module: Any,
    inputs: tuple[Any, ...],
    tmp: Path,
    *,
    exporter: str,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    extra_axes: dict[str, dict[int, str]],
    batch_outputs: list[str],
) -> onnx.ModelProto:
    """Run the chosen torch exporter into ``tmp`` and return the loaded model."""
    try:
        with warnings.catch_warnings():
            # We chose the exporter on purpose, and already put the module in eval mode.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message=".*Exporting a model while it is in training")
            if exporter == "torchscript":
                axes: dict[str, dict[int, str]] = {}
                if dynamic_batch:
                    axes = {n: {0: BATCH_DIM} for n in [*input_names, *batch_outputs]}
                for name, extra in extra_axes.items():
                    axes[name] = {**axes.get(name, {}), **extra}
                target = tmp / "model.onnx"
                torch.onnx.export(
                    module,
                    inputs,
                    os.fspath(target),
                    dynamo=False,
                    input_names=input_names,
                    output_names=output_names,
                    opset_version=opset,
                    dynamic_axes=axes or None,
                    do_constant_folding=True,
                )
                return onnx.load(os.fspath(target))
            shapes = None
            if dynamic_batch or extra_axes:
                names = {d for axes in extra_axes.values() for d in axes.values()}
                dims = {name: torch.export.Dim(name) for name in names | {BATCH_DIM}}
                shapes = tuple(
                    {
                        **({0: dims[BATCH_DIM]} if dynamic_batch else {}),
                        **{a: dims[d] for a, d in extra_axes.get(name, {}).items()},
                    }
                    for name in input_names
                )
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                verbose=False,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamic_shapes=shapes,
                artifacts_dir=os.fspath(tmp),
            )
            return program.model_proto
    except Exception as exc:
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {_summary(exc)}") from None


def _verify(
    proto: onnx.ModelProto,
    input_names: list[str],
    output_names: list[str],
    checks: list[tuple[tuple[Any, ...], list[np.ndarray], str]],
    *,
    rtol: float,
    atol: float,
) -> float:
    """Run ORT on each (inputs, expected, label) check; return the worst abs error or raise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        reason = _one_line(exc)
        raise ExportError(f"ONNX Runtime cannot load the exported model: {reason}") from None
    graph_inputs = [i.name for i in session.get_inputs()]
    unknown = [n for n in graph_inputs if n not in input_names]
    if unknown:
        raise ExportError(f"the exported model has unexpected inputs {unknown}")
    graph_outputs = [o.name for o in session.get_outputs()]
    if graph_outputs != output_names:
        raise ExportError(
            f"the exported model has outputs {graph_outputs}, expected {output_names}"
        )
    worst = 0.0
    for inputs, expected, label in checks:
        where = f"at batch {int(inputs[0].shape[0]) if inputs[0].dim() else 1}{label}"
        feeds = {
            n: t.cpu().numpy()
            for n, t in zip(input_names, inputs, strict=True)
            if n in graph_inputs
        }
        try:
            actual = session.run(None, feeds)
        except Exception as exc:
            raise ExportError(
                f"ONNX Runtime fails on the exported model {where}: {_one_line(exc)}"
            ) from None
        for name, got, want in zip(output_names, actual, expected, strict=True):
            if np.shape(got) != np.shape(want):
                raise ExportError(
                    f"output {name!r} {where}: ONNX Runtime shape {list(np.shape(got))}"
                    f" != torch shape {list(np.shape(want))}"
                )
            error, ok = compare_outputs(got, want, rtol=rtol, atol=atol)
            worst = max(worst, error)
            if not ok:
                raise ExportError(
                    f"ONNX Runtime does not reproduce torch: output {name!r} {where} "
                    f"differs by up to {error:.3g} "
                    f"(tolerance atol={atol:g} + rtol={rtol:g}*|torch|)"
                )
    return worst


def _check_batch_axis(proto: onnx.ModelProto, input_names: list[str]) -> None:
    """Every input must keep a symbolic axis 0; a fixed one means the batch size was baked in."""
    for value in proto.graph.input:
        if value.name not in input_names or not value.type.tensor_type.shape.dim:
            continue
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_param"):
            raise ExportError(
                f"the exporter fixed axis 0 of input {value.name!r} to {dim.dim_value}: the module "
                "bakes the batch size in (e.g. int(x.shape[0])); fix it or use dynamic_batch=False"
            )


def _extra_axes(
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    input_names: list[str],
    inputs: tuple[Any, ...],
) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` checked against the inputs: known names, axes >= 1 within the rank."""
    extra: dict[str, dict[int, str]] = {}
    ranks = {name: tensor.dim() for name, tensor in zip(input_names, inputs, strict=True)}
    for name, axes in (dynamic_axes or {}).items():
        if name not in ranks:
            raise ConfigError(f"dynamic_axes names {name!r}, not an input ({', '.join(ranks)})")
        for axis, dim in axes.items():
            if not 1 <= axis < ranks[name] or dim == BATCH_DIM:
                raise ConfigError(
                    f"dynamic_axes[{name!r}]: axis {axis} ({dim!r}) must be in 1..{ranks[name] - 1}"
                    f" and not named {BATCH_DIM!r}"
                )
        extra[name] = dict(axes)
    return extra


def _halved(
    torch: Any,
    inputs: tuple[Any, ...],
    input_names: list[str],
    extra_axes: dict[str, dict[int, str]],
    dim: str,
) -> tuple[Any, ...]:
    """The inputs with every axis named ``dim`` cut to half its length (at least 1)."""
    cut = []
    for name, tensor in zip(input_names, inputs, strict=True):
        for axis, axis_dim in extra_axes.get(name, {}).items():
            if axis_dim == dim:
                tensor = tensor.narrow(axis, 0, max(1, tensor.shape[axis] // 2))
        cut.append(tensor)
    return tuple(cut)


def _check_extra_axes(proto: onnx.ModelProto, extra_axes: dict[str, dict[int, str]]) -> None:
    """Every requested extra axis must be symbolic in the exported inputs."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis in extra_axes.get(value.name, {}):
            if axis < len(dims) and not dims[axis].HasField("dim_param"):
                raise ExportError(
                    f"the exporter fixed axis {axis} of input {value.name!r} to "
                    f"{dims[axis].dim_value}: the module bakes that length in"
                )


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _summary(exc: BaseException) -> str:
    """One line from a torch exporter error: its exception summary, else the innermost cause."""
    lines = message_lines(exc)
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1 :]
        first = after[0] if after else ""
        match = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>: (.*)", first)
        if match:
            return f"{match.group(1)}: {match.group(2)}"
        if first:
            return first
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return f"{type(cause).__name__}: {first_line(cause)}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """All of a message on one line (ONNX Runtime splits its reasons over several)."""
    text = " ".join(message_lines(exc)) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
