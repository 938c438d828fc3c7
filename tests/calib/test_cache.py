"""Ranges files: round trip, same model as calibrating inline, refusals with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import make_cnn

from onnxq.calibration.cache import hessians_path, load_ranges, model_fingerprint
from onnxq.calibration.calibrate import ALL_METHODS
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.errors import RangesError
from onnxq.pipeline import calibrate, quantize, quantize_with_report

NEAREST = QuantConfig(weight_rounding="nearest", batch_size=5)


def _save(model, data, path: Path, config=NEAREST, **kwargs) -> Path:
    calibrate(model, data, config, **kwargs).save(path, {"note": "test"})
    return path


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_round_trip_keeps_every_statistic(cnn, cnn_calib, tmp_path):
    calibration = calibrate(cnn, cnn_calib, NEAREST)
    written = calibration.save(tmp_path / "ranges.json", {"note": "test"})
    assert written == [hessians_path(tmp_path / "ranges.json"), tmp_path / "ranges.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranges.hessians.npz", "ranges.json"]
    loaded = load_ranges(tmp_path / "ranges.json")
    assert loaded.fingerprint == calibration.fingerprint
    assert (loaded.samples, loaded.batches) == (24, 5)
    assert loaded.details == {"note": "test"}
    for name, group in calibration.observers.items():
        assert [o.to_dict() for o in loaded.tensors[name]] == [o.to_dict() for o in group]
    hessians = loaded.hessians()
    assert hessians.keys() == calibration.hessians.keys()
    for node, hessian in calibration.hessians.items():
        assert np.array_equal(hessians[node], hessian)


@pytest.mark.parametrize("method", list(CalibrationMethod))
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_quantize_from_ranges_is_bit_identical(cnn, cnn_calib, tmp_path, method, rounding):
    ranges = _save(cnn, cnn_calib, tmp_path / "ranges.json")
    config = NEAREST.replace(method=method, weight_rounding=rounding)
    inline = quantize(cnn, cnn_calib, config)
    cached = quantize_with_report(cnn, config=config, ranges=ranges)
    assert cached.model.SerializeToString() == inline.SerializeToString()
    assert cached.report.samples == 24 and cached.report.ranges_file == str(ranges)
    assert not cached.report.notes


def test_without_hessians_gptq_falls_back_to_nearest(cnn, cnn_calib, tmp_path):
    ranges = _save(cnn, cnn_calib, tmp_path / "ranges.json", hessians=False)
    assert not hessians_path(ranges).exists()
    result = quantize_with_report(
        cnn, config=NEAREST.replace(weight_rounding="gptq"), ranges=ranges
    )
    assert len(result.report.notes) == 1 and "nearest" in result.report.notes[0]
    nearest = quantize(cnn, cnn_calib, NEAREST)
    assert [i.raw_data for i in result.model.graph.initializer] == [
        i.raw_data for i in nearest.graph.initializer
    ]


def test_ranges_of_another_model_are_refused(cnn, cnn_calib, tmp_path, rng):
    ranges = _save(cnn, cnn_calib, tmp_path / "ranges.json")
    other = make_cnn(rng)  # same graph, other weights
    with pytest.raises(RangesError) as info:
        quantize(other, config=NEAREST, ranges=ranges)
    _one_line(info, "ranges.json", "another model", "onnxq calibrate")
    assert model_fingerprint(other) != model_fingerprint(cnn)


def test_missing_statistics_are_refused(cnn, cnn_calib, tmp_path):
    minmax_only = _save(
        cnn, cnn_calib, tmp_path / "minmax.json", methods=(CalibrationMethod.MINMAX,)
    )
    with pytest.raises(RangesError) as info:
        quantize(cnn, config=NEAREST.replace(method="entropy"), ranges=minmax_only)
    _one_line(info, "histogram", "minmax")
    partial = _save(
        cnn, cnn_calib, tmp_path / "partial.json", NEAREST.replace(exclude_op_types=("Gemm",))
    )
    with pytest.raises(RangesError) as info:
        quantize(cnn, config=NEAREST, ranges=partial)
    _one_line(info, "no statistics for", "--exclude")
    full = _save(cnn, cnn_calib, tmp_path / "full.json", methods=ALL_METHODS)
    with pytest.raises(RangesError) as info:
        quantize(
            cnn,
            config=NEAREST.replace(method="moving_average", averaging_constant=0.5),
            ranges=full,
        )
    _one_line(info, "averaging constant 0.01", "--averaging-constant")


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"format": "something else"}', b'{"format": "onnxq.ranges"}'],
)
def test_unreadable_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "ranges.json"
    path.write_bytes(content)
    with pytest.raises(RangesError) as info:
        load_ranges(path)
    _one_line(info, "ranges.json")


def test_malformed_and_mismatched_companions(cnn, cnn_calib, tmp_path):
    ranges = _save(cnn, cnn_calib, tmp_path / "ranges.json")
    document = json.loads(ranges.read_text())
    first = next(iter(document["tensors"]))
    document["tensors"][first][0]["counts"] = [1, 2, 3]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    with pytest.raises(RangesError) as info:
        load_ranges(broken)
    _one_line(info, "malformed")
    # a later run replaced the companion but not the JSON (an interrupted write)
    other = _save(cnn, cnn_calib, tmp_path / "other.json")
    hessians_path(other).replace(hessians_path(ranges))
    with pytest.raises(RangesError) as info:
        quantize(cnn, config=NEAREST.replace(weight_rounding="gptq"), ranges=ranges)
    _one_line(info, "another calibration run")


def test_exactly_one_source(cnn, cnn_calib, tmp_path):
    ranges = _save(cnn, cnn_calib, tmp_path / "ranges.json")
    with pytest.raises(ValueError):
        quantize(cnn, cnn_calib, NEAREST, ranges=ranges)
    with pytest.raises(ValueError):
        quantize(cnn, config=NEAREST)
