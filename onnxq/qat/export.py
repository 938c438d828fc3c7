"""``export_qat``: a trained ``QATModule`` -> the int8 QDQ ONNX that static mode writes.

The learned float weights replace the prepared float model's, and ``insert_qdq`` runs the same
plan with the learned qparams frozen: activation scales per root tensor, weight scales per
(node, input), biases int32 with ``scale = input_scale * weight_scale``; weights round to
nearest (the learned weights already sit in the bins they are to take), embedding tables
become int8 rows as in static mode. The result has the
same Q/DQ placement, integer types and fused int8 kernels as ``onnxq quantize``.

Check (with ``example_inputs``): ONNX Runtime runs the written model twice, without graph
optimisation (Q/DQ as float arithmetic: the fake-quant graph) and with its default one (the
fused int8 kernels); the root mean square of ``ort - module`` over the output elements must
stay within ``tolerance_steps`` (default 1) steps of ``range / 255``, ``range`` being the span
of the module's outputs: the resolution of an 8-bit tensor holding them. The mean, not the
worst element: torch and ONNX Runtime sum in different orders, so a value within float32
rounding of a quantization boundary can land on the other level, and a deep network carries
such flips on. A wrong scale or a misplaced Q/DQ moves most elements by steps and fails.
Measured: digits CNNs 0 unfused (the same float32 arithmetic), under 0.2 steps fused, worst
element included; MiniLM (tensorrt) 0.5-0.65 steps RMS either way, worst element 5-8 steps
(the first flip is one GELU output in layer 1 of 6).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.errors import ConfigError, OnnxqError
from onnxq.ir_io import from_proto
from onnxq.model_io import check_output_path, save_model
from onnxq.passes.insert_qdq import insert_qdq
from onnxq.passes.plan import plan_quantization
from onnxq.passes.quantize_embeddings import quantize_embeddings
from onnxq.pipeline import finish
from onnxq.runtime import OptimizationLevel, make_session

PathLike = str | os.PathLike[str]


class QATExportError(OnnxqError):
    """The exported model does not reproduce the fake-quant module within the tolerance."""


@dataclass(frozen=True)
class ExportCheck:
    """RMS of ``ort - module`` per run (the checked numbers), the bound they had to stay
    under, and the worst element per run."""

    fake_quant_error: float
    fused_error: float
    bound: float
    fake_quant_worst: float
    fused_worst: float


def export_qat(qat_model: Any, path: PathLike, *, example_inputs: Any = None) -> onnx.ModelProto:
    """Write ``qat_model`` (from ``prepare_qat``) as int8 QDQ ONNX at ``path`` and return it.

    With ``example_inputs`` (tensor or tuple) the file is written only if ONNX Runtime
    reproduces the module (see ``check_export``); a ``QATExportError`` says by how much not.
    """
    from onnxq.qat.module import QATModule

    if not isinstance(qat_model, QATModule):
        raise ConfigError(f"export_qat needs a module from prepare_qat, got {type(qat_model)}")
    out = check_output_path(path)
    proto = quantized_model(qat_model)
    if example_inputs is not None:
        check_export(qat_model, proto, example_inputs)
    save_model(proto, out)
    return proto


def quantized_model(qat_model: Any) -> onnx.ModelProto:
    """The int8 QDQ model with the module's learned weights and qparams."""
    import torch

    spec = qat_model.export_spec
    model = from_proto(onnx.load_from_string(spec.float_model))
    initializers = model.graph.initializers
    with torch.no_grad():
        for name, weight in zip(spec.latent_names, qat_model.weights, strict=True):
            array = weight.detach().cpu().numpy().astype(np.float32)
            initializers[name].const_value = ir.tensor(array, name=name)
    plan = plan_quantization(model, spec.config, skip_tensors=spec.skip_tensors)
    learned = qat_model.scales()
    if set(plan.roots) != set(learned):
        raise OnnxqError("the QAT module's quantizers do not match the plan of its float model")
    weights = {
        key: qat_model.weight_quantizers[index].qparams() for key, index in spec.weight_keys.items()
    }
    insert_qdq(model, plan, learned, spec.config, weight_qparams=weights)
    if spec.config.quantize_embeddings:  # fixed tables: the same int8 rows as before training
        quantize_embeddings(model)
    proto = finish(model, spec.config)
    proto.metadata_props.add(key="onnxq.qat", value="true")
    return proto


def check_export(
    qat_model: Any, proto: onnx.ModelProto, example_inputs: Any, tolerance_steps: float = 1.0
) -> ExportCheck:
    """Run ``proto`` in ONNX Runtime unfused and fused against the module; raise
    ``QATExportError`` when the RMS of the difference over all output elements exceeds
    ``tolerance_steps`` steps of ``range / 255`` (the resolution of an 8-bit tensor spanning
    the module's outputs; see the module docstring)."""
    import torch

    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = qat_model.export_spec.input_names
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    was_training = qat_model.training
    qat_model.eval()
    with torch.no_grad():
        expected = qat_model(*inputs)
    qat_model.train(was_training)
    expected = expected if isinstance(expected, tuple) else (expected,)
    expected = [e.detach().cpu().numpy() for e in expected]
    span = max(float(e.max() - e.min()) for e in expected) if expected else 0.0
    bound = tolerance_steps * max(span, 1e-12) / 255.0
    errors, worst = [], []
    for level in (OptimizationLevel.DISABLED, OptimizationLevel.ALL):
        # exact integer sums: the check is of the model, not of this CPU
        session = make_session(proto, optimization_level=level, exact_int8=True)
        actual = session.run(list(qat_model.export_spec.output_names), feeds)
        diff = np.concatenate(
            [(a - e).reshape(-1) for a, e in zip(actual, expected, strict=True)]
        ).astype(np.float64)
        error = float(np.sqrt(np.mean(np.square(diff)))) if diff.size else 0.0
        errors.append(error)
        worst.append(float(np.abs(diff).max()) if diff.size else 0.0)
        if error > bound:
            kind = "fake-quant" if level is OptimizationLevel.DISABLED else "fused"
            raise QATExportError(
                f"the exported model ({kind} in ONNX Runtime) differs from the QAT module by "
                f"{error:.3g} RMS, over the {bound:.3g} allowed ({tolerance_steps} steps of "
                "range/255)"
            )
    return ExportCheck(errors[0], errors[1], bound, worst[0], worst[1])
