"""Shared fixtures (models and data are built by ``support``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings
from support import make_cnn

# Property tests draw the same examples on every run, so a clean-clone CI run is reproducible;
# explore new ones with ``pytest --hypothesis-profile=default``.
settings.register_profile("reproducible", derandomize=True)
settings.load_profile("reproducible")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def cnn(rng: np.random.Generator) -> onnx.ModelProto:
    return make_cnn(rng)


@pytest.fixture
def cnn_path(tmp_path: Path, cnn: onnx.ModelProto) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn, path)
    return path


@pytest.fixture
def cnn_calib(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((24, 3, 16, 16)).astype(np.float32)}
