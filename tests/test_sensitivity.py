"""Layer sensitivity and accuracy-target quantization."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from support import run

from onnxq.cli import main
from onnxq.config import QuantConfig
from onnxq.errors import ConfigError
from onnxq.sensitivity import analyze_sensitivity, quantize_to_target


@pytest.fixture
def eval_data(rng):
    return {"x": rng.standard_normal((16, 3, 16, 16)).astype(np.float32)}


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_every_anchor_is_ranked(cnn, cnn_calib, eval_data):
    report = analyze_sensitivity(cnn, cnn_calib, eval_data, QuantConfig())
    assert {layer.name for layer in report.layers} == {"conv1", "conv2", "conv3", "fc"}
    assert report.fp32 == pytest.approx(1.0)
    assert 0.9 < report.int8 < 1.0
    gains = [layer.gain for layer in report.layers]
    assert gains == sorted(gains, reverse=True)
    assert all(np.isfinite(layer.output_sqnr_db) for layer in report.layers)


def test_target_leaves_the_fewest_layers_float(cnn, cnn_calib, eval_data):
    all_int8 = analyze_sensitivity(cnn, cnn_calib, eval_data).int8
    goal = all_int8 + 0.5 * (1.0 - all_int8)
    result = quantize_to_target(cnn, cnn_calib, eval_data, min_cosine=goal)
    floated = [d for d in result.report.decisions if "left float to meet" in d.reason]
    assert 1 <= len(floated) < 4
    x = eval_data["x"]
    assert _mean_cosine(run(cnn, {"x": x})[0], run(result.model, {"x": x})[0]) >= goal - 1e-6
    assert any("reached" in note for note in result.report.notes)


def test_unreachable_target_is_a_clear_error(cnn, cnn_calib, eval_data):
    with pytest.raises(ConfigError, match="relax the target"):
        quantize_to_target(cnn, cnn_calib, eval_data, min_cosine=1.5)


def test_sensitivity_cli(cnn_path, cnn_calib, eval_data, tmp_path):
    calib, evaluation = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, **cnn_calib)
    np.savez(evaluation, **eval_data)
    result = CliRunner().invoke(
        main, ["sensitivity", str(cnn_path), "--calib", str(calib), "--eval", str(evaluation)]
    )
    assert result.exit_code == 0, result.output
    assert "conv1" in result.output and "gain if float" in result.output
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(cnn_path),
            "-o",
            str(out),
            "--calib",
            str(calib),
            "--eval",
            str(evaluation),
            "--min-cosine",
            "0.9",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.exists() and "target cosine" in result.output
