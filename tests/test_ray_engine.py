"""The ray engine on a real local Ray instance: the same statistics and rankings as one process,
worker-read folders, one-line errors, and no actor outliving a failure or a Ctrl-C."""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import onnx.parser
import pytest

from onnxq.calibration import readers
from onnxq.calibration.observers import HistogramObserver
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.errors import CalibrationDataError, EngineError
from onnxq.executor import open_executor
from onnxq.model_io import input_specs
from onnxq.pipeline import calibrate
from onnxq.sensitivity import analyze_sensitivity

ray = pytest.importorskip("ray")

SIZES = [5, 3, 8, 1, 4, 6, 2]  # uneven batches: batch i goes to shard i % 2
CPUS = 2


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(
        address="local",
        num_cpus=CPUS,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def _feeds(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [
        {"x": (rng.standard_normal((n, 3, 16, 16)) * (1 + i)).astype(np.float32)}
        for i, n in enumerate(SIZES)
    ]


def _assert_same(one, two) -> None:
    """Min-max and histograms identical (within one bin is the floor), Hessians to float32."""
    assert (one.samples, one.batches) == (two.samples, two.batches)
    for name, group in one.observers.items():
        for own, other in zip(group, two.observers[name], strict=True):
            assert (own.min, own.max, own.count) == (other.min, other.max, other.count), name
            if isinstance(own, HistogramObserver):
                assert own.half_range == other.half_range, name
                assert np.abs(own.counts - other.counts).sum() <= 1, name
    for node, hessian in (one.hessians or {}).items():
        scale = np.abs(hessian).max()
        np.testing.assert_allclose(two.hessians[node], hessian, atol=1e-6 * scale, err_msg=node)


def _free_cpus(expected: int = CPUS, wait_s: float = 20.0) -> float:
    """The CPUs Ray has free once killed actors have released theirs."""
    deadline = time.monotonic() + wait_s
    while (free := ray.available_resources().get("CPU", 0)) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return free


def test_two_ray_workers_equal_one_process(cnn, rng):
    feeds = _feeds(rng)
    one = calibrate(cnn, feeds, QuantConfig())
    progress: list[int] = []
    with open_executor("ray", 2) as executor:
        two = calibrate(cnn, feeds, QuantConfig(), executor=executor, on_batch=progress.append)
        assert (executor.workers, executor.threads) == (2, 1)
    _assert_same(one, two)
    assert progress == sorted(progress) and progress[-1] == sum(SIZES)
    minmax = (CalibrationMethod.MINMAX,)
    alone = calibrate(cnn, feeds, QuantConfig(), methods=minmax, hessians=False)
    with open_executor("ray", 2) as executor:
        sharded = calibrate(cnn, feeds, QuantConfig(), methods=minmax, executor=executor)
    for name, (observer,) in alone.observers.items():
        assert (observer.min, observer.max) == (
            sharded.observers[name][0].min,
            sharded.observers[name][0].max,
        ), name


def test_folder_and_glob_sources_are_read_by_the_workers(cnn, rng, tmp_path, monkeypatch):
    feeds = _feeds(rng)
    for index, feed in enumerate(feeds):
        np.savez(tmp_path / f"part-{index}.npz", **feed)
    one = calibrate(cnn, tmp_path, QuantConfig())

    def driver_reads(path):
        raise AssertionError(f"the driver read {path}")

    monkeypatch.setattr(readers, "_load_npz", driver_reads)  # this process only
    with open_executor("ray", 2) as executor:
        from_folder = calibrate(cnn, tmp_path, QuantConfig(), executor=executor)
        from_glob = calibrate(cnn, str(tmp_path / "part-*.npz"), QuantConfig(), executor=executor)
    _assert_same(one, from_folder)
    _assert_same(one, from_glob)


def test_sensitivity_ranks_like_one_process(cnn, cnn_calib, rng):
    eval_data = {"x": rng.standard_normal((16, 3, 16, 16)).astype(np.float32)}
    local = analyze_sensitivity(cnn, cnn_calib, eval_data, QuantConfig())
    with open_executor("ray", 2) as executor:
        remote = analyze_sensitivity(cnn, cnn_calib, eval_data, QuantConfig(), executor=executor)
    assert [layer.name for layer in remote.layers] == [layer.name for layer in local.layers]
    for a, b in zip(local.layers, remote.layers, strict=True):
        assert b.gain == pytest.approx(a.gain, abs=1e-6), a.name
    assert remote.int8 == pytest.approx(local.int8, abs=1e-6)


ADD = """<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N] a, float[M] b) => (float[K] y) { s = Add(a, b)
 y = Relu(s) }"""


def test_a_bad_batch_is_the_same_one_line_error():
    model = onnx.parser.parse_model(ADD)
    good = {"a": np.ones(3, np.float32), "b": np.ones(1, np.float32)}
    bad = {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)}
    with (
        open_executor("ray", 2) as executor,
        pytest.raises(CalibrationDataError, match=r"^batch 3: ONNX Runtime failed"),
    ):
        executor.collect(
            model.SerializeToString(),
            {"s": [HistogramObserver()]},
            [good, good, good, bad, good],
            input_specs(model),
        )
    assert _free_cpus() == CPUS


class _KillsItsReader:
    """Unpickling this ends the process that does it: the actor handed the batch dies."""

    def __reduce__(self):
        import os

        return os._exit, (1,)


def test_a_dead_worker_is_an_error_naming_its_shard(cnn, rng):
    feeds = _feeds(rng)
    feeds[3] = {"x": _KillsItsReader()}
    with (
        open_executor("ray", 2) as executor,
        pytest.raises(
            EngineError,
            match=r"^calibration shard 1 of 2 \(batches 1, 3, 5, \.\.\.\) "
            r"lost its Ray worker, not retried",
        ),
    ):
        executor.collect(
            cnn.SerializeToString(), {"x": [HistogramObserver()]}, feeds, input_specs(cnn)
        )
    assert _free_cpus() == CPUS


def test_ctrl_c_kills_the_actors(cnn, rng):
    feeds = _feeds(rng)

    def interrupted():
        yield from feeds[:3]
        raise KeyboardInterrupt

    with open_executor("ray", 2) as executor, pytest.raises(KeyboardInterrupt):
        calibrate(cnn, interrupted(), QuantConfig(), executor=executor)
    assert _free_cpus() == CPUS


@pytest.fixture
def head_cluster(tmp_path):
    """A ``ray start --head --block`` cluster of its own, stopped afterwards."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}  # the cluster's workers import this checkout
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={CPUS}",
            "--include-dashboard=false",
            f"--object-store-memory={200 * 2**20}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # its GCS port answers once the head is up
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", env
    finally:
        head.send_signal(signal.SIGINT)  # ``--block`` then stops the processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):  # slow on a loaded machine
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # anything left in its group
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def test_cli_joins_a_ray_start_cluster(head_cluster, cnn_path, rng, tmp_path):
    """``onnxq calibrate --engine ray --ray-address`` in its own process: same ranges file."""
    import json
    import subprocess
    import sys

    address, env = head_cluster
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, feed in enumerate(_feeds(rng)):
        np.savez(folder / f"{index}.npz", **feed)
    cli = [
        sys.executable,
        "-c",
        "from onnxq.cli import main; main()",
        "calibrate",
        str(cnn_path),
        "--calib",
        str(folder),
        "--no-hessians",
    ]
    alone = subprocess.run(
        [*cli, "-o", str(tmp_path / "one.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode == 0, alone.stderr
    joined = subprocess.run(
        [
            *cli,
            "-o",
            str(tmp_path / "ray.json"),
            "--engine",
            "ray",
            "--ray-address",
            address,
            "--workers",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert joined.returncode == 0, joined.stderr
    assert "2 workers" in joined.stdout
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ray"))
    assert one["samples"] == two["samples"] and one["tensors"].keys() == two["tensors"].keys()
    for name, group in one["tensors"].items():
        for own, other in zip(group, two["tensors"][name], strict=True):
            assert (own["min"], own["max"]) == (other["min"], other["max"]), name
            if own["kind"] == "histogram":  # moving averages merge by their own rule
                assert own == other, name


def test_quantize_and_sensitivity_commands_on_ray(cnn_path, cnn_calib, tmp_path):
    """``--engine ray`` on the commands (Ray already up in this process: used as it is)."""
    from click.testing import CliRunner

    from onnxq.cli import main

    calib = tmp_path / "calib.npz"
    np.savez(calib, **cnn_calib)
    out = {engine: tmp_path / f"{engine}.onnx" for engine in ("local", "ray")}
    for engine, path in out.items():
        args = ["quantize", str(cnn_path), "-o", str(path), "--calib", str(calib)]
        result = CliRunner().invoke(main, [*args, "--engine", engine, "--workers", "2"])
        assert result.exit_code == 0, result.output
    assert out["local"].read_bytes() == out["ray"].read_bytes()  # same shards, same threads
    args = ["sensitivity", str(cnn_path), "--calib", str(calib), "--eval", str(calib)]
    local, remote = (
        CliRunner().invoke(main, [*args, *extra]) for extra in ([], ["--engine", "ray"])
    )
    assert remote.exit_code == 0, remote.output
    assert remote.output == local.output
