"""Models over protobuf's 2 GB limit: read with their external data, quantized, and written with
external data where the result is still over the limit, atomically (there the limit is lowered so
a small model stands in for a large one)."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from support import run, small_cnn, sqnr_db

import onnxq.model_io as model_io
import onnxq.runtime
from onnxq.config import QuantConfig, WeightRounding
from onnxq.dynamic import quantize_dynamic
from onnxq.errors import ConfigError
from onnxq.model_io import load_model, save_model
from onnxq.pipeline import quantize


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


# Three MatMul weights of float32, 2.25 GiB in all: over protobuf's 2 GB limit for real.
LAYERS = ((16384, 12288), (12288, 16384), (16384, 12288))


def _write_large_model(folder: Path) -> Path:
    """``x[N, 16384] -> MatMul x3 -> y``, its weights streamed into ``big.onnx.data`` a block of
    rows at a time (never one whole weight in memory) and referenced as external data."""
    data = folder / "big.onnx.data"
    weights, offset = [], 0
    with data.open("wb") as handle:
        for index, (rows, cols) in enumerate(LAYERS):
            for block in _weight_blocks(index, rows, cols):
                handle.write(block.tobytes())
            tensor = onnx.TensorProto(
                name=f"W{index}", data_type=onnx.TensorProto.FLOAT, dims=[rows, cols],
                data_location=onnx.TensorProto.EXTERNAL,
            )  # fmt: skip
            for key, value in (("location", data.name), ("offset", offset)):
                tensor.external_data.add(key=key, value=str(value))
            tensor.external_data.add(key="length", value=str(rows * cols * 4))
            weights.append(tensor)
            offset += rows * cols * 4
    names = ["x", *(f"h{i}" for i in range(1, len(LAYERS))), "y"]
    nodes = [
        oh.make_node("MatMul", [names[i], f"W{i}"], [names[i + 1]]) for i in range(len(LAYERS))
    ]
    graph = oh.make_graph(
        nodes, "large",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", LAYERS[0][0]])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", LAYERS[-1][1]])],
        weights,
    )  # fmt: skip
    path = folder / "big.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
    return path


def _weight_blocks(index: int, rows: int, cols: int, block: int = 2048):
    rng = np.random.default_rng(index)
    scale = np.float32(1 / np.sqrt(rows))
    for start in range(0, rows, block):
        yield rng.standard_normal((min(block, rows - start), cols), dtype=np.float32) * scale


def _reference(model_path: Path, x: np.ndarray) -> np.ndarray:
    """fp32 outputs from the weights on disk (memory-mapped: no second copy in memory)."""
    data, offset = model_path.with_name("big.onnx.data"), 0
    for rows, cols in LAYERS:
        x = x @ np.memmap(data, np.float32, "r", offset, (rows, cols))
        offset += rows * cols * 4
    return x


@pytest.fixture(scope="module")
def large_model(tmp_path_factory) -> Path:
    source = _write_large_model(tmp_path_factory.mktemp("large"))
    assert source.with_name("big.onnx.data").stat().st_size > model_io.PROTOBUF_LIMIT
    return source


# SQNR floors: three stacked int8 layers (7-bit weights on this target) measure 28.7 dB dynamic
# (run-time activation ranges), 22.0 dB static (ranges from 16 random rows).
FLOORS_DB = {"dynamic": 25.0, "static": 19.0}


@pytest.mark.slow
@pytest.mark.parametrize("mode", FLOORS_DB)
def test_model_over_2gb_quantized_written_and_accurate(large_model, mode, tmp_path):
    """Static calibrates a 2.25 GiB model in ONNX Runtime (~90 s, ~12 GiB peak with nearest
    rounding; GPTQ's 16384-wide Hessians take minutes more); dynamic needs no data."""
    out = tmp_path / "q.onnx"
    rows = np.random.default_rng(0).standard_normal((18, LAYERS[0][0])).astype(np.float32)
    if mode == "static":
        config = QuantConfig(weight_rounding=WeightRounding.NEAREST)
        save_model(quantize(large_model, {"x": rows[:16]}, config), out)
    else:
        save_model(quantize_dynamic(large_model), out)
    assert out.stat().st_size < model_io.PROTOBUF_LIMIT  # int8: one file again
    x = rows[16:]
    assert sqnr_db(_reference(large_model, x), run(out, {"x": x})[0]) > FLOORS_DB[mode]
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gib < 16, f"peak RSS {peak_gib:.1f} GiB"


QUANTIZERS = {
    "static": quantize,
    "dynamic": lambda model, data: quantize_dynamic(model, calibration_data=data),
}


@pytest.mark.parametrize("mode", QUANTIZERS)
def test_a_model_over_the_limit_runs_on_data_through_external_data(mode, monkeypatch):
    """Calibration, smoothing and quality checks hand a model over 2 GB to ONNX Runtime as a
    temporary file with external data: with the limit lowered, the same model comes out."""
    model = small_cnn()
    data = {"x": np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)}
    expected = QUANTIZERS[mode](model, data)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    opened = []

    def spy(proto):
        opened.append(proto)
        return model_io.runnable_path(proto)

    monkeypatch.setattr(onnxq.runtime, "runnable_path", spy)
    quantized = QUANTIZERS[mode](model, data)
    assert opened, "no session went through external data"
    assert quantized.graph.SerializeToString() == expected.graph.SerializeToString()


def test_calibration_over_the_limit_refuses_several_workers_in_one_line(monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    feed = {"x": np.zeros((2, 3, 8, 8), np.float32)}
    with pytest.raises(ConfigError, match="one \\(--workers 1\\)") as refusal:
        quantize(small_cnn(), feed, workers=2)
    assert "\n" not in str(refusal.value)
