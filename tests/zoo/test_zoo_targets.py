"""Every zoo model quantized for TensorRT and QNN meets the target's rules (``onnxq check``,
through the CLI) and stays accurate. Neither runtime runs here: accuracy is measured in ONNX
Runtime CPU on the float (fake-quant) graph, which is what an exact int8 runtime computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from support import run, sqnr_db

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from calibration.images import eval_inputs, resnet_inputs  # noqa: E402
from models.digits_cnn import train_digits_cnn  # noqa: E402
from models.lstm import as_sequences, train_lstm  # noqa: E402
from models.resnet import resnet18_factory  # noqa: E402
from onnxq.cli import main  # noqa: E402
from onnxq.config import QuantConfig  # noqa: E402
from onnxq.evaluate import cosine_per_sample  # noqa: E402
from onnxq.export import export_torch  # noqa: E402
from onnxq.model_io import save_model  # noqa: E402
from onnxq.pipeline import quantize  # noqa: E402

TARGETS = ("tensorrt", "qnn")
# model -> SQNR floor in dB against fp32 (tensorrt, qnn); MiniLM is held to cosine instead.
# Measured (nearest rounding): digits 35.2 / 36.0, lstm 56.4 / 56.7, resnet 25.3 / 28.3.
FLOORS = {"digits": (31.0, 32.0), "lstm": (48.0, 48.0), "resnet": (22.0, 25.0)}


@pytest.fixture(scope="module")
def zoo(splits, tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """name -> (fp32 path, calibration feed, evaluation feed)."""
    folder = tmp_path_factory.mktemp("zoo_targets")
    digits = train_digits_cnn(splits.train_x, splits.train_y, seed=0, epochs=5)
    lstm = train_lstm(splits.train_x, splits.train_y, seed=0, epochs=3)
    resnet, _ = resnet18_factory()
    entries = {
        "digits": (digits, splits.calib_x[:64], splits.test_x[:128]),
        "lstm": (lstm, as_sequences(splits.calib_x[:64]), as_sequences(splits.test_x[:128])),
        "resnet": (resnet, resnet_inputs(8), eval_inputs(4)),
    }
    out = {}
    for name, (module, calib, evaluation) in entries.items():
        path = folder / f"{name}.onnx"
        export_torch(module.eval(), torch.from_numpy(calib[:2]), path)
        out[name] = (path, {"input": calib}, {"input": evaluation})
    return out


def _quantize_and_check(path: Path, calib: dict, target: str, tmp_path: Path) -> onnx.ModelProto:
    model = quantize(path, calib, QuantConfig(target=target, weight_rounding="nearest"))
    out = tmp_path / f"{path.stem}.{target}.onnx"
    save_model(model, out)
    result = CliRunner().invoke(main, ["check", str(out), "--target", target])
    assert result.exit_code == 0, result.output
    return model


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(FLOORS))
def test_zoo_model_meets_the_target_and_stays_accurate(zoo, name, target, tmp_path):
    path, calib, evaluation = zoo[name]
    model = _quantize_and_check(path, calib, target, tmp_path)
    reference = run(path, evaluation)[0]
    quality = sqnr_db(reference, run(model, evaluation, fused=False)[0])
    assert quality >= FLOORS[name][TARGETS.index(target)], quality


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_minilm_meets_the_target_and_stays_accurate(minilm_fp32, target, tmp_path):
    from calibration.text import calibration_sentences, encode, evaluation_sentences

    path, tokenizer = minilm_fp32
    calib = encode(calibration_sentences(32), tokenizer)
    evaluation = encode(evaluation_sentences(48), tokenizer)
    model = _quantize_and_check(path, calib, target, tmp_path)
    cosine = cosine_per_sample(run(path, evaluation)[0], run(model, evaluation, fused=False)[0])
    # measured: tensorrt 0.9962, qnn 0.9987 (16-bit activations take SmoothQuant alpha 0.1)
    assert cosine.mean() >= {"tensorrt": 0.99, "qnn": 0.995}[target], cosine.mean()
    assert np.isfinite(cosine).all()
