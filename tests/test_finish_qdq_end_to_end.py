"""torch.ao QAT models (eager and FX graph mode) exported with the TorchScript exporter, finished
by ``onnxq quantize`` without data (``onnxq.finish``), through the CLI.

A digits CNN (Conv-BN-ReLU fused for QAT) trains a few steps on real digits with fake
quantization; its ONNX export is finished and must: pass the ONNX checker, run every Conv as an
int8 kernel in ONNX Runtime, be at most 30% of the exported file, and stay within one step of
the output's Q scale of torch's fake-quant model on >= 99% of the logits. ORT runs with
``session.x64quantprecision`` so that x86 CPUs without VNNI compute u8 x s8 exactly too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxq.cli import main
from onnxq.inspect import inspect_model
from onnxq.runtime import make_session

torch = pytest.importorskip("torch")
tq = pytest.importorskip("torch.ao.quantization")
pytest.importorskip("sklearn")

from calibration.digits import load_digits_splits  # noqa: E402
from models.digits_cnn import DigitsCNN  # noqa: E402

TRAIN_STEPS = {"per-channel": 100, "per-tensor": 100, "fx-per-channel": 100, "reduce-range": 10}
"""Enough for 98% top-1 on held-out digits; the reduce-range model only shows its Clips."""


def _conv_bn_relu(cin: int, cout: int) -> list:
    nn = torch.nn
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class QuantDigits(torch.nn.Module):
    """Conv-BN-ReLU x2, MaxPool, Conv-BN-ReLU, average pool, Linear between torch.ao's
    QuantStub and DeQuantStub (``models.digits_cnn`` twice as wide: 94k weights, so that the
    file's names and graph weigh little next to them)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 32),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.dequant(self.classifier(self.features(self.quant(x))))


class PlainDigits(QuantDigits):
    """The same network without stubs, for FX graph mode (it places the fake quants itself)."""

    def forward(self, x):
        return self.classifier(self.features(x))


def _prepare_eager(qconfig, example):
    """Eager mode: fuse Conv-BN-ReLU by name, fake quants at the stubs and every module."""
    model = QuantDigits().train()
    fused = [[f"features.{i}", f"features.{i + 1}", f"features.{i + 2}"] for i in (0, 3, 7)]
    model = tq.fuse_modules_qat(model, fused)
    model.qconfig = qconfig
    return tq.prepare_qat(model), lambda m: m.classifier.activation_post_process


def _prepare_fx(qconfig, example):
    """FX graph mode (symbolic tracing fuses Conv-BN-ReLU itself); the output's fake quant is
    the module the graph's output node reads."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    mapping = tq.QConfigMapping().set_global(qconfig)
    model = prepare_qat_fx(PlainDigits().train(), mapping, (example,))

    def output_quant(m):
        (output,) = (n for n in m.graph.nodes if n.op == "output")
        return m.get_submodule(output.args[0].target)

    return model, output_quant


PREPARE = {"fx-per-channel": _prepare_fx}  # the rest: eager mode


def _qconfigs() -> dict:
    activation = tq.FakeQuantize.with_args(  # ranges follow a short training (default 0.01)
        observer=tq.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        averaging_constant=0.1,
    )
    return {
        "per-channel": tq.QConfig(activation, tq.default_per_channel_weight_fake_quant),
        "per-tensor": tq.QConfig(activation, tq.default_weight_fake_quant),
        "fx-per-channel": tq.QConfig(activation, tq.default_per_channel_weight_fake_quant),
        # fbgemm's default: 7-bit activations, exported as Q -> Clip(0, 127) -> DQ
        "reduce-range": tq.get_default_qat_qconfig("fbgemm", version=0),
    }


def _train_and_export(prepare, qconfig, steps: int, path: Path, splits):
    """Export the QAT model to ``path``; return its fake-quant logits on the test split and
    the scale of the Q feeding them."""
    torch.manual_seed(0)
    model, output_quant = prepare(qconfig, torch.from_numpy(splits.train_x[:2]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.from_numpy(splits.train_x), torch.from_numpy(splits.train_y)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.apply(tq.disable_observer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x[:2],),
            str(path),
            dynamo=False,
            opset_version=13,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    with torch.no_grad():
        logits = model(torch.from_numpy(splits.test_x)).numpy()
    return logits, float(output_quant(model).scale)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, float]]:
    """Each qconfig's export, torch logits on the test split, and the logits' Q scale."""
    splits = load_digits_splits()
    folder = tmp_path_factory.mktemp("torch_ao_qat")
    out = {}
    for name, qconfig in _qconfigs().items():
        path = folder / f"{name}.onnx"
        prepare = PREPARE.get(name, _prepare_eager)
        out[name] = (path, *_train_and_export(prepare, qconfig, TRAIN_STEPS[name], path, splits))
    out["test_x"], out["test_y"] = splits.test_x, splits.test_y
    return out


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(path, exact_int8=True).run(None, {"input": x})[0]


@pytest.mark.parametrize("scheme", ["per-channel", "per-tensor", "fx-per-channel"])
def test_torch_ao_qat_model_is_finished_without_data(exported, scheme, tmp_path):
    source, logits, step = exported[scheme]
    out, summary = tmp_path / "int8.onnx", tmp_path / "summary.json"
    result = _invoke("quantize", source, "-o", out, "--summary-json", summary)
    assert result.exit_code == 0, result.output
    assert "finished from the model's own Q/DQ (no calibration)" in result.output
    onnx.checker.check_model(str(out), full_check=True)
    conv = next(f for f in inspect_model(out).families if f.family == "Conv")
    assert conv.total == 3 and conv.int8_count == 3, conv.describe()
    assert out.stat().st_size <= 0.30 * source.stat().st_size
    ort_logits = _run(out, exported["test_x"])
    steps = np.abs(ort_logits - logits) / step
    assert np.mean(steps <= 1.0 + 1e-3) >= 0.99, np.quantile(steps, [0.5, 0.99, 1.0])
    assert np.mean(ort_logits.argmax(1) == exported["test_y"]) >= 0.9  # it learned digits
    report = json.loads(summary.read_text())
    changes = report["finished"]["changes"]
    assert len(changes["fold-weight"]) == 4  # 3 Convs and the Linear
    # every Conv's bias; FX also quantizes the Linear's output, so its bias too
    assert sum(name.endswith("/Conv") for name in changes["int32-bias"]) == 3
    assert len(changes["fold-affine"]) == 6  # each ConvBn: Div, BatchNormalization
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata["onnxq.source"] == "qdq" and "fold-weight" in metadata["onnxq.finished"]


def test_reduce_range_activations_are_kept_exact_and_block_the_convs(exported, tmp_path):
    source, logits, step = exported["reduce-range"]
    out = tmp_path / "int8.onnx"
    result = _invoke("quantize", source, "-o", out)
    assert result.exit_code == 0, result.output
    blocked = [line for line in result.output.splitlines() if line.startswith("blocked:")]
    assert sum("after Conv" in line and "not exact" in line for line in blocked) == 3
    conv = next(f for f in inspect_model(out).families if f.family == "Conv")
    assert conv.int8_count == 0
    steps = np.abs(_run(out, exported["test_x"]) - logits) / step
    assert np.mean(steps <= 1.0 + 1e-3) >= 0.99


def test_calibration_data_with_a_qdq_model_is_refused(exported, tmp_path):
    source = exported["per-channel"][0]
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=exported["test_x"][:8])
    out = tmp_path / "int8.onnx"
    result = _invoke("quantize", source, "-o", out, "--calib", calib)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "carries its own qparams" in line and "drop --calib" in line
    assert not out.exists()


def test_unfinishable_qdq_model_exits_2_without_output(tmp_path):
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, float s) => (float[N, 4] y) {
      q = QuantizeLinear(x, s)
      y = DequantizeLinear(q, s)
    }
    """)
    source, out = tmp_path / "bad.onnx", tmp_path / "int8.onnx"
    onnx.save(model, source)
    result = _invoke("quantize", source, "-o", out)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "'QuantizeLinear -> q'" in line and "not a constant" in line
    assert not out.exists()


def test_pt2e_qat_model_from_the_dynamo_exporter(tmp_path):
    """torchao's pt2e QAT (X86InductorQuantizer) exported with ``dynamo=True``: weights as
    ``Q(float W) -> Clip -> DQ``, Q/DQ on every Conv/Linear input and output."""
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    x86 = pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    splits = load_digits_splits()
    torch.manual_seed(0)
    x = torch.from_numpy(splits.test_x[:8])
    module = torch.export.export(DigitsCNN().eval(), (x,)).module()
    quantizer = x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config(is_qat=True)
    )
    prepared = pt2e.prepare_qat_pt2e(module, quantizer)
    for start in range(0, 64, 8):  # observers see a few training batches
        prepared(torch.from_numpy(splits.train_x[start : start + 8]))
    converted = pt2e.convert_pt2e(prepared, fold_quantize=False)
    source, out = tmp_path / "pt2e.onnx", tmp_path / "int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            converted, (x,), str(source), dynamo=True, verbose=False, input_names=["input"]
        )
    result = _invoke("quantize", source, "-o", out)
    assert result.exit_code == 0, result.output
    conv = next(f for f in inspect_model(out).families if f.family == "Conv")
    assert conv.int8_count == conv.total == 3, conv.describe()
    # the dynamo exporter writes its weights beside the model and a stack trace into every
    # node's metadata (kept): compare the weights
    weights = [
        sum(i.ByteSize() for i in onnx.load(str(p)).graph.initializer) for p in (source, out)
    ]
    assert weights[1] <= 0.30 * weights[0]
    with torch.no_grad():
        expected = converted(x).numpy()
    steps = np.abs(_run(out, x.numpy()) - expected) / _last_q_scale(onnx.load(str(out)))
    assert np.mean(steps <= 1.0 + 1e-3) >= 0.99, np.quantile(steps, [0.5, 0.99, 1.0])


def _last_q_scale(model: onnx.ModelProto) -> float:
    """The scale of the DQ feeding the model's last Gemm (its output is float)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    gemm = [node for node in model.graph.node if node.op_type == "Gemm"][-1]
    return float(inits[producers[gemm.input[0]].input[1]])
