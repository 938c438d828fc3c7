"""Finish a QDQ model written by another tool, orchestration only: load -> clean -> finish
Q/DQ -> (convert to a target's scheme) -> check -> report.

No calibration data: the model's own scales and zero points are kept. Without a target the
model keeps its scheme and the report lists the ``ort-cpu`` rules it breaks as warnings; with
one it is converted where that is exact (``onnxq.passes.convert_qdq_scheme``) and checked
against that target.
"""

from __future__ import annotations

import json
from collections import defaultdict

import onnx

from onnxq.config import QuantConfig
from onnxq.errors import UnsupportedModelError
from onnxq.ir_io import from_proto
from onnxq.model_io import model_bytes, model_proto
from onnxq.passes.convert_qdq_scheme import ConvertSchemePass
from onnxq.passes.finish_qdq import FinishLog, FinishQDQPass
from onnxq.passes.fold_constants import FoldConstantsPass
from onnxq.passes.opset import CheckDomainsPass, UpgradeOpsetPass
from onnxq.passes.prepare import RemoveInitializerInputsPass
from onnxq.passes.qdq_fusion import fusion_decisions
from onnxq.passes.qdq_nodes import DQ_OP, Q_OP
from onnxq.passes.qdq_scheme import Scheme, detect_scheme
from onnxq.pipeline import QUANTIZED_OPS, ModelSource, QuantizationReport, QuantResult, finish
from onnxq.targets import DEFAULT_TARGET, BiasForm, Target, get_target
from onnxq.targets.check import check_model

QDQ_OPS = frozenset({Q_OP, DQ_OP})


def carries_qdq(model: onnx.ModelProto) -> bool:
    """The main graph holds a QuantizeLinear or DequantizeLinear."""
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def finish_qdq(model: ModelSource, *, target: str | Target | None = None) -> onnx.ModelProto:
    """The QDQ ``model`` finished for ONNX Runtime's int8 kernels with its own qparams.

    ``target``: convert to that target's scheme where exact (``None``: keep the model's).
    """
    return finish_qdq_with_report(model, target=target).model


def finish_qdq_with_report(
    model: ModelSource, *, target: str | Target | None = None
) -> QuantResult:
    """``finish_qdq`` plus a ``QuantizationReport``: its ``finished`` entry says what was
    folded, repaired, converted and what blocked ORT's int8 kernels; ``warnings`` the target
    rules the result still breaks."""
    proto = model_proto(model)
    if not carries_qdq(proto):
        raise UnsupportedModelError(
            "the model has no QuantizeLinear/DequantizeLinear to finish; give calibration data "
            "(--calib) to quantize a float model"
        )
    _refuse_operator_form(proto)
    chosen = get_target(target or DEFAULT_TARGET)
    graph_model = from_proto(proto)
    for clean in (
        CheckDomainsPass(),
        UpgradeOpsetPass(chosen.min_opset),
        RemoveInitializerInputsPass(),
        FoldConstantsPass(infer_shapes=False),  # no shape inference: keep the graph as written
    ):
        clean(graph_model)
    log = FinishLog()
    FinishQDQPass(int32_bias=chosen.bias is BiasForm.INT32, log=log)(graph_model)
    if target is not None:
        ConvertSchemePass(chosen, log)(graph_model)
    scheme = detect_scheme(graph_model.graph)
    config = _config(chosen, scheme)
    decisions = fusion_decisions(graph_model.graph)
    out = finish(graph_model, config)
    finished = {"source": "qdq", "scheme": scheme.to_dict(), **log.to_dict()}
    out.metadata_props.add(key="onnxq.source", value="qdq")
    out.metadata_props.add(key="onnxq.finished", value=json.dumps(finished, sort_keys=True))
    report = QuantizationReport(
        decisions=decisions,
        size_before=model_bytes(proto),
        size_after=model_bytes(out),
        samples=0,
        reduce_range=bool(config.reduce_range),
        reduce_range_reason="the model's own weights",
        config=config.to_dict(),
        target=chosen.to_dict(),
        warnings=rule_warnings(out, chosen),
        finished=finished,
    )
    return QuantResult(out, report)


def rule_warnings(model: onnx.ModelProto, target: Target) -> list[str]:
    """One line per ``target`` rule the model breaks (``onnxq.targets.check``), with the
    number of nodes and the first of them."""
    grouped = defaultdict(list)
    for violation in check_model(model, target).violations:
        grouped[violation.rule].append(violation)
    return [
        f"{target.name} rule {rule!r} broken at {len(found)} node(s), e.g. {found[0].describe()}"
        for rule, found in grouped.items()
    ]


def _refuse_operator_form(proto: onnx.ModelProto) -> None:
    """Integer kernels (QLinearConv, MatMulInteger, ...) are already final: nothing to finish."""
    for node in proto.graph.node:
        if node.op_type in QUANTIZED_OPS - QDQ_OPS:
            raise UnsupportedModelError(
                f"the model is already quantized in operator form (node "
                f"{node.name or node.op_type!r} is {node.op_type}); onnxq finishes QDQ models "
                "and quantizes float ones"
            )


def _config(target: Target, scheme: Scheme) -> QuantConfig:
    """The resolved config recorded as provenance: the target, with the scheme the model
    holds where it has one type (and the target does not fix another)."""
    found = {
        "activation_type": scheme.activation_type,
        "weight_type": scheme.weight_type,
        "activation_symmetric": scheme.activation_symmetric or None,
        "per_channel": scheme.per_channel if scheme.weight_types else None,
        "reduce_range": scheme.reduce_range if scheme.weight_peak is not None else None,
    }
    fixed = target.scheme()
    kept = {
        name: value
        for name, value in found.items()
        if value is not None and (name not in target.fixed or value == fixed[name])
    }
    return QuantConfig(target=target.name, **kept).resolved()
