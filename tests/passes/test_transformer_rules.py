"""Transformer-aware rules on small encoders exported by both PyTorch exporters.

Nothing here is keyed to node names: the same assertions hold for torchscript (opsets 17 and
14) and dynamo (opset 18) exports of ``nn.TransformerEncoder``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from support import optimized_op_counts, run

torch = pytest.importorskip("torch")

from torch_models import SEQ, VOCAB, TinyEncoder  # noqa: E402

from onnxq.config import QuantConfig  # noqa: E402
from onnxq.dynamic import quantize_dynamic_with_report  # noqa: E402
from onnxq.export import export_torch  # noqa: E402
from onnxq.pipeline import quantize_with_report  # noqa: E402


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(
    scope="module", params=[("torchscript", 17), ("dynamo", 18), ("torchscript", 14)], ids=str
)
def encoder(request, tmp_path_factory) -> Path:
    """Opset 14 has no LayerNormalization op: the exporter writes it out as ReduceMean & co."""
    exporter, opset = request.param
    path = tmp_path_factory.mktemp(exporter) / "encoder.onnx"
    ids = torch.from_numpy(_ids(np.random.default_rng(1), 2))
    export_torch(
        TinyEncoder().eval(), ids, path, exporter=exporter, opset=opset, input_names=["ids"]
    )
    return path


def test_static_keeps_norms_softmax_and_residuals_float(encoder, tmp_path):
    rng = np.random.default_rng(0)
    result = quantize_with_report(encoder, {"ids": _ids(rng, 32)}, QuantConfig())
    quantized = Counter(d.op_type for d in result.report.decisions if d.quantized)
    assert quantized["MatMul"] + quantized.get("Gemm", 0) >= 8  # q/k/v/out/ffn x 2 layers
    assert quantized.get("Add", 0) == 0 and quantized.get("Softmax", 0) == 0
    assert quantized["Gather"] == 1  # the embedding table is stored as int8
    counts = optimized_op_counts(result.model, tmp_path)
    assert "QLinearAdd" not in counts and "QLinearSoftmax" not in counts
    ids = _ids(np.random.default_rng(7), 16)
    cosine = _cosine(run(encoder, {"ids": ids})[0], run(result.model, {"ids": ids})[0])
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.97
    assert _float_weights(result.model) <= 0.1 * _float_weights(onnx.load(encoder))


def _float_weights(model: onnx.ModelProto) -> int:
    """Float32 constant elements (weights that were not turned into integers)."""
    return sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )


def test_dynamic_fuses_to_integer_matmuls(encoder, tmp_path):
    result = quantize_dynamic_with_report(encoder)
    assert any("random token sequences" in note for note in result.report.notes)
    counts = optimized_op_counts(result.model, tmp_path)
    fused = counts.get("DynamicQuantizeMatMul", 0) + counts.get("MatMulIntegerToFloat", 0)
    assert fused >= 8
    assert "MatMulInteger" not in counts  # every chain was fused
    ids = _ids(np.random.default_rng(7), 16)
    cosine = _cosine(run(encoder, {"ids": ids})[0], run(result.model, {"ids": ids})[0])
    assert cosine.mean() >= 0.99


def test_smoothing_is_exact_in_float_and_helps_int8(encoder):
    from onnx_ir import from_proto

    from onnxq.passes.prepare import prepare
    from onnxq.smoothing import smooth_model

    rng = np.random.default_rng(0)
    model = prepare(from_proto(onnx.load(encoder)))
    calib = [{"ids": _ids(rng, 8)} for _ in range(4)]
    applied = smooth_model(model, calib)
    assert applied, "outlier channels should be smoothed"
    # each layer's ReLU FFN: the second linear's factor goes into the first one's columns
    assert sum(how.startswith("folded into the preceding MatMul") for _, how in applied) >= 2
    from onnx_ir import to_proto

    smoothed = to_proto(model)
    ids = _ids(np.random.default_rng(7), 8)
    reference, float_smoothed = run(encoder, {"ids": ids})[0], run(smoothed, {"ids": ids})[0]
    np.testing.assert_allclose(float_smoothed, reference, rtol=1e-4, atol=1e-4)


def test_attention_matmuls_are_quantized_only_on_request(encoder, tmp_path):
    rng = np.random.default_rng(0)
    calib = {"ids": _ids(rng, 32)}

    def quantized_matmuls(config: QuantConfig) -> tuple[int, onnx.ModelProto]:
        result = quantize_with_report(encoder, calib, config)
        return sum(d.quantized and d.op_type == "MatMul" for d in result.report.decisions), (
            result.model
        )

    default, _ = quantized_matmuls(QuantConfig())
    opted, model = quantized_matmuls(QuantConfig(quantize_activation_matmuls=True))
    assert opted == default + 4  # scores and context, in each of the 2 layers
    ids = _ids(np.random.default_rng(7), 16)
    cosine = _cosine(run(encoder, {"ids": ids})[0], run(model, {"ids": ids})[0])
    assert cosine.mean() >= 0.99


def test_dynamic_keeps_smoothing_only_when_it_raises_output_sqnr(encoder, monkeypatch):
    import onnxq.dynamic

    kept = quantize_dynamic_with_report(encoder)
    assert any(note.startswith("SmoothQuant kept: output SQNR") for note in kept.report.notes)

    def smoothing_looks_worse(reference, models, feeds):
        return [10.0, 20.0]  # smoothed, plain

    monkeypatch.setattr(onnxq.dynamic, "_output_sqnr", smoothing_looks_worse)
    dropped = quantize_dynamic_with_report(encoder)
    assert any(note.startswith("SmoothQuant dropped") for note in dropped.report.notes)
    plain = quantize_dynamic_with_report(encoder, QuantConfig(smooth=False))
    assert dropped.model.SerializeToString() == plain.model.SerializeToString()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_pre_ln_smoothing_folds_into_every_layernorm(exporter, tmp_path):
    """Pre-LN: each LayerNorm feeds only its layer's MatMuls, so both fold (through the
    batch-first Transpose too); only the GELU output needs a Mul."""
    path = tmp_path / "pre_ln.onnx"
    ids = torch.from_numpy(_ids(np.random.default_rng(1), 2))
    export_torch(TinyEncoder(pre_ln=True).eval(), ids, path, exporter=exporter, input_names=["ids"])
    result = quantize_dynamic_with_report(path)
    smoothed = next(n for n in result.report.notes if n.startswith("SmoothQuant (alpha"))
    assert "4 folded into their producer, 2 with a Mul" in smoothed  # 2 LNs + 1 GELU x 2 layers
    ids = _ids(np.random.default_rng(7), 16)
    cosine = _cosine(run(path, {"ids": ids})[0], run(result.model, {"ids": ids})[0])
    assert cosine.mean() >= 0.999


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_norms_fused_to_layernorm_not_skip_layernorm(encoder, tmp_path, mode):
    """Every normalisation runs as ONNX Runtime's LayerNormalization kernel, even where the
    export wrote it out (opset 14). No intermediate shapes are written, so ONNX Runtime does not
    form SkipLayerNormalization (~6x slower than Add + LayerNormalization on CPU here)."""
    rng = np.random.default_rng(0)
    if mode == "static":
        model = quantize_with_report(encoder, {"ids": _ids(rng, 8)}, QuantConfig()).model
    else:
        model = quantize_dynamic_with_report(encoder).model
    assert len(model.graph.value_info) == 0
    fp32 = optimized_op_counts(onnx.load(encoder), tmp_path)
    quantized = optimized_op_counts(model, tmp_path)
    norms = ("LayerNormalization", "SkipLayerNormalization")
    assert quantized.get("SkipLayerNormalization", 0) == 0
    assert quantized.get("LayerNormalization", 0) == sum(fp32.get(op, 0) for op in norms) > 0
    assert quantized.get("Softmax", 0) == fp32.get("Softmax", 0)
