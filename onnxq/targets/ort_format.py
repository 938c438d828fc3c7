"""ONNX Runtime's own format (``.ort``) for ONNX Runtime Mobile, written with the converter that
ships in the ``onnxruntime`` wheel (``onnxruntime.tools.convert_onnx_models_to_ort``).

The conversion bakes ORT's graph optimizations in ("Fixed" style) for the ARM platform: no
x86-specific layout (NCHWc) is applied, so the file runs on phones and loads in the standard
wheel on any CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from onnxq.errors import InvalidModelError, first_line

PathLike = str | os.PathLike[str]


def ort_path(onnx_path: PathLike) -> Path:
    """``OUT.onnx`` -> ``OUT.ort`` (any other name gets ``.ort`` appended)."""
    path = Path(onnx_path)
    return path.with_suffix(".ort") if path.suffix == ".onnx" else Path(f"{path}.ort")


def write_ort(onnx_path: PathLike, output: PathLike | None = None) -> Path:
    """Convert the ONNX file at ``onnx_path`` to ``output`` (default ``ort_path``), atomically:
    the converter writes into a temporary folder and the result is moved into place."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    source = Path(onnx_path)
    target = Path(output) if output is not None else ort_path(source)
    with tempfile.TemporaryDirectory(prefix="onnxq-ort-", dir=target.parent) as tmp:
        staged = Path(tmp) / "model.onnx"
        shutil.copyfile(source, staged)
        quiet = io.StringIO()
        try:
            with _silenced(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                convert_onnx_models_to_ort(
                    staged,
                    output_dir=Path(tmp) / "out",
                    optimization_styles=[OptimizationStyle.Fixed],
                    target_platform="arm",
                )
        except Exception as exc:  # the converter raises plain RuntimeError/ValueError
            raise InvalidModelError(
                f"ONNX Runtime could not convert {source} to .ort: {first_line(exc)}"
            ) from None
        converted = next((Path(tmp) / "out").glob("*.ort"), None)
        if converted is None:
            raise InvalidModelError(f"ONNX Runtime wrote no .ort file for {source}")
        os.replace(converted, target)
    return target


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """The converter logs every step at INFO through ``logging``; a library stays quiet."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


EXTRA_WRITERS = {".ort": write_ort}
"""Suffix in ``Target.extra_files`` -> the writer that makes that file from ``OUT.onnx``."""


def write_extra_files(onnx_path: PathLike, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a target writes beside ``OUT.onnx`` (``Target.extra_files``), in order."""
    return [EXTRA_WRITERS[suffix](onnx_path) for suffix in suffixes]
