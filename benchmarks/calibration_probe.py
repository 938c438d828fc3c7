"""One calibration run in a fresh process: its wall time and peak memory are its own.

``python -m benchmarks.calibration_probe SPEC.json RESULT.json``. The spec names the ``tool``
(``onnxq`` or ``ort``), the ``method``, the ``model`` file, the ``data`` (``resnet`` photo
crops generated batch by batch, or ``minilm`` uneven text batches), ``samples``, ``batch`` and,
for onnxq, ``workers``. The result holds ``wall_s`` (data generation, session set-up,
collection and range computation), ``peak_rss_bytes`` (``VmHWM``), ``baseline_rss_bytes``
(after imports, before calibrating), the peak of any child process, the number of tensors
calibrated, and ``error`` (the exception's first line) when the tool failed.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    import onnx  # noqa: F401  (imports are part of the baseline, not of the calibration)
    import onnxruntime

    from onnxq.errors import first_line
    from onnxq.memory import maxrss_bytes, status_bytes

    if spec["tool"] == "ort":
        import onnxruntime.quantization.calibrate  # noqa: F401
    else:
        import onnxq.pipeline  # noqa: F401
    _data_module(spec["data"])
    result: dict[str, Any] = {
        "spec": spec,
        "baseline_rss_bytes": status_bytes("VmRSS") or maxrss_bytes(),
    }
    start = time.perf_counter()
    try:
        run = _run_ort if spec["tool"] == "ort" else _run_onnxq
        result["tensors"] = run(spec, _feeds(spec))
        result["error"] = None
    except Exception as exc:  # the crash is the measurement
        result["error"] = f"{type(exc).__name__}: {first_line(exc)}"[:300]
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_bytes"] = status_bytes("VmHWM") or maxrss_bytes()
    result["children_peak_rss_bytes"] = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    )
    Path(argv[1]).write_text(json.dumps(result))
    return 0


def _run_onnxq(spec: dict[str, Any], feeds: Iterator[Feed]) -> int:
    from onnxq.calibration.ranges import range_for
    from onnxq.config import CalibrationMethod, QuantConfig
    from onnxq.pipeline import calibrate

    config = QuantConfig(method=spec["method"], batch_size=spec["batch"])
    calibration = calibrate(
        spec["model"],
        feeds,
        config,
        methods=(CalibrationMethod(spec["method"]),),
        hessians=False,
        workers=spec.get("workers", 1),
    )
    ranges = {root: range_for(group[0], config) for root, group in calibration.observers.items()}
    if calibration.samples != spec["samples"]:
        raise RuntimeError(f"calibrated {calibration.samples} samples, not {spec['samples']}")
    return len(ranges)


ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def _run_ort(spec: dict[str, Any], feeds: Iterator[Feed]) -> int:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader:
        """ONNX Runtime's ``CalibrationDataReader`` protocol over the generator."""

        def get_next(self) -> Feed | None:
            return next(feeds, None)

    with tempfile.TemporaryDirectory(prefix="onnxq-ort-calib-") as tmp:
        calibrator = create_calibrator(
            spec["model"],
            op_types_to_calibrate=spec.get("op_types") or None,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, ORT_METHODS[spec["method"]]),
        )
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
    return len(ranges.data) if hasattr(ranges, "data") else len(list(ranges))


def _data_module(kind: str) -> Any:
    if kind == "resnet":
        from calibration import images

        images.resnet_inputs(1)  # load the photos (part of the baseline)
        return images
    from calibration import text
    from models.minilm import load_tokenizer

    return text, load_tokenizer()


def _feeds(spec: dict[str, Any]) -> Iterator[Feed]:
    """Batches generated one at a time (never all samples in memory)."""
    samples, batch = spec["samples"], spec["batch"]
    if spec["data"] == "resnet":
        from calibration.images import resnet_inputs

        for index, start in enumerate(range(0, samples, batch)):
            yield {spec["input"]: resnet_inputs(min(batch, samples - start), seed=index)}
        return
    from calibration.text import calibration_sentences, uneven_batches
    from models.minilm import load_tokenizer

    yield from uneven_batches(calibration_sentences(samples), load_tokenizer())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
