"""Quantization-aware training with onnxq's own scheme (torch is imported only when used).

``prepare_qat`` gives a trainable fake-quant module whose Q/DQ sit exactly where onnxq's static
pipeline puts them, initialised to its post-training model; ``finetune`` trains it on labels,
``distill`` towards the float model's outputs; ``export_qat`` writes the int8 QDQ ONNX with
the learned qparams.
"""

from __future__ import annotations

from typing import Any

__all__ = ["distill", "export_qat", "finetune", "prepare_qat"]


def prepare_qat(
    model: Any, example_inputs: Any, calibration_data: Any, *args: Any, **kw: Any
) -> Any:
    """See ``onnxq.qat.prepare.prepare_qat``."""
    from onnxq.qat.prepare import prepare_qat as run

    return run(model, example_inputs, calibration_data, *args, **kw)


def finetune(module: Any, loader: Any, loss_fn: Any, epochs: int, lr: float, **kw: Any) -> Any:
    """See ``onnxq.qat.train.finetune``."""
    from onnxq.qat.train import finetune as run

    return run(module, loader, loss_fn, epochs, lr, **kw)


def distill(module: Any, teacher: Any, batches: Any, **kw: Any) -> Any:
    """See ``onnxq.qat.train.distill``."""
    from onnxq.qat.train import distill as run

    return run(module, teacher, batches, **kw)


def export_qat(qat_model: Any, path: Any, *, example_inputs: Any = None) -> Any:
    """See ``onnxq.qat.export.export_qat``."""
    from onnxq.qat.export import export_qat as run

    return run(qat_model, path, example_inputs=example_inputs)
