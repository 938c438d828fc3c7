"""Models over protobuf's 2 GB limit are written with external data, atomically (the limit is
lowered so a small model stands in for a large one)."""

from __future__ import annotations

import numpy as np
from support import run, small_cnn

import onnxq.model_io as model_io
from onnxq.model_io import load_model, save_model


def test_over_the_limit_written_with_external_data(tmp_path, monkeypatch):
    model = small_cnn()
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    expected = run(model, feed)[0]
    sizes = [len(init.raw_data) for init in model.graph.initializer]
    external = sum(size for size in sizes if size >= model_io.EXTERNAL_THRESHOLD)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)  # this small model is "over 2 GB"
    out = tmp_path / "big.onnx"
    save_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert external and (tmp_path / "big.onnx.data").stat().st_size == external
    np.testing.assert_array_equal(run(load_model(out), feed)[0], expected)
