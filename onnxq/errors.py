"""Typed errors. Every user-facing failure is an ``OnnxqError`` with a one-line message.

The CLI turns any ``OnnxqError`` into ``error: <message>`` and exit code 2.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def message_lines(exc: BaseException) -> list[str]:
    """The non-empty lines of an exception's message, stripped, colour codes removed."""
    lines = (_ANSI.sub("", line).strip() for line in str(exc).splitlines())
    return [line for line in lines if line]


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (colour codes removed), or its type:
    what a one-line error built from a library's exception shows."""
    lines = message_lines(exc)
    return lines[0] if lines else type(exc).__name__


class OnnxqError(Exception):
    """Base class of every error onnxq raises on purpose."""


class InvalidModelError(OnnxqError):
    """The model file is missing, not ONNX, truncated, or fails the ONNX checker."""


class UnsupportedModelError(OnnxqError):
    """Valid ONNX that onnxq cannot handle (e.g. an op from an unknown domain)."""


class CalibrationDataError(OnnxqError):
    """Calibration or evaluation data is empty, non-finite, or does not match the model's inputs."""


class ConfigError(OnnxqError, ValueError):
    """An invalid option or combination of options."""


class OutputPathError(OnnxqError):
    """The output path is unusable: equal to the input, or in a folder that cannot be written."""


class ExportError(OnnxqError):
    """Export from PyTorch failed, or ONNX Runtime does not reproduce the PyTorch outputs."""


class RangesError(OnnxqError):
    """A calibration cache (ranges file) is unreadable or belongs to another model."""


class ProviderError(OnnxqError):
    """A requested ONNX Runtime execution provider is not available."""


class EngineError(OnnxqError):
    """The execution engine failed: Ray missing or unreachable, or a worker lost mid-run."""
