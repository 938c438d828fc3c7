"""Calibration data readers: every source kind, batching rules, and every validation error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxq.calibration.readers import FeedStream, batch_files, load_batch, open_feeds
from onnxq.errors import CalibrationDataError, ConfigError
from onnxq.model_io import input_specs

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _specs(signature: str):
    model = onnx.parser.parse_model(f"{HEADER}\nagraph ({signature}) => (float y) {{ y = f() }}")
    return input_specs(model)


# x[N,3,4,4] float and ids[N,7] int64: a dynamic-batch two-input model.
TWO = _specs("float[N,3,4,4] x, int64[N,7] ids")
ONE = _specs("float[N,3] x")
STATIC = _specs("float[1,3] x")
STATIC2 = _specs("float[2,3] x")
WITH_SCALAR = _specs("float[N,2] x, float t")

RNG = np.random.default_rng(0)


def _two(n: int) -> dict[str, np.ndarray]:
    return {
        "x": RNG.standard_normal((n, 3, 4, 4)).astype(np.float32),
        "ids": RNG.integers(0, 100, (n, 7)).astype(np.int64),
    }


def _one(n: int) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((n, 3)).astype(np.float32)}


def _raises(make, *fragments: str) -> str:
    """Run ``make`` (and drain it if it returns a stream); the error must be one line."""
    with pytest.raises(CalibrationDataError) as info:
        result = make()
        if isinstance(result, FeedStream):
            list(result)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --- 1. .npz file, 3. mapping --------------------------------------------------------------------


def test_npz_file_is_split_along_batch_axis_with_partial_last_batch(tmp_path: Path) -> None:
    data = _two(10)
    np.savez(tmp_path / "calib.npz", **data)
    stream = open_feeds(tmp_path / "calib.npz", TWO, batch_size=4)
    batches = list(stream)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(list(b) == ["x", "ids"] for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), data["x"])
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), data["ids"])
    assert stream.samples_seen == 10
    again = list(stream)  # a file can be read again
    assert stream.reiterable and len(again) == 3
    np.testing.assert_array_equal(again[2]["ids"], data["ids"][8:])


def test_fixed_batch_dim_overrides_batch_size() -> None:
    data = _one(3)
    batches = list(open_feeds(data, STATIC, batch_size=8))
    assert [b["x"].shape for b in batches] == [(1, 3)] * 3
    np.testing.assert_array_equal(batches[1]["x"], data["x"][1:2])


def test_fixed_batch_dim_that_does_not_divide_the_samples_is_an_error() -> None:
    _raises(lambda: open_feeds(_one(3), STATIC2), "3 samples", "batches of 2", "'x'")


def test_batch_axis_is_first_symbolic_dim() -> None:
    specs = _specs("float[3,N] x")
    data = {"x": np.arange(15, dtype=np.float32).reshape(3, 5)}
    batches = list(open_feeds(data, specs, batch_size=2))
    assert [b["x"].shape for b in batches] == [(3, 2), (3, 2), (3, 1)]
    np.testing.assert_array_equal(batches[1]["x"], data["x"][:, 2:4])


def test_mapping_scalar_input_goes_with_every_batch() -> None:
    data = {"x": np.ones((5, 2), np.float32), "t": np.float32(0.5)}
    batches = list(open_feeds(data, WITH_SCALAR, batch_size=2))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b["t"].shape == () and b["t"] == np.float32(0.5) for b in batches)


def test_mapping_inputs_with_different_sample_counts() -> None:
    data = {**_two(4), "ids": np.zeros((3, 7), np.int64)}
    _raises(lambda: open_feeds(data, TWO), "different numbers of samples", "x: 4", "ids: 3")


def test_npz_file_missing_key_and_positional_savez(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", _one(4)["x"])
    _raises(lambda: open_feeds(tmp_path / "a.npz", ONE), "missing input 'x'", "arr_0", "np.savez")


def test_npz_file_with_wrong_rank_cannot_be_split() -> None:
    data = {"x": np.ones(4, np.float32)}
    _raises(lambda: open_feeds(data, ONE), "input 'x' (mapping)", "expected rank 2", "rank 1")


# --- 2. folders ----------------------------------------------------------------------------------


def test_folder_of_npz_feeds_in_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        np.savez(tmp_path / f"f{i}.npz", x=np.full((i, 2), i, np.float32), t=np.float32(i))
    stream = open_feeds(tmp_path, WITH_SCALAR, batch_size=1)
    batches = list(stream)
    assert [b["x"].shape[0] for b in batches] == [1, 2, 10]  # whole files, never split
    assert [float(b["t"]) for b in batches] == [1.0, 2.0, 10.0]
    assert stream.samples_seen == 13 and len(list(stream)) == 3


def test_glob_reads_the_matching_files_like_a_folder(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        np.save(tmp_path / f"part-{i}.npy", np.full((i, 3), i, np.float32))
    np.save(tmp_path / "other.npy", np.zeros((1, 3), np.float32))
    pattern = str(tmp_path / "part-*.npy")
    assert [b["x"].shape[0] for b in open_feeds(pattern, ONE)] == [1, 2, 10]
    files, _ = batch_files(pattern, ONE)
    assert [f.path.name for f in files] == ["part-1.npy", "part-2.npy", "part-10.npy"]
    assert load_batch(files[2], ONE, 2)["x"].shape == (10, 3)
    assert batch_files(tmp_path / "part-1.npy", ONE) is None  # one file is not a glob
    with pytest.raises(CalibrationDataError, match=r"matches no \.npz or \.npy files"):
        open_feeds(str(tmp_path / "none-*.npz"), ONE)
    np.savez(tmp_path / "part-3.npz", x=np.zeros((1, 3), np.float32))
    with pytest.raises(CalibrationDataError, match=r"matches both \.npz and \.npy"):
        open_feeds(pattern.replace(".npy", ".np*"), ONE)


def test_folder_of_npy_for_single_input(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.full((2, 3), i, np.float32))
    batches = list(open_feeds(str(tmp_path), ONE))
    assert [float(b["x"][0, 0]) for b in batches] == [0.0, 1.0, 2.0]
    _raises(lambda: open_feeds(tmp_path, TWO), "single-input", "2 inputs", "x, ids")


def test_onnx_test_data_set_layout(tmp_path: Path) -> None:
    data = _two(2)

    def write(folder: Path, index: int, array: np.ndarray, name: str | None = None) -> None:
        folder.mkdir(exist_ok=True)
        tensor = numpy_helper.from_array(array, name=name)
        (folder / f"input_{index}.pb").write_bytes(tensor.SerializeToString())

    # set 0: unnamed tensors map by file index; set 1: named tensors map by name, in any order
    write(tmp_path / "test_data_set_0", 0, data["x"][:1])
    write(tmp_path / "test_data_set_0", 1, data["ids"][:1])
    write(tmp_path / "test_data_set_1", 0, data["ids"][1:], "ids")
    write(tmp_path / "test_data_set_1", 1, data["x"][1:], "x")
    (tmp_path / "model.onnx").write_bytes(b"other files are ignored")
    stream = open_feeds(tmp_path, TWO)
    feeds = list(stream)
    assert len(feeds) == 2 and stream.samples_seen == 2
    for i, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["x"], data["x"][i : i + 1])
        np.testing.assert_array_equal(feed["ids"], data["ids"][i : i + 1])
    # a named tensor and an unnamed one landing on the same input
    write(tmp_path / "test_data_set_1", 0, data["x"][1:])
    _raises(lambda: open_feeds(tmp_path, TWO), "input_1.pb", "second tensor for input 'x'")


def test_test_data_set_unnamed_index_out_of_range(tmp_path: Path) -> None:
    (tmp_path / "input_1.pb").write_bytes(
        numpy_helper.from_array(np.ones((1, 3), np.float32)).SerializeToString()
    )
    _raises(lambda: open_feeds(tmp_path, ONE), "input_1.pb", "index 1", "1 input")


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "input_0.pb").write_bytes(b"\xff\xff not protobuf")
    _raises(lambda: open_feeds(tmp_path, ONE), "input_0.pb", "cannot read TensorProto")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    _raises(lambda: open_feeds(tmp_path / "bad.npz", ONE), "bad.npz", "cannot read .npz")


def test_folder_errors(tmp_path: Path) -> None:
    _raises(lambda: open_feeds(tmp_path, ONE), "no calibration data")
    np.save(tmp_path / "a.npy", np.ones((1, 3), np.float32))
    np.savez(tmp_path / "b.npz", x=np.ones((1, 3), np.float32))
    _raises(lambda: open_feeds(tmp_path, ONE), "mixes", "*.npz", "*.npy")
    _raises(lambda: open_feeds(tmp_path / "nope", ONE), "nope", "does not exist")
    _raises(lambda: open_feeds(tmp_path / "a.npy", ONE), "a.npy", "unsupported calibration file")


# --- 4. get_next readers, 6. iterables -----------------------------------------------------------


class Reader:
    """ONNX Runtime's CalibrationDataReader protocol."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


class RewindReader(Reader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.all = feeds
        super().__init__(feeds)

    def rewind(self) -> None:
        self.feeds = iter(self.all)


def test_list_is_reiterable_and_counts_samples() -> None:
    feeds = [_two(2), _two(3)]
    stream = open_feeds(feeds, TWO)
    assert [b["x"].shape[0] for b in stream] == [2, 3]
    assert stream.samples_seen == 5
    assert [b["x"].shape[0] for b in stream] == [2, 3]


def test_generator_is_one_shot() -> None:
    stream = open_feeds((f for f in [_one(2), _one(2)]), ONE)
    assert not stream.reiterable and len(list(stream)) == 2
    _raises(lambda: iter(stream), "one-shot", "already read")


def test_get_next_reader_is_one_shot_unless_it_rewinds() -> None:
    stream = open_feeds(Reader([_one(1), _one(2)]), ONE)
    assert [b["x"].shape[0] for b in stream] == [1, 2]
    _raises(lambda: iter(stream), "Reader", "one-shot")
    rewinding = open_feeds(RewindReader([_one(1), _one(2)]), ONE)
    assert len(list(rewinding)) == 2 and len(list(rewinding)) == 2


def test_empty_sources() -> None:
    _raises(lambda: open_feeds([], ONE), "calibration data is empty")
    _raises(lambda: open_feeds(Reader([]), ONE), "calibration data is empty")
    _raises(lambda: open_feeds({"x": np.ones((0, 3), np.float32)}, ONE), "empty")


def test_unsupported_sources() -> None:
    _raises(lambda: open_feeds(42, ONE), "unsupported", "int")
    _raises(lambda: open_feeds(np.ones((2, 3), np.float32), ONE), "bare ndarray", "dict")
    with pytest.raises(ConfigError):
        open_feeds([_one(1)], ONE, batch_size=0)
    with pytest.raises(ConfigError):
        open_feeds([_one(1)], ONE, max_samples=0)


# --- max_samples ---------------------------------------------------------------------------------


def test_max_samples_slices_the_last_batch(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", **_two(10))
    stream = open_feeds(tmp_path / "c.npz", TWO, batch_size=4, max_samples=6)
    batches = list(stream)
    assert [(b["x"].shape[0], b["ids"].shape[0]) for b in batches] == [(4, 4), (2, 2)]
    assert stream.samples_seen == 6


def test_max_samples_stops_without_consuming_more() -> None:
    source = iter([_one(2), _one(2), _one(2)])
    stream = open_feeds(source, ONE, max_samples=4)
    assert len(list(stream)) == 2
    assert next(source)["x"].shape == (2, 3)  # the third batch was never pulled


def test_max_samples_does_not_slice_a_fixed_batch_dim() -> None:
    stream = open_feeds([{"x": np.ones((2, 3), np.float32)}] * 3, STATIC2, max_samples=3)
    assert [b["x"].shape for b in stream] == [(2, 3), (2, 3)]
    assert stream.samples_seen == 4


# --- validation of every feed --------------------------------------------------------------------


def _bad(**changes: object) -> list[dict[str, object]]:
    """Batch 0 fine, batch 1 changed."""
    bad = {**_two(2), **changes}
    return [_two(2), {k: v for k, v in bad.items() if v is not None}]


@pytest.mark.parametrize(
    ("feeds", "fragments"),
    [
        (_bad(ids=None), ["batch 1", "missing input 'ids'", "model inputs: x, ids"]),
        (_bad(extra=np.ones(1)), ["batch 1", "unknown input 'extra'"]),
        (_bad(x=np.ones((2, 3, 4), np.float32)), ["input 'x' batch 1", "rank 4", "rank 3"]),
        (
            _bad(x=np.ones((2, 3, 4, 4))),
            ["input 'x' batch 1", "float32", "float64", ".astype(np.float32)"],
        ),
        (_bad(ids=np.ones((2, 7), np.int32)), ["input 'ids'", ".astype(np.int64)"]),
        (_bad(x=np.ones((2, 5, 4, 4), np.float32)), ["input 'x' batch 1", "dim 1 must be 3"]),
        (_bad(x=np.full((2, 3, 4, 4), np.nan, np.float32)), ["input 'x' batch 1 contains NaN"]),
        (_bad(x=np.full((2, 3, 4, 4), np.inf, np.float32)), ["input 'x' batch 1 contains Inf"]),
        (_bad(x=np.ones((0, 3, 4, 4), np.float32)), ["input 'x' batch 1 is empty", "(0, 3, 4, 4)"]),
        ([_two(1), [1, 2]], ["batch 1", "expected a dict", "list"]),
    ],
)
def test_every_feed_is_validated(feeds: list[object], fragments: list[str]) -> None:
    _raises(lambda: open_feeds(feeds, TWO), *fragments)


def test_error_names_the_file_it_came_from(tmp_path: Path) -> None:
    np.savez(tmp_path / "ok.npz", x=np.ones((1, 3), np.float32))
    np.savez(tmp_path / "z.npz", x=np.array([[1, np.nan, 3]], np.float32))
    _raises(lambda: open_feeds(tmp_path, ONE), "input 'x' batch 1 (z.npz) contains NaN")
    data = {"x": np.ones((10, 3), np.float32)}
    data["x"][9, 0] = np.inf
    _raises(lambda: open_feeds(data, ONE, batch_size=4), "batch 2 (mapping[8:10]) contains Inf")


# --- 5. torch DataLoader -------------------------------------------------------------------------


def test_torch_dataloader_batches() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(10, 3)
    labels = torch.arange(10)
    # a tensor per batch ([x] from TensorDataset), then (x, label) with the label dropped
    for dataset in (TensorDataset(x), TensorDataset(x, labels)):
        stream = open_feeds(DataLoader(dataset, batch_size=4), ONE)
        batches = list(stream)
        assert [b["x"].shape for b in batches] == [(4, 3), (4, 3), (2, 3)]
        assert all(isinstance(b["x"], np.ndarray) for b in batches)
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x.numpy())
        assert stream.reiterable and len(list(stream)) == 3

    # two inputs by position, trailing labels dropped
    ids = torch.randint(0, 9, (4, 7))
    two = TensorDataset(torch.randn(4, 3, 4, 4), ids, labels[:4])
    batches = list(open_feeds(DataLoader(two, batch_size=2), TWO))
    np.testing.assert_array_equal(batches[1]["ids"], ids[2:].numpy())

    # a dict batch keyed by input names
    dicts = DataLoader([{"x": row} for row in x[:3]], batch_size=3)
    assert next(iter(open_feeds(dicts, ONE)))["x"].shape == (3, 3)

    # wrong item count / single tensor for a two-input model / float64
    wrong = DataLoader(TensorDataset(x, x, x), batch_size=5)
    _raises(lambda: open_feeds(wrong, ONE), "batch 0", "3 items", "1 inputs", "trailing labels")
    _raises(lambda: open_feeds(DataLoader(x, batch_size=5), TWO), "single Tensor", "2 inputs")
    _raises(lambda: open_feeds(DataLoader(x.double(), batch_size=5), ONE), ".astype(np.float32)")


@pytest.mark.parametrize(
    "value_info, kind",
    [
        (onnx.helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, [2]), "sequence"),
        (
            onnx.helper.make_value_info(
                "s",
                onnx.helper.make_optional_type_proto(
                    onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [2])
                ),
            ),
            "optional",
        ),
    ],
)
def test_non_tensor_inputs_are_refused_in_one_line(value_info, kind) -> None:
    graph = onnx.helper.make_graph([], "g", [value_info], [value_info])
    specs = input_specs(onnx.helper.make_model(graph))
    assert specs[0].kind == kind
    expected = rf"input 's' is not a tensor \(its type: {kind}\)"
    with pytest.raises(CalibrationDataError, match=expected) as err:
        open_feeds([{"s": [np.zeros(2, np.float32)]}], specs)
    assert "\n" not in str(err.value)


def test_string_inputs_are_fed_as_objects() -> None:
    (spec,) = _specs("string[N] words")
    assert spec.dtype == np.object_
    (feed,) = open_feeds([{"words": np.array(["a", "bc"])}], [spec])
    assert feed["words"].dtype == np.object_ and list(feed["words"]) == ["a", "bc"]
