"""Calibration data: one protocol, many sources.

``open_feeds(source, inputs)`` turns a source into a ``FeedStream``: an iterable of validated feed
dicts ``{input_name: np.ndarray}``, one batch per item, read lazily (one batch in memory at a time,
except an ``.npz`` file or mapping, whose arrays are loaded once per pass and sliced into views).

Sources, recognised in this order:

1. A path to an ``.npz`` file. Keys are input names; each array holds samples concatenated along
   the input's batch axis (``InputSpec.batch_axis``, or axis 0 when the shape is fully static).
   Split into batches of ``batch_size``; when an input's shape is fully static its dim 0 is the
   batch size instead (a model with ``float[1,3] x`` gets batches of 1). A rank-0 (scalar) input
   is passed unchanged with every batch. All other inputs need the same number of samples.
2. A path to a folder holding exactly one kind of file, read in name order (numbers compared as
   numbers: ``2`` before ``10``):
   a. ``*.npz``: each file is one complete feed, exactly as the model takes it (no splitting);
   b. ``*.npy``: each file is one complete feed of a single-input model;
   c. ONNX test data sets ``test_data_set_*/input_*.pb`` (or ``input_*.pb`` in the folder itself):
      each set is one feed; a TensorProto maps to an input by its name, or when unnamed by the
      index in its file name (``input_1.pb`` -> the model's second input).
   A file glob (``"data/part-*.npz"``) is read like a folder of the files it matches.
3. A mapping ``{input_name: array}``: like 1.
4. An object with ``get_next()`` returning a feed dict, then ``None`` at the end (ONNX Runtime's
   ``CalibrationDataReader`` protocol).
5. A torch ``DataLoader`` (any iterable whose class comes from ``torch``). A batch is a tensor
   (single-input model), a dict keyed by input name, or a tuple/list mapped to the inputs by
   position. A tuple/list with exactly one item more than the model has inputs ends in labels:
   that last item is dropped. Tensors become arrays with ``.detach().cpu().numpy()``.
6. Any other iterable of feed dicts (list, tuple, generator).

Every feed is checked: input names, rank, dtype (never cast), fixed dims, non-empty, finite
floats. Every problem is a ``CalibrationDataError`` with a one-line message.

Folder and glob sources are also lists of ``BatchFile``s (``batch_files``): one picklable path per
batch, so calibration workers read and check their own batches from shared storage
(``load_batch``) instead of receiving them from the driver.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxq.errors import CalibrationDataError, ConfigError, first_line
from onnxq.model_io import InputSpec

Feed = dict[str, np.ndarray]


class FeedReader(Protocol):
    """ONNX Runtime's ``CalibrationDataReader`` protocol."""

    def get_next(self) -> Mapping[str, Any] | None: ...


FeedSource = str | os.PathLike[str] | Mapping[str, Any] | FeedReader | Iterable[Any]

# A source, once opened: a callable starting a new pass, giving (raw feed, where it came from).
_Batches = Callable[[], Iterator[tuple[Any, str | None]]]


class FeedStream:
    """Validated feeds from one source, one batch per item.

    ``reiterable`` sources (files, folders, mappings, lists, DataLoaders, and readers with a
    ``rewind()`` method, called before each new pass) start again from the first batch on each
    ``iter()``. Generators, iterators and plain ``get_next()`` readers are one-shot: a second
    ``iter()`` raises ``CalibrationDataError``. ``samples_seen`` counts the samples yielded so far
    in the current pass, along the batch axis. With ``max_samples`` a pass stops once that many
    samples were yielded, slicing the last batch (inputs with a fixed batch dim are not sliced).
    """

    def __init__(
        self,
        batches: _Batches,
        inputs: Sequence[InputSpec],
        *,
        description: str,
        reiterable: bool,
        max_samples: int | None = None,
    ) -> None:
        self._batches = batches
        self.inputs = tuple(inputs)
        self.description = description
        self.reiterable = reiterable
        self.max_samples = max_samples
        self.samples_seen = 0
        self._passes = 0

    def __repr__(self) -> str:
        kind = "reiterable" if self.reiterable else "one-shot"
        return f"FeedStream({self.description}, {kind}, samples_seen={self.samples_seen})"

    def __iter__(self) -> Iterator[Feed]:
        if self._passes and not self.reiterable:
            raise CalibrationDataError(
                f"calibration source {self.description} is one-shot and was already read; "
                "pass a list, an .npz file or a folder to read the data more than once"
            )
        self._passes += 1
        return self._stream()

    def _stream(self) -> Iterator[Feed]:
        self.samples_seen = 0
        limit = self.max_samples
        count = 0
        for index, (raw, where) in enumerate(self._batches()):
            feed = validate_feed(raw, self.inputs, index=index, where=where)
            n = sample_count(feed, self.inputs)
            if limit is not None and self.samples_seen + n > limit:
                feed, n = _truncate(feed, self.inputs, n, limit - self.samples_seen)
            self.samples_seen += n
            count += 1
            yield feed
            if limit is not None and self.samples_seen >= limit:
                return  # before asking a one-shot source for a batch it would then lose
        if count == 0:
            raise CalibrationDataError(
                f"calibration data is empty: {self.description} gave no batches"
            )


def open_feeds(
    source: FeedSource,
    inputs: Sequence[InputSpec],
    *,
    batch_size: int = 8,
    max_samples: int | None = None,
) -> FeedStream:
    """Open a calibration data source for a model with these inputs (see the module docstring).

    ``batch_size`` applies to sources that are split (an ``.npz`` file, a mapping); the other
    sources bring their own batches. Only the path and the kind of source are checked here; each
    feed is validated as it is read.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    inputs = tuple(inputs)
    if not inputs:
        raise CalibrationDataError("the model has no inputs to feed calibration data to")
    for spec in inputs:
        if spec.kind != "tensor":
            raise CalibrationDataError(
                f"input {spec.name!r} is not a tensor (its type: {spec.kind}): calibration "
                "data feeds tensor inputs only (quantize --mode dynamic needs no data)"
            )

    def stream(batches: _Batches, description: str, reiterable: bool) -> FeedStream:
        return FeedStream(
            batches,
            inputs,
            description=description,
            reiterable=reiterable,
            max_samples=max_samples,
        )

    files = batch_files(source, inputs)
    if files is not None:
        listed, description = files
        return stream(lambda: ((f.read(inputs), f.path.name) for f in listed), description, True)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.suffix == ".npz":
            return stream(
                lambda: _split_batches(_load_npz(path), inputs, batch_size, path.name),
                str(path),
                True,
            )
        if path.is_file():
            raise CalibrationDataError(
                f"{path}: unsupported calibration file; expected an .npz file or a folder"
            )
        raise CalibrationDataError(f"{path}: calibration data path does not exist")
    if isinstance(source, np.ndarray) or _is_tensor(source):
        names = ", ".join(s.name for s in inputs)
        raise CalibrationDataError(
            f"a bare {type(source).__name__} is not a calibration source; pass a dict "
            f"{{input name: array}} (model inputs: {names})"
        )
    if isinstance(source, Mapping):
        return stream(
            lambda: _split_batches(source, inputs, batch_size, "mapping"), "mapping", True
        )
    if callable(getattr(source, "get_next", None)):
        return stream(
            _reader_batches(source),
            type(source).__name__,
            callable(getattr(source, "rewind", None)),
        )
    if isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        one_shot = isinstance(source, Iterator)
        if _from_torch(source):
            return stream(_torch_batches(source, inputs), type(source).__name__, not one_shot)
        return stream(
            lambda: ((item, None) for item in source), type(source).__name__, not one_shot
        )
    raise CalibrationDataError(
        f"unsupported calibration data source of type {type(source).__qualname__}; expected an "
        ".npz file, a folder, a dict of arrays, a get_next() reader, a DataLoader or an "
        "iterable of feed dicts"
    )


def validate_feed(
    feed: Any, inputs: Sequence[InputSpec], *, index: int = 0, where: str | None = None
) -> Feed:
    """Check one feed against the model's inputs; return it as ``{name: ndarray}`` in input order.

    Raises ``CalibrationDataError`` naming the input and the batch ``index`` (and ``where`` it
    came from) for: a non-dict, missing or unknown names, rank, dtype (no cast is made), fixed
    dims, an empty array, NaN or Inf in a float input.
    """
    at = f"batch {index}" + (f" ({where})" if where else "")
    if not isinstance(feed, Mapping):
        raise CalibrationDataError(
            f"{at}: expected a dict {{input name: array}}, got {type(feed).__name__}"
        )
    _check_names(list(feed), inputs, at)
    out: Feed = {}
    for spec in inputs:
        label = f"input {spec.name!r} {at}"
        arr = _to_array(feed[spec.name], label)
        if spec.dtype == np.object_ and arr.dtype.kind in "US":  # str arrays: ORT takes objects
            arr = arr.astype(np.object_)
        _check_array(arr, spec, label)
        out[spec.name] = arr
    return out


# --- checks ------------------------------------------------------------------------------------


def _check_names(keys: list[Any], inputs: Sequence[InputSpec], at: str) -> None:
    names = [s.name for s in inputs]
    expected = ", ".join(names)
    missing = [n for n in names if n not in keys]
    unknown = [k for k in keys if k not in names]
    if missing:
        listed = ", ".join(repr(n) for n in missing)
        got = ", ".join(str(k) for k in keys) or "nothing"
        hint = ""
        if keys and all(re.fullmatch(r"arr_\d+", str(k)) for k in keys):
            hint = "; save arrays by input name, e.g. np.savez(path, **{name: array})"
        raise CalibrationDataError(
            f"{at}: missing input{'s' if len(missing) > 1 else ''} {listed} "
            f"(model inputs: {expected}; got: {got}){hint}"
        )
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        raise CalibrationDataError(
            f"{at}: unknown input{'s' if len(unknown) > 1 else ''} {listed} "
            f"(model inputs: {expected})"
        )


def _check_array(arr: np.ndarray, spec: InputSpec, label: str) -> None:
    if spec.dtype == ml_dtypes.bfloat16:
        raise CalibrationDataError(
            f"{label}: a bfloat16 input cannot be fed: ONNX Runtime's Python API takes no "
            "bfloat16 arrays; export the model with float32 or float16 inputs (bfloat16 "
            "weights are fine), or quantize --mode dynamic without data"
        )
    if spec.shape is not None and arr.ndim != len(spec.shape):
        raise CalibrationDataError(
            f"{label}: expected rank {len(spec.shape)} {_fmt_shape(spec.shape)}, "
            f"got rank {arr.ndim} {_fmt_shape(arr.shape)}"
        )
    if arr.dtype != spec.dtype:
        raise CalibrationDataError(
            f"{label}: expected dtype {spec.dtype}, got {arr.dtype}; "
            f"convert with .astype(np.{spec.dtype.type.__name__})"
        )
    if spec.shape is not None:
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if want is not None and want != got:
                raise CalibrationDataError(
                    f"{label}: dim {axis} must be {want}, got shape {_fmt_shape(arr.shape)} "
                    f"(model shape {_fmt_shape(spec.shape)})"
                )
    if arr.size == 0:
        raise CalibrationDataError(f"{label} is empty (shape {_fmt_shape(arr.shape)})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise CalibrationDataError(f"{label} contains {'NaN' if np.isnan(arr).any() else 'Inf'}")


def _to_array(value: Any, label: str) -> np.ndarray:
    """An ndarray as is; a torch tensor via ``.detach().cpu().numpy()``; else ``np.asarray``."""
    if isinstance(value, np.ndarray):
        return value
    try:
        if _is_tensor(value):
            return value.detach().cpu().numpy()
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CalibrationDataError(
            f"{label}: cannot convert {type(value).__name__} to a numpy array: {first_line(exc)}"
        ) from None


def _fmt_shape(shape: Sequence[int | None]) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


# --- batch axis and sample counting ------------------------------------------------------------


def _batch_axis(spec: InputSpec) -> int | None:
    """The symbolic batch axis, or 0 for a fully static shape; ``None`` for a scalar."""
    if spec.batch_axis is not None:
        return spec.batch_axis
    return 0 if spec.shape else None


def sample_count(feed: Feed, inputs: Sequence[InputSpec]) -> int:
    """Samples in a feed: the first non-scalar input's size along its batch axis (else 1)."""
    for spec in inputs:
        axis = _batch_axis(spec)
        arr = feed[spec.name]
        if axis is not None and arr.ndim > axis:
            return int(arr.shape[axis])
    return 1


def _truncate(feed: Feed, inputs: Sequence[InputSpec], n: int, keep: int) -> tuple[Feed, int]:
    """Keep the first ``keep`` samples of every input with ``n`` along a symbolic batch axis."""
    out = dict(feed)
    sliced = False
    for spec in inputs:
        axis = spec.batch_axis  # fixed batch dims cannot be sliced
        arr = feed[spec.name]
        if axis is not None and arr.ndim > axis and arr.shape[axis] == n:
            out[spec.name] = np.ascontiguousarray(arr[(slice(None),) * axis + (slice(0, keep),)])
            sliced = True
    return (out, keep) if sliced else (feed, n)


# --- sources -----------------------------------------------------------------------------------


def _split_batches(
    arrays: Mapping[str, Any], inputs: Sequence[InputSpec], batch_size: int, where: str
) -> Iterator[tuple[Feed, str]]:
    """Cases 1 and 3: slice concatenated samples into batches along each input's batch axis."""
    _check_names(list(arrays), inputs, where)
    data = {s.name: _to_array(arrays[s.name], f"input {s.name!r} ({where})") for s in inputs}
    step, fixed_from = batch_size, None
    counts: dict[str, int] = {}
    for spec in inputs:
        axis, arr = _batch_axis(spec), data[spec.name]
        if axis is None:
            continue  # scalar: the same value goes with every batch
        label = f"input {spec.name!r} ({where})"
        if spec.shape is not None and arr.ndim != len(spec.shape):
            raise CalibrationDataError(
                f"{label}: expected rank {len(spec.shape)} {_fmt_shape(spec.shape)} with samples "
                f"along axis {axis}, got rank {arr.ndim} {_fmt_shape(arr.shape)}"
            )
        if arr.ndim <= axis:
            raise CalibrationDataError(
                f"{label}: cannot split shape {_fmt_shape(arr.shape)} into samples "
                f"along axis {axis}"
            )
        counts[spec.name] = int(arr.shape[axis])
        if spec.batch_axis is None and spec.shape:  # fully static: batches of its dim 0
            if fixed_from is not None and spec.shape[0] != step:
                raise CalibrationDataError(
                    f"{where}: inputs {fixed_from!r} and {spec.name!r} have different fixed "
                    f"batch sizes ({step} and {spec.shape[0]})"
                )
            step, fixed_from = spec.shape[0], spec.name
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise CalibrationDataError(
            f"{where}: inputs have different numbers of samples ({listed}); every input needs "
            "the same number along its batch axis"
        )
    total = next(iter(counts.values()), 1)
    for start in range(0, total, step):
        stop = min(start + step, total)
        if fixed_from is not None and stop - start < step:
            raise CalibrationDataError(
                f"{where}: {total} samples do not split into batches of {step} (the fixed batch "
                f"size of input {fixed_from!r}); drop or pad the last {stop - start}"
            )
        feed: Feed = {}
        for spec in inputs:
            axis, arr = _batch_axis(spec), data[spec.name]
            if axis is not None:
                arr = np.ascontiguousarray(arr[(slice(None),) * axis + (slice(start, stop),)])
            feed[spec.name] = arr
        yield feed, f"{where}[{start}:{stop}]"


@dataclass(frozen=True)
class BatchFile:
    """One batch stored as a file (``.npz``, ``.npy``) or a test data set folder (``pb``)."""

    kind: str
    path: Path

    def read(self, inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
        """The raw feed, not yet checked (``load_batch`` checks it)."""
        if self.kind == "pb":
            return _load_pb_set(self.path, inputs)
        if self.kind == "npy":
            return {inputs[0].name: _load_npy(self.path)}
        return _load_npz(self.path)


def batch_files(source: Any, inputs: Sequence[InputSpec]) -> tuple[list[BatchFile], str] | None:
    """A folder or file-glob source as its batch files in read order, with a description;
    ``None`` for every other kind of source."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    if path.is_dir():
        return _folder_files(path, inputs)
    if not path.exists() and glob.has_magic(os.fspath(source)):
        return _glob_files(os.fspath(source), inputs)
    return None


def load_batch(batch: Feed | BatchFile, inputs: Sequence[InputSpec], index: int) -> Feed:
    """A feed as it is (checked when read), or a batch file read and checked as batch ``index``."""
    if isinstance(batch, BatchFile):
        return validate_feed(batch.read(inputs), inputs, index=index, where=batch.path.name)
    return batch


def _folder_files(folder: Path, inputs: Sequence[InputSpec]) -> tuple[list[BatchFile], str]:
    """Case 2: the folder's one kind of calibration file."""
    npz = _files(folder, "*.npz")
    npy = _files(folder, "*.npy")
    sets = sorted((d for d in folder.glob("test_data_set_*") if d.is_dir()), key=_natural_key)
    if not sets and _files(folder, "input_*.pb"):
        sets = [folder]
    found = {
        kind: items
        for kind, items in (("*.npz", npz), ("*.npy", npy), ("test_data_set_*/input_*.pb", sets))
        if items
    }
    if not found:
        raise CalibrationDataError(
            f"{folder}: no calibration data in folder (expected *.npz, *.npy or "
            "test_data_set_*/input_*.pb files)"
        )
    if len(found) > 1:
        raise CalibrationDataError(
            f"{folder}: folder mixes {' and '.join(found)} files; keep one kind per folder"
        )
    description = f"{folder} ({sum(len(v) for v in found.values())} {next(iter(found))})"
    if npz:
        return [BatchFile("npz", f) for f in npz], description
    if npy:
        _check_npy_model(folder, inputs)
        return [BatchFile("npy", f) for f in npy], description
    return [BatchFile("pb", d) for d in sets], description


def _glob_files(pattern: str, inputs: Sequence[InputSpec]) -> tuple[list[BatchFile], str]:
    """A file glob: the ``.npz`` or ``.npy`` files it matches, one kind, in name order."""
    paths = sorted((Path(p) for p in glob.glob(pattern) if Path(p).is_file()), key=_natural_key)
    kinds = {p.suffix for p in paths}
    if not paths or not kinds <= {".npz", ".npy"}:
        raise CalibrationDataError(f"{pattern}: matches no .npz or .npy files")
    if len(kinds) > 1:
        raise CalibrationDataError(f"{pattern}: matches both .npz and .npy files; keep one kind")
    kind = kinds.pop()[1:]
    if kind == "npy":
        _check_npy_model(Path(pattern), inputs)
    return [BatchFile(kind, p) for p in paths], f"{pattern} ({len(paths)} *.{kind})"


def _check_npy_model(where: Path, inputs: Sequence[InputSpec]) -> None:
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise CalibrationDataError(
            f"{where}: .npy files can only feed a single-input model, this one has "
            f"{len(inputs)} inputs ({names}); use .npz files keyed by input name"
        )


def _reader_batches(reader: Any) -> _Batches:
    """Case 4: ``get_next()`` until ``None``; ``rewind()`` (if any) before every later pass."""
    passes = 0

    def batches() -> Iterator[tuple[Any, None]]:
        nonlocal passes
        if passes:
            reader.rewind()
        passes += 1
        while (feed := reader.get_next()) is not None:
            yield feed, None

    return batches


def _torch_batches(loader: Iterable[Any], inputs: Sequence[InputSpec]) -> _Batches:
    """Case 5: DataLoader batches (tensor, tuple/list or dict) as feed dicts."""
    names = [s.name for s in inputs]
    listed = ", ".join(names)

    def to_feed(batch: Any, index: int) -> Any:
        if isinstance(batch, Mapping):
            return batch
        if isinstance(batch, (tuple, list)):
            items = list(batch)
            if len(items) == len(names) + 1:
                items = items[:-1]  # trailing labels
            if len(items) != len(names):
                raise CalibrationDataError(
                    f"batch {index}: the DataLoader yields {len(batch)} items but the model has "
                    f"{len(names)} inputs ({listed}); expected {len(names)}, or "
                    f"{len(names) + 1} with trailing labels"
                )
            return dict(zip(names, items, strict=True))
        if len(names) != 1:
            raise CalibrationDataError(
                f"batch {index}: the DataLoader yields a single {type(batch).__name__} but the "
                f"model has {len(names)} inputs ({listed}); yield a tuple or a dict keyed by "
                "input name"
            )
        return {names[0]: batch}

    def batches() -> Iterator[tuple[Any, None]]:
        for index, batch in enumerate(loader):
            yield to_feed(batch, index), None

    return batches


# --- file reading ------------------------------------------------------------------------------


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"{path}: cannot read .npz file: {first_line(exc)}") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"{path}: cannot read .npy file: {first_line(exc)}") from None


def _load_pb_set(folder: Path, inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """One ONNX test data set: named tensors by name, unnamed ones by the index in the file name."""
    files = _files(folder, "input_*.pb")
    if not files:
        raise CalibrationDataError(f"{folder}: no input_*.pb files in test data set")
    feed: dict[str, np.ndarray] = {}
    for position, path in enumerate(files):
        try:
            tensor = onnx.load_tensor(os.fspath(path))
            arr = numpy_helper.to_array(tensor)
        except (DecodeError, OSError, ValueError, TypeError, KeyError) as exc:
            raise CalibrationDataError(
                f"{path}: cannot read TensorProto: {first_line(exc)}"
            ) from None
        name = tensor.name
        if not name:
            match = re.fullmatch(r"input_(\d+)\.pb", path.name)
            index = int(match.group(1)) if match else position
            if index >= len(inputs):
                raise CalibrationDataError(
                    f"{path}: unnamed tensor for input index {index}, but the model has "
                    f"{len(inputs)} input{'s' if len(inputs) > 1 else ''}"
                )
            name = inputs[index].name
        if name in feed:
            raise CalibrationDataError(f"{path}: second tensor for input {name!r} in {folder.name}")
        feed[name] = arr
    return feed


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted((p for p in folder.glob(pattern) if p.is_file()), key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


# --- helpers -----------------------------------------------------------------------------------


def _is_tensor(obj: Any) -> bool:
    return _from_torch(obj) and callable(getattr(obj, "detach", None))


def _from_torch(obj: Any) -> bool:
    """True for instances of torch classes (subclasses included), without importing torch."""
    return any(cls.__module__.split(".")[0] == "torch" for cls in type(obj).__mro__)
