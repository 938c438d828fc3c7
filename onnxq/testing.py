"""pytest helpers: hold a quantized model to the same gates ``onnxq compare`` enforces."""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.calibration.readers import FeedSource
from onnxq.errors import ConfigError
from onnxq.evaluate import measure_accuracy
from onnxq.gates import Gates, Measured, gate_failures
from onnxq.model_io import PathLike


def assert_quantized_close(
    fp32: PathLike | onnx.ModelProto,
    quantized: PathLike | onnx.ModelProto,
    data: FeedSource,
    *,
    min_cosine: float | None = None,
    min_sqnr: float | None = None,
    max_drop: float | None = None,
    labels: PathLike | np.ndarray | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
) -> None:
    """Raise ``AssertionError`` naming every failing metric (``onnxq.gates`` rules) when
    ``quantized`` is not within the limits of ``fp32`` on ``data``; at least one limit."""
    gates = Gates(min_cosine=min_cosine, min_sqnr=min_sqnr, max_drop=max_drop)
    if not gates.active:
        raise ConfigError("give at least one limit: min_cosine, min_sqnr or max_drop")
    reference, metrics = measure_accuracy(
        fp32, quantized, data, labels=labels, batch_size=batch_size, max_samples=max_samples
    )
    failures = gate_failures("quantized", Measured(reference, metrics), gates)
    if failures:
        raise AssertionError("; ".join(failure.describe() for failure in failures))
