"""``onnxq calibrate`` then ``onnxq quantize --ranges``, refusals, and Ctrl-C."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from support import make_cnn

from onnxq.calibration import calibrate as calibrate_module
from onnxq.cli import main


def _invoke(*args: str | os.PathLike[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def _expect_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def calib_npz(tmp_path: Path, cnn_calib) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **cnn_calib)
    return path


def test_calibrate_then_quantize_equals_quantize(cnn_path, calib_npz, tmp_path):
    ranges = tmp_path / "ranges.json"
    result = _invoke(
        "calibrate", cnn_path, "--calib", calib_npz, "-o", ranges, "--batch-size", "5",
        "--workers", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "over 24 samples (5 batches, 2 workers): histogram, moving_average" in result.output
    assert f"wrote {ranges}" in result.output and ranges.with_suffix(".hessians.npz").exists()
    common = ["--method", "percentile", "--percentile", "99.9", "--batch-size", "5"]
    common += ["--weight-range", "mse"]
    cached, inline = tmp_path / "cached.onnx", tmp_path / "inline.onnx"
    result = _invoke("quantize", cnn_path, "-o", cached, "--ranges", ranges, *common)
    assert result.exit_code == 0, result.output
    assert f"calibration: from {ranges} 24 samples, percentile" in result.output
    result = _invoke("quantize", cnn_path, "-o", inline, "--calib", calib_npz, *common)
    assert result.exit_code == 0, result.output
    # two workers give the same histograms; GPTQ's Hessians agree to float32 rounding
    a, b = onnx.load(cached), onnx.load(inline)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    scales = {i.name: i.raw_data for i in b.graph.initializer if i.name.endswith("_scale")}
    assert {i.name: i.raw_data for i in a.graph.initializer if i.name in scales} == scales


def test_minmax_only_file_no_hessians_and_note(cnn_path, calib_npz, tmp_path):
    ranges = tmp_path / "ranges.json"
    result = _invoke(
        "calibrate", cnn_path, "--calib", calib_npz, "-o", ranges, "--method", "minmax",
        "--no-hessians",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "histogram" not in result.output and not ranges.with_suffix(".hessians.npz").exists()
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", cnn_path, "-o", out, "--ranges", ranges, "--method", "minmax")
    assert result.exit_code == 0, result.output
    assert "note: GPTQ fell back to nearest rounding" in result.output
    _expect_error(
        _invoke("quantize", cnn_path, "-o", out, "--ranges", ranges, "--method", "entropy"),
        "needs histogram statistics",
    )


def test_ranges_from_another_model_are_refused(cnn_path, calib_npz, tmp_path, rng):
    ranges = tmp_path / "ranges.json"
    assert _invoke("calibrate", cnn_path, "--calib", calib_npz, "-o", ranges).exit_code == 0
    other = tmp_path / "other.onnx"
    onnx.save(make_cnn(rng), other)
    out = tmp_path / "q.onnx"
    _expect_error(
        _invoke("quantize", other, "-o", out, "--ranges", ranges), "another model", "calibrate"
    )
    assert not out.exists()


def test_calib_xor_ranges(cnn_path, calib_npz, tmp_path):
    out = tmp_path / "q.onnx"
    _expect_error(_invoke("quantize", cnn_path, "-o", out), "--calib", "--ranges")
    ranges = tmp_path / "ranges.json"
    _expect_error(
        _invoke("quantize", cnn_path, "-o", out, "--calib", calib_npz, "--ranges", ranges),
        "exactly one",
    )
    _expect_error(
        _invoke("quantize", cnn_path, "-o", out, "--ranges", ranges), "no such ranges file"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_leaves_nothing(cnn_path, calib_npz, tmp_path, monkeypatch, workers):
    """Ctrl-C after two batches: exit 130, one line, no file written, no worker left."""
    opened = calibrate_module.open_feeds

    class Interrupted:
        """The opened stream, with a Ctrl-C while reading its third batch."""

        def __init__(self, *args, **kwargs) -> None:
            self.feeds = opened(*args, **kwargs)

        @property
        def samples_seen(self) -> int:
            return self.feeds.samples_seen

        def __iter__(self):
            for index, feed in enumerate(self.feeds):
                if index == 2:
                    raise KeyboardInterrupt
                yield feed

    monkeypatch.setattr(calibrate_module, "open_feeds", Interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    ranges = tmp_path / "ranges.json"
    result = _invoke(
        "calibrate", cnn_path, "--calib", calib_npz, "-o", ranges, "--workers", workers,
        "--batch-size", "4",
    )  # fmt: skip
    assert result.exit_code == 130, result.output
    assert result.output.strip() == "interrupted: nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", cnn_path, "-o", out, "--calib", calib_npz, "--workers", workers)
    assert result.exit_code == 130 and not out.exists()
    assert not multiprocessing.active_children()
