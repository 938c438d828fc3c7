"""prepare_qat / export_qat on small torch CNNs: where the fake quantization sits, its initial
qparams against onnxq's post-training ones, and the exported model against the module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from models.digits_cnn import build_digits_cnn  # noqa: E402
from onnxq.config import QuantConfig  # noqa: E402
from onnxq.errors import ConfigError, UnsupportedModelError  # noqa: E402
from onnxq.export import export_torch  # noqa: E402
from onnxq.pipeline import quantize  # noqa: E402
from onnxq.qat import export_qat, prepare_qat  # noqa: E402
from onnxq.qat.export import check_export  # noqa: E402
from onnxq.qat.module import QATModule  # noqa: E402

TARGETS = ["ort-cpu", "tensorrt"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((48, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    torch.set_num_threads(2)
    model = build_digits_cnn(seed=0)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding shows
        for i, bn in enumerate(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            g = torch.Generator().manual_seed(i)
            bn.running_mean.uniform_(-0.2, 0.2, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _ptq(cnn, images: np.ndarray, tmp_path: Path, config: QuantConfig) -> onnx.ModelProto:
    path = tmp_path / "float.onnx"
    export_torch(cnn, torch.from_numpy(images[:2]), path, input_names=["x"])
    return quantize(path, {"x": images}, config)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("target", TARGETS)
def test_initial_qparams_equal_post_training(cnn, images, tmp_path, target) -> None:
    """Every Q/DQ of onnxq's PTQ model (default config: GPTQ, which keeps the scales) has a
    quantizer in the module with the same scale, zero point and axis, and vice versa."""
    module = prepare_qat(cnn, torch.from_numpy(images[:2]), {"x": images}, target=target)
    ptq = _ptq(cnn, images, tmp_path, QuantConfig(target=target))
    values = _initializers(ptq)
    scales = module.scales()
    roots = {}
    weights = {}
    for node in ptq.graph.node:
        if node.op_type == "QuantizeLinear":
            roots[node.input[0]] = (values[node.input[1]], values[node.input[2]])
        elif node.op_type == "DequantizeLinear" and node.input[0] in values:
            if values[node.input[0]].dtype == np.int32:
                continue  # bias: its scale is input_scale * weight_scale
            readers = [(n.name, list(n.input).index(node.output[0])) for n in ptq.graph.node
                       if node.output[0] in n.input]  # fmt: skip
            for reader in readers:
                weights[reader] = (values[node.input[1]], values[node.input[2]])
    assert roots and weights
    spec = module.export_spec
    plan_roots = set(spec.roots)
    seen_roots = set()
    for tensor, (scale, zero) in roots.items():
        matches = [r for r, qp in scales.items() if qp.scale.tobytes() == scale.tobytes()]
        assert matches, f"no quantizer with the scale of {tensor}"
        qp = scales[matches[0]]
        assert qp.zero_point.dtype == zero.dtype and qp.zero_point.tobytes() == zero.tobytes()
        seen_roots.update(matches)
    assert seen_roots == plan_roots
    assert set(weights) == set(spec.weight_keys)
    for reader, (scale, zero) in weights.items():
        qp = module.weight_quantizers[spec.weight_keys[reader]].qparams()
        assert qp.scale.tobytes() == scale.tobytes(), reader
        assert qp.zero_point.tobytes() == zero.tobytes(), reader
    if target == "tensorrt":
        assert all(not qp.zero_point.any() and qp.zero_point.dtype == np.int8
                   for qp in scales.values())  # fmt: skip
    else:
        assert all(module.weight_quantizers[i].qmax == 63 for i in spec.weight_keys.values())


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
@pytest.mark.parametrize("target", TARGETS)
def test_module_at_init_computes_the_post_training_model(
    cnn, images, tmp_path, target, rounding
) -> None:
    """Before training, the module is onnxq's PTQ model for the same config (GPTQ's levels
    included) run as fake quant in ONNX Runtime without optimisation: the same float32
    arithmetic. With nearest rounding its trainable weights are the float ones."""
    import onnxruntime as ort

    config = QuantConfig(target=target, weight_rounding=rounding)
    module = prepare_qat(cnn, torch.from_numpy(images[:2]), {"x": images}, config)
    ptq = _ptq(cnn, images, tmp_path, config)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        ptq.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    expected = session.run(None, {"x": images})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(images)).numpy()
        float_out = cnn(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - float_out).max() > 1e-4  # it is quantized, not the float model
    folded = _initializers(onnx.load_from_string(module.export_spec.float_model))
    moved = [
        not np.array_equal(w.detach().numpy(), folded[name])
        for name, w in zip(module.export_spec.latent_names, module.weights, strict=True)
    ]
    assert any(moved) if rounding == "gptq" else not any(moved)


def test_dataloader_calibration_and_forward_signature(cnn, images) -> None:
    """A DataLoader of (images, labels) calibrates like the dict; the module takes the forward
    argument by name too, and trains (gradients reach weights and scales)."""
    labels = torch.zeros(len(images), dtype=torch.int64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(images), labels), batch_size=8
    )
    from_loader = prepare_qat(cnn, torch.from_numpy(images[:2]), loader)
    from_dict = prepare_qat(cnn, torch.from_numpy(images[:2]), {"x": images})
    for a, b in zip(from_loader.scales().values(), from_dict.scales().values(), strict=True):
        assert a.scale.tobytes() == b.scale.tobytes()
    x = torch.from_numpy(images[:4])
    assert torch.equal(from_loader(x=x), from_loader(x))
    from_loader(x).square().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in from_loader.weights)
    assert all(p.grad is not None for p in from_loader.scale_parameters())


def test_export_reproduces_the_trained_module(cnn, images, tmp_path) -> None:
    """After a few steps (weights and scales moved), the exported int8 model equals the module
    in ONNX Runtime unfused and within the stated tolerance fused; it has int8 weights, int32
    biases and fuses to QLinearConv like static mode."""
    import onnxruntime as ort

    torch.manual_seed(0)
    module = prepare_qat(cnn, torch.from_numpy(images[:2]), {"x": images})
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    target = torch.randn(len(images), 10)
    for _ in range(5):
        optimiser.zero_grad()
        torch.nn.functional.mse_loss(module(torch.from_numpy(images)), target).backward()
        optimiser.step()
    assert any(float(p.detach().abs().max()) > 0 for p in module.scale_parameters())
    proto = export_qat(
        module.eval(), tmp_path / "qat.onnx", example_inputs=torch.from_numpy(images)
    )
    assert (tmp_path / "qat.onnx").is_file()
    check = check_export(module, proto, torch.from_numpy(images))
    assert check.fake_quant_worst <= 1e-5 and check.fused_worst <= check.bound
    types = {i.name: i.data_type for i in proto.graph.initializer}
    dq_inputs = [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert sum(types.get(name) == onnx.TensorProto.INT8 for name in dq_inputs) == 4
    assert sum(types.get(name) == onnx.TensorProto.INT32 for name in dq_inputs) == 4
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("QLinearConv") == 3


def test_unsupported_op_is_refused_by_name(images) -> None:
    class Cumulative(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, dim=3)

    with pytest.raises(UnsupportedModelError, match=r"op CumSum \(node"):
        prepare_qat(Cumulative(), torch.from_numpy(images[:2]), {"x": images})


def test_conflicting_targets_are_refused(cnn, images) -> None:
    with pytest.raises(ConfigError, match="disagrees"):
        prepare_qat(cnn, torch.from_numpy(images[:2]), {"x": images},
                    QuantConfig(target="qnn"), target="tensorrt")  # fmt: skip


def test_export_refuses_other_modules(cnn, tmp_path) -> None:
    with pytest.raises(ConfigError, match="prepare_qat"):
        export_qat(cnn, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    assert QATModule is not None


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt", "qnn"])
def test_transformer_runs_and_exports(tmp_path, target) -> None:
    """A small encoder (Gather, LayerNorm, attention MatMuls, Softmax, shape ops): the module
    reproduces onnxq's PTQ model for the target (GPTQ weights, int8 embedding table) and the
    export reproduces the module, its embedding table int8 as in static mode."""
    import onnxruntime as ort
    from torch_models import SEQ, VOCAB, TinyEncoder

    model = TinyEncoder().eval()
    ids = torch.randint(0, VOCAB, (16, SEQ), generator=torch.Generator().manual_seed(0))
    module = prepare_qat(model, ids[:2], {"ids": ids.numpy()}, target=target)
    assert len(module.weight_quantizers) >= 8
    export_torch(model, ids[:2], tmp_path / "float.onnx", input_names=["ids"])
    ptq = quantize(tmp_path / "float.onnx", {"ids": ids.numpy()}, QuantConfig(target=target))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        ptq.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        np.testing.assert_allclose(
            module(ids).numpy(), session.run(None, {"ids": ids.numpy()})[0], rtol=1e-5, atol=1e-5
        )
    proto = export_qat(module, tmp_path / "enc.onnx", example_inputs=ids)
    check = check_export(module, proto, ids)
    assert check.fake_quant_error <= check.bound and check.fused_error <= check.bound
    types = {i.name: i.data_type for i in proto.graph.initializer}
    gathered = [n.input[0] for n in proto.graph.node if n.op_type == "Gather"]
    assert any(types.get(name) == onnx.TensorProto.INT8 for name in gathered)
