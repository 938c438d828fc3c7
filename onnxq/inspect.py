"""Which nodes ONNX Runtime actually runs as int8 kernels.

A QDQ file only says what *may* run in int8; ORT's optimizer decides, by fusing ``DQ -> op -> Q``
into an int8 kernel where every input comes from a DQ and every output feeds only Qs. This module
asks ORT: it creates a session that writes its optimized graph (``optimized_model_filepath``) and
counts what is in it.

The graph is optimized at ``extended`` (ORT_ENABLE_EXTENDED): that level holds the QDQ fusions
and the float fusions (Conv+Relu, MatMul+Add, ...), and its output is portable. ``all`` adds
NCHWc layout rewrites tied to this CPU's vector width (ORT warns such a file is hardware specific)
and changes no int8/float decision.

Each node of the optimized graph is one of (op types compared without their domain):

1. ``int8``: an integer kernel (``INT8_KERNELS``: QLinearConv, MatMulIntegerToFloat, ...;
   ``MatMulNBits``, weight-only mode's blocked 4/8-bit weights, counts here too);
2. ``float``: a compute op that stayed float (``FLOAT_COMPUTE``: Conv, MatMul, Gemm, ...);
3. ``qdq``: a QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear left unfused;
4. ``other``: everything else (Relu, Reshape, Flatten, MaxPool, ...).

Per op family (Conv, MatMul, Add, ...): how many of its nodes run as which int8 kernel, and how
many stayed float. A family is listed when it is a float compute op or has an int8 kernel.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from onnxq.ir_io import all_graphs
from onnxq.isa import cpu_features
from onnxq.model_io import load_model
from onnxq.runtime import OptimizationLevel, Provider, make_session
from onnxq.saturation import NO_VNNI_NOTE, saturation_risk

PathLike = str | os.PathLike[str]

# Integer kernels of ORT (CPU and contrib ops) and the float op family each one replaces.
INT8_KERNELS: dict[str, str] = {
    "QLinearConv": "Conv",
    "ConvInteger": "Conv",
    "QLinearConvTranspose": "ConvTranspose",
    "QLinearMatMul": "MatMul",
    "MatMulInteger": "MatMul",
    "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul",
    "MatMulNBits": "MatMul",  # blocked 4/8-bit weights (weight-only), float activations
    "QGemm": "Gemm",
    "QLinearAdd": "Add",
    "QLinearMul": "Mul",
    "QLinearAveragePool": "AveragePool",
    "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearConcat": "Concat",
    "QLinearSigmoid": "Sigmoid",
    "QLinearLeakyRelu": "LeakyRelu",
    "QLinearSoftmax": "Softmax",
    "QLinearWhere": "Where",
    "QLinearReduceMean": "ReduceMean",
    "DynamicQuantizeLSTM": "LSTM",
    "QAttention": "Attention",
    "QEmbedLayerNormalization": "EmbedLayerNormalization",
}

# Float compute ops (ORT's fused float variants map to their family).
FLOAT_COMPUTE: dict[str, str] = {
    "Conv": "Conv",
    "FusedConv": "Conv",
    "NhwcConv": "Conv",
    "ConvTranspose": "ConvTranspose",
    "MatMul": "MatMul",
    "FusedMatMul": "MatMul",
    "Gemm": "Gemm",
    "FusedGemm": "Gemm",
    "Einsum": "Einsum",
    "Attention": "Attention",
    "MultiHeadAttention": "Attention",
    "LSTM": "LSTM",
    "GRU": "GRU",
    "RNN": "RNN",
}

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})

CATEGORIES = ("int8", "float", "qdq", "other")


def category(op_type: str) -> str:
    """``int8``, ``float``, ``qdq`` or ``other`` (see the module docstring)."""
    if op_type in INT8_KERNELS:
        return "int8"
    if op_type in FLOAT_COMPUTE:
        return "float"
    if op_type in QDQ_OPS:
        return "qdq"
    return "other"


def family(op_type: str) -> str:
    """The float op family a node belongs to: QLinearConv -> Conv, FusedMatMul -> MatMul."""
    return INT8_KERNELS.get(op_type) or FLOAT_COMPUTE.get(op_type) or op_type


@dataclass(frozen=True)
class FamilyReport:
    """One op family: ``total`` nodes after ORT, split into int8 kernels and float ops."""

    family: str
    total: int
    int8: dict[str, int]
    float_ops: dict[str, int]
    in_file: int

    @property
    def int8_count(self) -> int:
        return sum(self.int8.values())

    def describe(self) -> str:
        """E.g. ``Conv: 20 of 20 run as QLinearConv``."""
        text = f"{self.family}: {self.int8_count} of {self.total} run as "
        if len(self.int8) == 1:
            text += next(iter(self.int8))
        elif self.int8:
            text += ", ".join(f"{op} ({n})" for op, n in self.int8.items())
        else:
            text += "int8 kernels"
        if self.float_ops:
            text += f"; float: {', '.join(f'{op} ({n})' for op, n in self.float_ops.items())}"
        if self.in_file != self.total:
            text += f" ({self.in_file} {self.family} in the file; ORT fused or split some)"
        return text


@dataclass(frozen=True)
class InspectReport:
    """What ORT runs for a model on one provider, counted by op type, category and family."""

    path: str
    provider: str
    onnxruntime: str
    optimization_level: str
    nodes_in_file: dict[str, int]
    nodes: dict[str, int]
    categories: dict[str, dict[str, int]]
    families: tuple[FamilyReport, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = ()

    @property
    def int8_kernels(self) -> Counter[str]:
        return Counter(self.categories["int8"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "provider": self.provider,
            "onnxruntime": self.onnxruntime,
            "optimization_level": self.optimization_level,
            "nodes_in_file": dict(self.nodes_in_file),
            "nodes": dict(self.nodes),
            "categories": {k: dict(v) for k, v in self.categories.items()},
            "totals": {k: sum(v.values()) for k, v in self.categories.items()},
            "families": [
                {
                    "family": f.family,
                    "total": f.total,
                    "int8": dict(f.int8),
                    "float": dict(f.float_ops),
                    "in_file": f.in_file,
                    "summary": f.describe(),
                }
                for f in self.families
            ],
            "warnings": list(self.warnings),
        }


def inspect_model(path: PathLike, provider: Provider | str = Provider.CPU) -> InspectReport:
    """Optimize ``path`` with ORT on ``provider`` (extended level) and count what it runs."""
    path = Path(path)
    source = load_model(path)  # clear errors for a missing or invalid file
    in_file = Counter(node.op_type for node in _nodes(source.graph))
    risk = saturation_risk(source) if cpu_features().u8s8_saturates else None
    warnings = () if risk is None else (NO_VNNI_NOTE.format(name=path.name, risk=risk.describe()),)
    del source
    with tempfile.TemporaryDirectory(prefix="onnxq-inspect-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        make_session(
            path,
            provider,
            optimization_level=OptimizationLevel.EXTENDED,
            optimized_model_path=optimized_path,
        )
        optimized = onnx.load(os.fspath(optimized_path), load_external_data=False)
    nodes = Counter(node.op_type for node in _nodes(optimized.graph))
    categories: dict[str, Counter[str]] = {name: Counter() for name in CATEGORIES}
    for op_type, count in nodes.items():
        categories[category(op_type)][op_type] += count
    return InspectReport(
        path=str(path),
        provider=Provider(provider).value,
        onnxruntime=ort.__version__,
        optimization_level=OptimizationLevel.EXTENDED.value,
        nodes_in_file=dict(in_file.most_common()),
        nodes=dict(nodes.most_common()),
        categories={k: dict(v.most_common()) for k, v in categories.items()},
        families=_families(nodes, in_file),
        warnings=warnings,
    )


def count_int8_kernels(path: PathLike, provider: Provider | str = Provider.CPU) -> Counter[str]:
    """Int8 kernels ORT runs for ``path``, by op type (e.g. ``{"QLinearConv": 20}``)."""
    return inspect_model(path, provider).int8_kernels


def format_inspect(report: InspectReport) -> str:
    """A few lines: totals per category, one line per op family, then every op type."""
    totals = {name: sum(report.categories[name].values()) for name in CATEGORIES}
    lines = [
        f"{report.path}: as run by onnxruntime {report.onnxruntime} on {report.provider} "
        f"(graph optimization level {report.optimization_level})",
        f"nodes: {sum(report.nodes_in_file.values())} in the file, "
        f"{sum(report.nodes.values())} after ORT's optimizer",
        f"int8 kernels {totals['int8']} | float compute {totals['float']} | "
        f"Q/DQ left {totals['qdq']} | other {totals['other']}",
    ]
    if report.families:
        lines.append("by op family:")
        lines += [f"  {f.describe()}" for f in report.families]
    for name, title in (
        ("int8", "int8 kernels"),
        ("float", "float compute"),
        ("qdq", "Q/DQ left"),
        ("other", "other"),
    ):
        if report.categories[name]:
            lines.append(f"{title}: {', '.join(_counts(report.categories[name]))}")
    if totals["qdq"] and totals["int8"] == 0:
        lines.append(
            "no int8 kernel runs: every Q/DQ pair here is overhead (on CUDA this is expected; "
            "on CPU check the QDQ pattern around each op)"
        )
    lines += [f"warning: {warning}" for warning in report.warnings]
    return "\n".join(lines)


def _families(nodes: Counter[str], in_file: Counter[str]) -> tuple[FamilyReport, ...]:
    grouped: dict[str, dict[str, Counter[str]]] = {}
    for op_type, count in nodes.items():
        kind = category(op_type)
        name = family(op_type)
        entry = grouped.setdefault(name, {"int8": Counter(), "float": Counter()})
        if kind == "int8":
            entry["int8"][op_type] += count
        elif kind == "float" or op_type == name:
            entry["float"][op_type] += count
    reports = []
    for name, entry in grouped.items():
        if not entry["int8"] and name not in FLOAT_COMPUTE.values():
            continue  # e.g. Relu: no int8 kernel, not a compute op
        int8, floats = entry["int8"], entry["float"]
        reports.append(
            FamilyReport(
                family=name,
                total=sum(int8.values()) + sum(floats.values()),
                int8=dict(int8.most_common()),
                float_ops=dict(floats.most_common()),
                in_file=in_file.get(name, 0),
            )
        )
    reports.sort(key=lambda f: (-f.total, f.family))
    return tuple(reports)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for each in all_graphs(graph):
        yield from each.node


def _counts(counter: dict[str, int]) -> list[str]:
    return [f"{op} x{n}" if n > 1 else op for op, n in counter.items()]
