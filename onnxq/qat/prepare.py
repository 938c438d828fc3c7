"""``prepare_qat``: a PyTorch model -> onnxq's plan and post-training qparams -> a trainable
fake-quant module.

Steps (each one the static pipeline's own):
1. Export the float model (``onnxq.export.export_torch``, verified in ONNX Runtime) with the
   forward signature's argument names as input names and a dynamic batch axis.
2. ``prepare`` (BatchNorm and constants folded, SmoothQuant), ``plan``, calibration on
   ``calibration_data`` and the static QDQ graph, with the config as given: the model
   ``onnxq.quantize`` writes for the exported ONNX, GPTQ-rounded weights and int8 embedding
   tables included.
3. ``QATModule`` runs that QDQ graph in torch (``onnxq.qat.module``): before training it
   computes exactly that model (its trainable weights sit in the bins of the stored integer
   levels; int8 embedding tables stay fixed).
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx

from onnxq.calibration.calibrate import calibrate_plan
from onnxq.config import QuantConfig, QuantMode
from onnxq.errors import ConfigError
from onnxq.export import export_torch
from onnxq.ir_io import from_proto
from onnxq.passes.plan import plan_quantization
from onnxq.pipeline import build_quantized, calibrated_plan, prepare_float, resolve_config
from onnxq.targets import DEFAULT_TARGET


def prepare_qat(
    model: Any,
    example_inputs: Any,
    calibration_data: Any,
    config: QuantConfig | None = None,
    *,
    target: str = DEFAULT_TARGET,
    learn_scales: bool = True,
) -> Any:
    """A trainable ``QATModule`` of ``model`` with fake quantization where onnxq quantizes.

    Args:
        model: a ``torch.nn.Module`` (its float weights are copied, the module is untouched).
        example_inputs: a tensor or tuple of tensors for ``forward`` (export and its check).
        calibration_data: what ``onnxq.quantize`` accepts, keyed by ``forward``'s argument
            names, or a DataLoader whose batches start with the inputs (labels may follow).
        config: the quantization settings (default ``QuantConfig(target=target)``).
        target: the deployment target when ``config`` does not name another one.
        learn_scales: LSQ: activation and weight scales are trained too (default; on the
            depthwise digits CNN with per-tensor 7-bit weights it recovers 2-3 points more than
            a plain STE); ``False`` keeps onnxq's post-training scales and trains only the
            weights and biases.
    """
    import torch

    from onnxq.qat.module import QATModule

    config = _config(config, target)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = _input_names(model, len(inputs))
    with tempfile.TemporaryDirectory(prefix="onnxq-qat-") as tmp:
        path = Path(tmp) / "float.onnx"
        export_torch(model, tuple(inputs), path, input_names=names)
        proto = onnx.load(path)
    feeds = _leading_inputs(calibration_data, names)
    float_model, float_proto, _ = prepare_float(proto, config, feeds)
    plan = plan_quantization(float_model, config)
    calibration = calibrate_plan(float_proto, plan, feeds, config)
    qdq, _ = build_quantized(from_proto(float_proto), calibration, config)
    final, skip = calibrated_plan(float_model, calibration, config)
    module = QATModule(
        from_proto(qdq), float_model, final, config, skip_tensors=skip, learn_scales=learn_scales
    )
    return module.to(torch.float32)


def _config(config: QuantConfig | None, target: str) -> QuantConfig:
    """The resolved static config (``target`` fills in a config that names no other one)."""
    if config is None:
        config = QuantConfig(target=target)
    elif target != DEFAULT_TARGET and config.target != target:
        if config.target != DEFAULT_TARGET:
            raise ConfigError(f"target {target!r} disagrees with the config's {config.target!r}")
        config = config.replace(target=target)
    resolved, _ = resolve_config(config, QuantMode.STATIC)
    return resolved


def _input_names(model: Any, count: int) -> list[str]:
    """The first ``count`` positional parameter names of ``model.forward``."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        raise ConfigError("prepare_qat needs a torch.nn.Module with a forward method") from None
    positional = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < count:
        raise ConfigError(
            f"forward takes {len(positional)} named positional arguments, the example inputs "
            f"are {count}; QAT names the ONNX inputs after them"
        )
    return positional[:count]


def _leading_inputs(data: Any, names: list[str]) -> Any:
    """A torch DataLoader as feed dicts of its batches' leading items (the inputs; labels and
    anything else after them are dropped); any other source as it is."""
    if isinstance(data, (str, Mapping)) or not _from_torch_loader(data):
        return data

    def batches() -> Iterator[Any]:
        for batch in data:
            items = batch if isinstance(batch, (tuple, list)) else (batch,)
            yield (
                batch
                if isinstance(batch, Mapping)
                else dict(zip(names, items[: len(names)], strict=False))
            )

    return _Reiterable(batches)


class _Reiterable:
    """An iterable that restarts its generator on every pass (calibration may read twice)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Any]:
        return self.make()


def _from_torch_loader(obj: Any) -> bool:
    cls = type(obj)
    return cls.__module__.split(".")[0] == "torch" and hasattr(obj, "__iter__")
