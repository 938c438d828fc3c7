"""float16 / bfloat16 models: quantized through float32 compute inside the same interface, float
weights stored in half precision again; bfloat16 inputs refused in one line where data is needed.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from support import run, small_cnn, sqnr_db

from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.errors import CalibrationDataError
from onnxq.pipeline import quantize_with_report
from onnxq.weight_only import quantize_weight_only_with_report

RNG = np.random.default_rng(0)


def _halved(model: onnx.ModelProto, dtype: type, io_type: int) -> onnx.ModelProto:
    """``model`` with every initializer in ``dtype`` and the interface typed ``io_type``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        init.CopyFrom(nh.from_array(nh.to_array(init).astype(dtype), init.name))
    for value in (*out.graph.input, *out.graph.output):
        value.type.tensor_type.elem_type = io_type
    onnx.checker.check_model(out, full_check=True)
    return out


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {init.name: init.data_type for init in model.graph.initializer}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_float16_cnn(mode):
    model = _halved(small_cnn(classes=5), np.float16, onnx.TensorProto.FLOAT16)
    calib = {"x": RNG.standard_normal((32, 3, 8, 8)).astype(np.float16)}
    result = (
        quantize_with_report(model, calib)
        if mode == "static"
        else quantize_dynamic_with_report(model)
    )
    onnx.checker.check_model(result.model, full_check=True)
    feed = {"x": calib["x"][:8]}
    reference, got = run(model, feed)[0], run(result.model, feed)[0]
    assert got.dtype == np.float16 and got.shape == reference.shape
    assert sqnr_db(reference.astype(np.float32), got.astype(np.float32)) > 30
    assert result.report.quantized and not result.report.warnings
    types = _initializer_types(result.model)
    if mode == "dynamic":  # Convs stay float in dynamic mode: stored in float16 again
        assert types["w0"] == types["w1"] == onnx.TensorProto.FLOAT16
        assert result.model.ByteSize() < model.ByteSize() * 2.2


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    """A torchscript-exported encoder layer between two Linears, in float16 and, with the very
    same weights, float32 (ONNX Runtime 1.32 crashes creating a session for the float16 export
    itself, so float32 is the reference)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), layer, torch.nn.Linear(32, 8)).eval()
    module = module.half().float()  # weights representable in float16
    folder = tmp_path_factory.mktemp("half")
    paths = {"fp32": folder / "fp32.onnx", "fp16": folder / "fp16.onnx"}
    for key, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        torch.onnx.export(
            module.to(dtype), (torch.randn(2, 6, 16, dtype=dtype),), paths[key], dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}}, opset_version=17,
        )  # fmt: skip
    return paths


TRANSFORMER_MODES = {
    "static": lambda model, x: quantize_with_report(model, {"x": x}),
    "dynamic": lambda model, x: quantize_dynamic_with_report(model),
    "weight-only": lambda model, x: quantize_weight_only_with_report(
        model, calibration_data={"x": x}
    ),
}


FLOOR_DB = {"static": 25, "dynamic": 25, "weight-only": 20}  # 4-bit blocks measure 22.9 dB


@pytest.mark.parametrize("mode", TRANSFORMER_MODES)
def test_float16_transformer(transformer, mode):
    x = RNG.standard_normal((32, 6, 16)).astype(np.float16)
    result = TRANSFORMER_MODES[mode](transformer["fp16"], x)
    onnx.checker.check_model(result.model, full_check=True)
    got = run(result.model, {"x": x[:8]})[0]
    reference = run(transformer["fp32"], {"x": x[:8].astype(np.float32)})[0]
    assert got.dtype == np.float16
    assert sqnr_db(reference, got.astype(np.float32)) > FLOOR_DB[mode]
    assert (
        sum(d.quantized and d.op_type in ("MatMul", "Gemm") for d in result.report.decisions) >= 4
    )


def _bf16_mlp(io_type: int) -> onnx.ModelProto:
    """MatMul-Relu-MatMul in bfloat16; a float32 interface casts in and out (mixed precision)."""
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal(s) / np.sqrt(s[0]) for s in ((16, 32), (32, 8)))
    bf16, cast = onnx.TensorProto.BFLOAT16, io_type != onnx.TensorProto.BFLOAT16
    nodes = [
        oh.make_node("Cast", ["x"], ["xb"], to=bf16)
        if cast
        else oh.make_node("Identity", ["x"], ["xb"]),
        oh.make_node("MatMul", ["xb", "w1"], ["a"]),
        oh.make_node("Relu", ["a"], ["r"]),
        oh.make_node("MatMul", ["r", "w2"], ["yb"]),
        oh.make_node("Cast", ["yb"], ["y"], to=io_type)
        if cast
        else oh.make_node("Identity", ["yb"], ["y"]),
    ]
    weights = [nh.from_array(w.astype(ml_dtypes.bfloat16), n) for w, n in ((w1, "w1"), (w2, "w2"))]
    graph = oh.make_graph(
        nodes, "mlp", [oh.make_tensor_value_info("x", io_type, ["N", 16])],
        [oh.make_tensor_value_info("y", io_type, ["N", 8])], weights,
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_bfloat16_weights():
    model = _bf16_mlp(onnx.TensorProto.FLOAT)  # bf16 weights, float32 interface
    x = RNG.standard_normal((64, 16)).astype(np.float32)
    weights = {i.name: nh.to_array(i).astype(np.float32) for i in model.graph.initializer}
    reference = np.maximum(x @ weights["w1"], 0) @ weights["w2"]
    for result in (quantize_with_report(model, {"x": x}), quantize_dynamic_with_report(model)):
        onnx.checker.check_model(result.model, full_check=True)
        assert sqnr_db(reference, run(result.model, {"x": x})[0]) > 25


def test_bfloat16_inputs_refused_where_data_is_needed():
    model = _bf16_mlp(onnx.TensorProto.BFLOAT16)
    x = RNG.standard_normal((8, 16)).astype(ml_dtypes.bfloat16)
    with pytest.raises(CalibrationDataError, match="bfloat16 input cannot be fed") as error:
        quantize_with_report(model, {"x": x})
    assert "\n" not in str(error.value)
    dynamic = quantize_dynamic_with_report(model).model  # no data needed
    onnx.checker.check_model(dynamic, full_check=True)
    assert dynamic.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert {n.op_type for n in dynamic.graph.node} >= {"MatMulInteger", "Cast"}
