"""``onnxq.qat.ops`` against ONNX Runtime, for the ops a Hugging Face BERT export adds to the
zoo's set (position ids and the attention mask) and Flatten at the ends of its axis range (the
mask is flattened with ``axis = rank``): each one-node model written in ONNX text runs in ORT
and through its torch implementation on the same inputs; results must be equal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from onnxq.qat.ops import OPS  # noqa: E402


def _ort(text: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _torch(op: str, feeds: dict[str, np.ndarray], **attrs) -> np.ndarray:
    return OPS[op]([torch.from_numpy(v) for v in feeds.values()], attrs).numpy()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_with_negative_indices(axis) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3, 5)).astype(np.float32)
    size = data.shape[axis]
    index = rng.integers(-size, size, (3, 4) if axis in (1, -1) else (2, 5)).astype(np.int64)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 5] data, int64{list(index.shape)} index) => (float{list(index.shape)} y) {{
        y = GatherElements<axis = {axis}>(data, index)
    }}"""
    feeds = {"data": data, "index": index}
    np.testing.assert_array_equal(_torch("GatherElements", feeds, axis=axis), _ort(text, feeds))


@pytest.mark.parametrize(
    ("dtype", "start", "limit", "delta"),
    [("int64", 0, 7, 1), ("int64", 10, 1, -3), ("float", 0.5, 2.0, 0.25), ("int64", 5, 5, 1)],
)
def test_range(dtype, start, limit, delta) -> None:
    np_type = np.int64 if dtype == "int64" else np.float32
    values = (start, limit, delta)
    feeds = {k: np.array(v, dtype=np_type) for k, v in zip("sld", values, strict=True)}
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({dtype} s, {dtype} l, {dtype} d) => ({dtype}[N] y) {{
        y = Range(s, l, d)
    }}"""
    got = _torch("Range", feeds)
    expected = _ort(text, feeds)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("op", "dtype"), [("GreaterOrEqual", "int64"), ("And", "bool")])
def test_broadcast_comparison_and_logic(op, dtype) -> None:
    rng = np.random.default_rng(1)
    if dtype == "bool":
        a, b = rng.random((2, 1, 4)) > 0.5, rng.random((3, 1)) > 0.5
    else:
        a, b = rng.integers(-2, 3, (2, 1, 4)), rng.integers(-2, 3, (3, 1))
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({dtype}[2, 1, 4] a, {dtype}[3, 1] b) => (bool[2, 3, 4] y) {{
        y = {op}(a, b)
    }}"""
    feeds = {"a": a, "b": b}
    np.testing.assert_array_equal(_torch(op, feeds), _ort(text, feeds))


@pytest.mark.parametrize("axis", [-3, -1, 0, 1, 3])
def test_flatten_over_the_whole_axis_range(axis) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[A, B] y) {{
        y = Flatten<axis = {axis}>(x)
    }}"""
    feeds = {"x": x}
    got, expected = _torch("Flatten", feeds, axis=axis), _ort(text, feeds)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
