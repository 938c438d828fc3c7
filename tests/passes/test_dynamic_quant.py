"""Dynamic quantization rules: MatMul/Gemm -> integer MatMul chains, LSTM -> DynamicQuantizeLSTM."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import optimized_op_counts, run, sqnr_db

from onnxq.config import QuantConfig
from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.errors import ConfigError


def _mlp(rng: np.random.Generator, trans_b: int) -> onnx.ModelProto:
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((32, 8) if not trans_b else (8, 32)).astype(np.float32) * 0.3
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc", transB=trans_b),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_matmul_and_gemm_become_fused_integer_matmuls(trans_b, rng, tmp_path):
    model = _mlp(rng, trans_b)
    result = quantize_dynamic_with_report(model)
    decisions = {d.name: d for d in result.report.decisions}
    assert decisions["mm"].quantized and decisions["fc"].quantized
    assert result.report.samples == 0
    q = result.model
    assert [o.name for o in q.graph.output] == ["y"]
    floats = [t.name for t in q.graph.initializer if t.name in {"w1", "w2"}]
    assert floats == []  # float weights are gone from the file
    counts = optimized_op_counts(q, tmp_path)
    assert counts.get("DynamicQuantizeMatMul", 0) + counts.get("MatMulIntegerToFloat", 0) == 2
    x = rng.standard_normal((64, 16)).astype(np.float32)
    assert sqnr_db(run(model, {"x": x})[0], run(q, {"x": x})[0]) > 30


def test_per_channel_weight_scales_follow_output_columns(rng):
    q = quantize_dynamic_with_report(_mlp(rng, 0)).model
    scales = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert scales["w1_scale"].shape == (32,)
    per_tensor = quantize_dynamic_with_report(_mlp(rng, 0), QuantConfig(per_channel=False)).model
    assert {t.name: t for t in per_tensor.graph.initializer}["w1_scale"].dims == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"op_types": ("Gemm",)}, {"fc": "int8"}),  # unselected types are not candidates
        ({"exclude_op_types": ("MatMul",)}, {"mm": "excluded by op type", "fc": "int8"}),
        ({"exclude_nodes": ("^f",)}, {"mm": "int8", "fc": "excluded by name pattern '^f'"}),
    ],
)
def test_the_users_node_selection_is_the_static_planners(options, expected, rng):
    report = quantize_dynamic_with_report(_mlp(rng, 0), QuantConfig(**options)).report
    reasons = {d.name: d.reason for d in report.decisions}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])


@pytest.mark.parametrize("op_types", [("Relu", "MatMul"), ("matmul",)])
def test_op_types_without_a_dynamic_rule_are_refused(op_types, rng):
    with pytest.raises(ConfigError, match="dynamic mode has no rule for"):
        quantize_dynamic_with_report(_mlp(rng, 0), QuantConfig(op_types=op_types))


def test_conv_stays_float_with_a_reason(cnn):
    report = quantize_dynamic_with_report(cnn).report
    conv = [d for d in report.decisions if d.op_type == "Conv"]
    assert conv and not any(d.quantized for d in conv)
    assert "static" in conv[0].reason
    assert any(d.quantized for d in report.decisions if d.op_type == "Gemm")


def test_lstm_becomes_dynamic_quantize_lstm(tmp_path):
    torch = pytest.importorskip("torch")
    from onnxq.export import export_torch

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lstm = torch.nn.LSTM(8, 32, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    path = tmp_path / "lstm.onnx"
    example = torch.randn(2, 6, 8)
    export_torch(Tagger().eval(), example, path)
    result = quantize_dynamic_with_report(path)
    lstm = [d for d in result.report.decisions if d.op_type == "LSTM"]
    assert len(lstm) == 2 and all(d.quantized for d in lstm)
    ops = {n.op_type for n in result.model.graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    x = np.random.default_rng(3).standard_normal((16, 6, 8)).astype(np.float32)
    assert sqnr_db(run(path, {"input": x})[0], run(result.model, {"input": x})[0]) > 25
