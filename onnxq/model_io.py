"""Loading and saving models: clear errors on bad files, atomic writes, input never touched."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError, EncodeError, Message

from onnxq.errors import InvalidModelError, OutputPathError, first_line
from onnxq.ir_io import to_proto

PathLike = str | os.PathLike[str]
PROTOBUF_LIMIT = 2**31 - 1  # bytes: a larger model is written with its weights in OUT.data
EXTERNAL_THRESHOLD = 1024  # bytes: weights at least this large go to the data file
# What ``onnx.checker.check_model`` raises for a model it rejects (``full_check`` runs strict
# shape inference, which raises its own error type).
CHECKER_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)

# Element types narrower than a byte (numpy holds them one per byte).
_SUBBYTE_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}

# ONNX element types a model input can have that calibration data can supply.
_NP_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT64: np.uint64,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.STRING: np.object_,  # ONNX Runtime takes str arrays as objects
}

# What a graph input that is not a tensor holds, by its TypeProto field.
_KINDS = {
    "sequence_type": "sequence",
    "optional_type": "optional",
    "map_type": "map",
    "sparse_tensor_type": "sparse tensor",
}


@dataclass(frozen=True)
class InputSpec:
    """What a model expects for one input.

    ``shape`` holds ints for fixed dims and ``None`` for symbolic/unknown ones; ``batch_axis`` is
    the first symbolic dim (``None`` when every dim is fixed: the batch is then the fixed dim 0).
    ``kind`` is ``"tensor"``, or what else the input holds (``"sequence"``, ``"optional"``,
    ``"map"``, ``"sparse tensor"``).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    kind: str = "tensor"

    @property
    def batch_axis(self) -> int | None:
        if self.shape is None:
            return 0
        for axis, dim in enumerate(self.shape):
            if dim is None:
                return axis
        return None


def load_model(path: PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data included), failing with ``InvalidModelError``."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: file is empty, not an ONNX model")
    try:
        model = onnx.load(os.fspath(path))
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InvalidModelError(
            f"{path}: not a valid ONNX model (truncated or corrupt?): {first_line(exc)}"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise InvalidModelError(f"{path}: not a valid ONNX model (it parses to an empty graph)")
    try:  # over 2 GB the checker reads the file (it cannot serialise the model)
        onnx.checker.check_model(serialize(model) or os.fspath(path))
    except CHECKER_ERRORS as exc:
        raise InvalidModelError(
            f"{path}: the ONNX checker rejects the model: {first_line(exc)}"
        ) from None
    return model


def model_proto(source: PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A model given as a path (read and checked by ``load_model``) or already in memory."""
    return source if isinstance(source, onnx.ModelProto) else load_model(source)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs are excluded)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(_NP_DTYPES.get(tensor_type.elem_type, np.float32))
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
        kind = _KINDS.get(value.type.WhichOneof("value") or "", "tensor")
        specs.append(InputSpec(value.name, dtype, shape, kind))
    return specs


def check_output_path(output: PathLike, *inputs: PathLike) -> Path:
    """Refuse an output equal to an input or in a folder that cannot be written."""
    out = Path(output)
    for src in inputs:
        if out.resolve() == Path(src).resolve():
            raise OutputPathError(
                f"{out}: output path is the input model; refusing to overwrite it"
            )
    folder = out.resolve().parent
    if not folder.is_dir():
        raise OutputPathError(f"{out}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"{out}: output folder {folder} is not writable")
    if out.is_dir():
        raise OutputPathError(f"{out}: output path is a folder")
    return out


def is_large(model: onnx.ModelProto) -> bool:
    """Over protobuf's 2 GB limit: cannot be serialised as one message."""
    return model_bytes(model) > PROTOBUF_LIMIT


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model as one protobuf message, or ``None`` over the 2 GB limit (judged from the
    weights first: protobuf takes seconds to refuse a model far over it)."""
    if _weights_bytes(model) > PROTOBUF_LIMIT:
        return None
    try:
        data = model.SerializeToString()
    except EncodeError:
        return None
    return data if len(data) <= PROTOBUF_LIMIT else None


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialised size; over 2 GB (which protobuf refuses to size, slowly), its weights'
    bytes, counted from their shapes and types without reading them."""
    weights = _weights_bytes(model)
    if weights > PROTOBUF_LIMIT:
        return weights
    try:
        return model.ByteSize()
    except EncodeError:
        return weights


def _weights_bytes(model: onnx.ModelProto) -> int:
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """In-memory bytes of a tensor's values, from its dims and element type."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    bits = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * 8
    if tensor.data_type in _SUBBYTE_BITS:
        bits = _SUBBYTE_BITS[tensor.data_type]
    return (math.prod(tensor.dims) * bits + 7) // 8


def save_model(model: onnx.ModelProto | ir.Model, output: PathLike) -> Path:
    """Write atomically: serialise to a temporary file in the same folder, then rename.

    A model over 2 GB is written with its weights in ``OUTPUT.data`` beside it (and the
    proto is left pointing at that file instead of holding the weights): both are written and
    checked in a temporary folder, then renamed into place, data first. A failure (or Ctrl-C)
    at any point leaves no partial file at ``output``.
    """
    out = check_output_path(output)
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    data = serialize(proto)
    if data is not None:
        return atomic_write(out, data)
    return _save_with_external_data(proto, out)


def _save_with_external_data(proto: onnx.ModelProto, out: Path) -> Path:
    data = out.with_name(f"{out.name}.data")
    check_output_path(data)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot write there: {exc.strerror}") from None
    try:
        staged = folder / out.name
        write_with_external_data(proto, staged, data.name)
        onnx.checker.check_model(os.fspath(staged))
        os.replace(folder / data.name, data)
        os.replace(staged, out)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot write there: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def write_with_external_data(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Write ``model`` to ``path`` with every weight of ``EXTERNAL_THRESHOLD`` bytes or more in
    ``location`` (a file name beside it), leaving ``model`` itself unchanged."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    shell.graph.CopyFrom(without_initializers(model.graph))
    with open(path.with_name(location), "wb") as data:
        for tensor in model.graph.initializer:
            if _tensor_bytes(tensor) < EXTERNAL_THRESHOLD or not tensor.HasField("raw_data"):
                shell.graph.initializer.add().CopyFrom(tensor)
                continue
            offset, length = data.tell(), len(tensor.raw_data)
            data.write(tensor.raw_data)
            reference = shell.graph.initializer.add(
                name=tensor.name, dims=tensor.dims, data_type=tensor.data_type
            )
            reference.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", length)):
                reference.external_data.add(key=key, value=str(value))
    path.write_bytes(shell.SerializeToString())


def without_initializers(graph: onnx.GraphProto) -> onnx.GraphProto:
    """A copy of ``graph`` without its initializers (nodes, interface, value info, ...)."""
    shell = onnx.GraphProto()
    _copy_fields(graph, shell, skip="initializer")
    return shell


def _copy_fields(source: Message, target: Message, *, skip: str) -> None:
    """Copy every set field of ``source`` but ``skip`` into ``target`` (same message type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        elif isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


@contextmanager
def runnable_path(model: onnx.ModelProto) -> Iterator[Path]:
    """``model`` in a temporary folder, weights as external data (what ONNX Runtime opens for
    a model over 2 GB); removed on exit (an open session keeps what it read)."""
    with tempfile.TemporaryDirectory(prefix="onnxq-run-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        write_with_external_data(model, path, "model.onnx.data")
        yield path


def atomic_write(output: PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to a temporary file in
    the same folder, then rename it into place: readers never see a partial file."""
    out = Path(output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot write there: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputPathError(f"{out}: cannot write there: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_json(data: Any, output: PathLike) -> Path:
    """Indented JSON, written atomically; non-finite floats become strings (``"inf"``)."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    return atomic_write(output, text.encode())


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars, paths and non-finite floats made JSON-ready."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value
