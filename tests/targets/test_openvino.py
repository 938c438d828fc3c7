"""``--target openvino`` proven in OpenVINO's CPU plugin: every weighted layer of a CNN and of a
ViT-style transformer runs u8/i8 in the runtime model, SQNR vs fp32 >= 30 dB (measured in
OpenVINO). Latency is a benchmark (``benchmarks/openvino_target.py``), not a test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from support import make_cnn, sqnr_db

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

from models.vit import VIT_TINY, build_vit  # noqa: E402
from onnxq.cli import main  # noqa: E402
from onnxq.config import QuantConfig  # noqa: E402
from onnxq.export import export_torch  # noqa: E402
from onnxq.pipeline import quantize  # noqa: E402
from onnxq.targets.check import check_model  # noqa: E402
from onnxq.targets.openvino import run_model, runtime_precisions, time_models  # noqa: E402

SQNR_FLOOR_DB = 30.0


def _data(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str, tuple]]:
    """name -> (fp32 path, ``--target openvino`` path, input name, image shape)."""
    folder = tmp_path_factory.mktemp("openvino")
    cnn = folder / "cnn.onnx"
    onnx.save(make_cnn(np.random.default_rng(0)), cnn)
    vit = folder / "vit.onnx"
    shape = (3, VIT_TINY.image, VIT_TINY.image)
    export_torch(build_vit(VIT_TINY), torch.from_numpy(_data(shape, 1, 0)), vit)
    out = {}
    for name, path, input_name, image in (
        ("cnn", cnn, "x", (3, 16, 16)),
        ("vit", vit, "input", shape),
    ):
        quantized = path.with_suffix(".openvino.onnx")
        calib = {input_name: _data(image, 32, 1)}
        onnx.save(quantize(path, calib, QuantConfig(target="openvino")), quantized)
        out[name] = (path, quantized, input_name, image)
    return out


@pytest.mark.parametrize(("name", "weighted"), [("cnn", 4), ("vit", 10)])
def test_every_weighted_layer_runs_int8(models, name: str, weighted: int) -> None:
    _, quantized, _, _ = models[name]
    report = runtime_precisions(quantized, inference_precision="f32")
    assert len(report.weighted) == weighted
    assert report.float_layers == [], [layer.name for layer in report.float_layers]
    assert {layer.precision for layer in report.weighted} <= {"u8", "i8"}


def test_fp32_model_runs_float(models) -> None:
    fp32, _, _, _ = models["vit"]
    report = runtime_precisions(fp32, inference_precision="f32")
    assert len(report.weighted) == 10 and report.integer_layers == []


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_sqnr_in_openvino(models, name: str) -> None:
    fp32, quantized, input_name, image = models[name]
    feed = {input_name: _data(image, 8, 2)}
    assert sqnr_db(run_model(fp32, feed)[0], run_model(quantized, feed)[0]) >= SQNR_FLOOR_DB


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_meets_openvino_rules(models, name: str) -> None:
    report = check_model(models[name][1], "openvino")
    assert report.ok, [v.describe() for v in report.violations]


def test_patch_embedding_conv_keeps_a_float_output(models) -> None:
    """OpenVINO's Convolution writes float: no Q on a Conv output that only float ops read (an
    ORT target quantizes it, because QLinearConv needs an output Q)."""
    fp32, quantized, input_name, image = models["vit"]
    conv_output = next(n.output[0] for n in onnx.load(fp32).graph.node if n.op_type == "Conv")
    quantized_inputs = {
        n.input[0] for n in onnx.load(quantized).graph.node if n.op_type == "QuantizeLinear"
    }
    assert conv_output not in quantized_inputs
    ort_cpu = quantize(fp32, {input_name: _data(image, 8, 1)}, QuantConfig(target="ort-cpu"))
    assert conv_output in {n.input[0] for n in ort_cpu.graph.node if n.op_type == "QuantizeLinear"}


def test_time_models_measures_each_model(models) -> None:
    fp32, quantized, input_name, image = models["cnn"]
    latencies = time_models(
        [fp32, quantized], {input_name: _data(image, 1, 3)}, rounds=2, runs_per_round=2
    )
    assert [latency.path for latency in latencies] == [str(fp32), str(quantized)]
    assert all(latency.runs == 4 and latency.median_ms > 0 for latency in latencies)


def test_inspect_shows_openvino_precisions(models, tmp_path: Path) -> None:
    out_json = tmp_path / "ov.json"
    args = ["inspect", str(models["cnn"][1]), "--target", "openvino", "--json", str(out_json)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "weighted layers: 4 of 4 run u8/i8" in result.output
    data = json.loads(out_json.read_text())
    assert data["integer"] == 4 and data["float"] == 0


def test_inspect_names_a_runtime_that_cannot_run_here(models) -> None:
    result = CliRunner().invoke(main, ["inspect", str(models["cnn"][1]), "--target", "tensorrt"])
    assert result.exit_code == 0
    assert result.output.strip().splitlines() == [
        "tensorrt does not run on this machine; inspect can ask onnxruntime, openvino"
    ]
