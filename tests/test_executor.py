"""The executor seam: engines chosen by name, local process tasks, and the one-line errors of a
Ray that is missing or out of reach (these need no running Ray)."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from onnxq.cli import main
from onnxq.errors import ConfigError, EngineError
from onnxq.executor import InProcess, local_executor, open_executor


def _square(x: int) -> int:
    return x * x


def test_local_engines_map_in_item_order():
    items = list(range(7))
    assert InProcess().map(_square, items) == [x * x for x in items]
    assert local_executor(2).map(_square, items) == [x * x for x in items]


def test_engine_choice_errors():
    with pytest.raises(ConfigError, match="engine must be one of local, ray"):
        open_executor("dask")
    with pytest.raises(ConfigError, match="needs the ray engine"):
        open_executor("local", 2, "127.0.0.1:6379")


def test_missing_ray_names_the_extra(monkeypatch, cnn_path, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(EngineError, match=r'pip install "onnxq\[ray\]"'):
        open_executor("ray")
    result = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(cnn_path),
            "--calib",
            str(tmp_path),
            "-o",
            str(tmp_path / "r.json"),
            "--engine",
            "ray",
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: the ray engine needs Ray, which is not installed: pip install "onnxq[ray]"'
    ]


def test_unreachable_address_is_one_line(cnn_path, cnn_calib, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import numpy as np

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **cnn_calib)
    args = ["sensitivity", str(cnn_path), "--calib", str(calib), "--eval", str(calib)]
    result = CliRunner().invoke(main, [*args, "--engine", "ray", "--ray-address", "127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: cannot reach the Ray cluster at 127.0.0.1:9: ")
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # Ray's own variable names the cluster too
    result = CliRunner().invoke(main, [*args, "--engine", "ray"])
    assert result.exit_code == 2 and "cannot reach the Ray cluster at 127.0.0.1:9" in result.output


def test_sensitivity_over_local_processes_ranks_like_one(cnn, cnn_calib, rng):
    from onnxq.sensitivity import analyze_sensitivity

    eval_data = {"x": rng.standard_normal((16, 3, 16, 16)).astype("float32")}
    one = analyze_sensitivity(cnn, cnn_calib, eval_data)
    two = analyze_sensitivity(cnn, cnn_calib, eval_data, workers=2)
    assert [layer.name for layer in two.layers] == [layer.name for layer in one.layers]
    for a, b in zip(one.layers, two.layers, strict=True):
        assert b.gain == pytest.approx(a.gain, abs=1e-6), a.name
