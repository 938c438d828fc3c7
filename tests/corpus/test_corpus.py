"""Third-party ONNX files, static and dynamic mode: a valid, close output or a one-line refusal.

The corpus (``corpus_models``): the ONNX package's backend test models (opsets 6-24, control
flow, sequences, optionals, recurrent ops, strings, float16), the TorchScript and dynamo
exporters (opsets 9-21), skl2onnx (ai.onnx.ml ops, ZipMap outputs) and ``onnx.helper`` graphs.
Any exception other than a one-line ``OnnxqError`` fails the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from corpus_models import Entry, all_entries, random_feed
from support import sqnr_db

from onnxq.cli import main
from onnxq.dynamic import quantize_dynamic_with_report
from onnxq.errors import CalibrationDataError, OnnxqError, message_lines
from onnxq.pipeline import QuantResult, quantize_with_report

SQNR_FLOOR_DB = 15.0  # int8 against fp32 on the data it was calibrated on: "close-ish"
NEEDS = {"torch-torchscript": "torch", "torch-dynamo": "onnxscript", "skl2onnx": "skl2onnx"}
ENTRIES = all_entries()


def _build(entry: Entry) -> tuple[onnx.ModelProto, dict[str, Any]]:
    if entry.source in NEEDS:
        pytest.importorskip(NEEDS[entry.source])
    model, feed = entry.build()
    return model, feed if feed is not None else random_feed(model)


def _run(model: onnx.ModelProto, feed: dict[str, Any]) -> list[Any]:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, feed)


def _float_arrays(value: Any) -> list[np.ndarray]:
    """The float arrays in an output (a tensor, a sequence, a map), in order."""
    if isinstance(value, dict):
        return [np.asarray([value[k] for k in sorted(value)], np.float64)]
    if isinstance(value, list):
        return [a for item in value for a in _float_arrays(item)]
    array = np.asarray(value)
    return [array.astype(np.float64)] if array.dtype.kind == "f" else []


def _close(reference: list[Any], actual: list[Any], where: str) -> None:
    assert len(actual) == len(reference), where
    for ref, out in zip(reference, actual, strict=True):
        refs, outs = _float_arrays(ref), _float_arrays(out)
        assert [r.shape for r in refs] == [o.shape for o in outs], where
        for r, o in zip(refs, outs, strict=True):
            finite = np.isfinite(r)
            if finite.any() and np.abs(r[finite]).max() > 0:
                assert sqnr_db(r[finite], o[finite]) > SQNR_FLOOR_DB, where


def _outcome(
    model: onnx.ModelProto, feed: dict[str, Any], attempt: Callable[[], QuantResult], where: str
) -> str:
    """``"refused"`` (a one-line ``OnnxqError``) or ``"quantized"`` (valid and close)."""
    try:
        result = attempt()
    except OnnxqError as exc:
        assert len(message_lines(exc)) == 1, f"{where}: refusal is not one line: {exc}"
        return "refused"
    onnx.checker.check_model(result.model, full_check=True)
    try:
        reference = _run(model, feed)
    except Exception:  # ONNX Runtime cannot run the input: the checker is the oracle
        return "quantized"
    _close(reference, _run(result.model, feed), where)
    return "quantized"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.id)
def test_valid_output_or_one_line_refusal(entry: Entry) -> None:
    model, feed = _build(entry)
    static = _outcome(
        model, feed, lambda: quantize_with_report(model, [feed]), f"{entry.id} static"
    )
    dynamic = _outcome(
        model, feed, lambda: quantize_dynamic_with_report(model), f"{entry.id} dynamic"
    )
    assert static in ("quantized", "refused") and dynamic in ("quantized", "refused")
    if dynamic == "refused":  # no data was given: made-up tokens must never be the reason
        with pytest.raises(OnnxqError) as refusal:
            quantize_dynamic_with_report(model)
        assert not isinstance(refusal.value, CalibrationDataError), refusal.value


def test_corpus_spans_sources_and_opsets() -> None:
    sources = {entry.source for entry in ENTRIES}
    assert {"onnx-node", "onnx-data", "torch-torchscript", "torch-dynamo", "skl2onnx"} <= sources
    opsets = {int(e.name.rsplit("opset", 1)[1]) for e in ENTRIES if "opset" in e.name}
    assert set(range(9, 22)) - opsets == set(), sorted(opsets)


CLI_CASES = (
    "onnx-node/test_scan_sum",
    "onnx-node/test_mvn",
    "onnx-data/pytorch-converted/test_PReLU_2d_multiparam",
    "torch-torchscript/lstm-opset9",
    "skl2onnx/logreg-opset9",
    "onnx-helper/sequence-input",
)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_writes_a_valid_model_or_exits_2_in_one_line(case: str, mode: str, tmp_path: Path):
    entry = next(e for e in ENTRIES if e.id == case)
    model, feed = _build(entry)
    source, out, calib = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    onnx.save(model, source)
    args = ["quantize", source, "-o", out, "--mode", mode]
    if mode == "static" and all(isinstance(v, np.ndarray) for v in feed.values()):
        np.savez(calib, **feed)
        args += ["--calib", calib]
    result = CliRunner().invoke(main, [os.fspath(a) for a in args])
    if result.exit_code == 0:
        onnx.checker.check_model(os.fspath(out), full_check=True)
        return
    assert result.exit_code == 2, result.output
    assert not out.exists()
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output
