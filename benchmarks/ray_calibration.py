"""Calibration on Ray beside local workers and ONNX Runtime's calibrators, and Ray's overheads.

``python -m benchmarks.ray_calibration`` calibrates one prepared ResNet-18 (224x224,
``benchmarks.calibration_memory._resnet_model``) on the same photo-crop batches, written once as
a folder of ``.npz`` files (one batch each: every onnxq engine reads it in its workers), in one
run:

1. Wall time of histogram calibration (``--method percentile``, the statistics percentile,
   entropy and MSE share; no Hessians) with ``--workers 1`` and ``2`` (local processes) and with
   ``--engine ray`` and 1 and 2 actors on a local Ray instance already started; ONNX Runtime's
   ``MinMax`` and ``Percentile`` calibrators (``create_calibrator``) on the same batches.
2. The overheads a cluster run adds (``docs/scale-out.md`` predicts from them): Ray start and
   shutdown; actor start with its session; the round trip of one driver-fed batch (the batch
   through the object store to an actor that does nothing) and of one batch path; the cost of one
   batch in one shard (1 ORT thread); the size of a shard's observers and their merge, for the
   histograms and for GPTQ's Hessians.

Writes ``benchmarks/results/ray_calibration.md`` and ``.json``. Times are one run on a shared
machine: ratios within the run are the figures to read.
"""

from __future__ import annotations

import argparse
import copy
import logging
import pickle
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.model_io import atomic_write, write_json

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 8


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import ray

    from benchmarks.calibration_memory import _resnet_model

    with tempfile.TemporaryDirectory(prefix="onnxq-ray-bench-") as tmp:
        folder = Path(tmp)
        model, _ = _resnet_model(folder)
        data = folder / "batches"
        _write_batches(data, args.samples)
        report: dict[str, Any] = {"environment": _environment(ray), "samples": args.samples}
        overheads: dict[str, float] = {}
        started = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=args.cpus,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        overheads["ray_start_s"] = time.perf_counter() - started
        try:
            report["runs"] = _calibrations(model, data, args.samples)
            overheads.update(_overheads(ray, model, data))
        finally:
            started = time.perf_counter()
            ray.shutdown()
            overheads["ray_shutdown_s"] = time.perf_counter() - started
        report["overheads"] = overheads
    write_json(report, args.out / "ray_calibration.json")
    table = _markdown(report)
    atomic_write(args.out / "ray_calibration.md", table.encode())
    print(table)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def _write_batches(folder: Path, samples: int) -> None:
    from calibration.images import resnet_inputs

    folder.mkdir()
    for index, start in enumerate(range(0, samples, BATCH)):
        batch = resnet_inputs(min(BATCH, samples - start), seed=index)
        np.savez(folder / f"{index}.npz", input=batch)


def _timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def _calibrations(model: Path, data: Path, samples: int) -> list[dict[str, Any]]:
    from onnxq.config import CalibrationMethod, QuantConfig
    from onnxq.executor import open_executor
    from onnxq.pipeline import calibrate

    config = QuantConfig(batch_size=BATCH)
    methods = (CalibrationMethod.PERCENTILE,)
    runs = []
    for engine, workers in (("local", 1), ("local", 2), ("ray", 1), ("ray", 2)):
        with open_executor(engine, workers) as executor:
            wall, result = _timed(
                lambda executor=executor: calibrate(
                    model, data, config, methods=methods, hessians=False, executor=executor
                )
            )
        assert result.samples == samples
        runs.append({"tool": f"onnxq {engine}", "workers": workers, "wall_s": wall})
    for method in ("MinMax", "Percentile"):
        wall, _ = _timed(lambda method=method: _ort_calibrate(model, data, method))
        runs.append({"tool": f"ORT {method}", "workers": 1, "wall_s": wall})
    base = runs[0]["wall_s"]
    for run in runs:
        run["per_sample_ms"] = 1000 * run["wall_s"] / samples
        run["x_local_1"] = run["wall_s"] / base
    return runs


def _ort_calibrate(model: Path, data: Path, method: str) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    files = iter(sorted(data.glob("*.npz"), key=lambda path: int(path.stem)))

    class Reader:
        """ONNX Runtime's reader protocol over the same batch files."""

        def get_next(self) -> dict[str, np.ndarray] | None:
            path = next(files, None)
            return None if path is None else dict(np.load(path))

    with tempfile.TemporaryDirectory(prefix="onnxq-ort-calib-") as tmp:
        calibrator = create_calibrator(
            str(model),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
        )
        calibrator.collect_data(Reader())
        calibrator.compute_data()


class _Echo:
    """A Ray actor that takes a batch and does nothing: the transfer alone."""

    def touch(self, batch: Any) -> None:
        return None


def _overheads(ray: Any, model: Path, data: Path) -> dict[str, float]:
    """Actor start, per-batch transfer (driver-fed and path), per-batch compute, observers size
    and merge, for one shard of the same model and batches."""
    import onnx_ir as ir

    from onnxq.calibration.collect import ShardObserver
    from onnxq.calibration.ranges import observers_for
    from onnxq.calibration.readers import BatchFile, load_batch
    from onnxq.config import CalibrationMethod, QuantConfig
    from onnxq.executor import merge_shards
    from onnxq.model_io import input_specs, load_model
    from onnxq.passes.plan import plan_quantization
    from onnxq.ray_engine import _ShardWorker

    proto = load_model(model)
    model_bytes = proto.SerializeToString()
    inputs = input_specs(proto)
    plan = plan_quantization(ir.from_proto(proto), QuantConfig())
    fresh = {root: observers_for((CalibrationMethod.PERCENTILE,)) for root in plan.roots}
    files = [BatchFile("npz", path) for path in sorted(data.glob("*.npz"), key=_index)]
    feed = load_batch(files[0], inputs, 0)
    out: dict[str, float] = {"batch_mb": sum(a.nbytes for a in feed.values()) / 1e6}

    worker = ray.remote(_ShardWorker).options(num_cpus=1)
    actor_s, actor = _timed(lambda: worker.remote(ray.put(model_bytes), fresh, inputs, 1))
    first_s, _ = _timed(lambda: ray.get(actor.observe.remote(0, files[0])))
    out["actor_start_s"] = actor_s + first_s  # constructor, session, first batch
    echo = ray.remote(_Echo).options(num_cpus=1).remote()
    ray.get(echo.touch.remote(feed))
    out["feed_round_trip_ms"] = 1000 * _median(lambda: ray.get(echo.touch.remote(feed)), 21)
    out["path_round_trip_ms"] = 1000 * _median(lambda: ray.get(echo.touch.remote(files[0])), 21)
    ray.kill(actor)
    ray.kill(echo)

    shards = []
    for k in (0, 1):
        shard = ShardObserver(model_bytes, copy.deepcopy(fresh), inputs=inputs, threads=1)
        batches = files[k::2]
        wall, _ = _timed(lambda shard=shard, batches=batches, k=k: _observe(shard, batches, k))
        out[f"shard_{k}_batch_ms"] = 1000 * wall / len(batches)
        shards.append(shard.observers)
    out["observers_mb"] = len(pickle.dumps(shards[0])) / 1e6
    out["merge_ms_per_shard"] = 1000 * _timed(lambda: merge_shards(fresh, shards))[0] / 2
    out.update(_hessian_shards(model_bytes, plan, inputs, files))
    return out


def _hessian_shards(
    model_bytes: bytes, plan: Any, inputs: Any, files: list[Any]
) -> dict[str, float]:
    """GPTQ's Hessians as a shard returns them (one batch each): size and merge, per shard."""
    from onnxq.calibration.calibrate import weight_hessian_observers
    from onnxq.calibration.collect import ShardObserver
    from onnxq.executor import merge_shards

    fresh: dict[str, list[Any]] = {}
    for tensor, observer in weight_hessian_observers(plan).values():
        fresh.setdefault(tensor, []).append(observer)
    shards = []
    for k in (0, 1):
        shard = ShardObserver(model_bytes, copy.deepcopy(fresh), inputs=inputs, threads=1)
        shard.observe(k, files[k])
        shards.append(shard.observers)
    merge_s, _ = _timed(lambda: merge_shards(fresh, shards))
    return {
        "hessian_observers_mb": len(pickle.dumps(shards[0])) / 1e6,
        "hessian_merge_ms_per_shard": 1000 * merge_s / 2,
    }


def _observe(shard: Any, batches: list[Any], k: int) -> None:
    for step, batch in enumerate(batches):
        shard.observe(k + 2 * step, batch)


def _median(run: Callable[[], Any], repeat: int) -> float:
    return float(np.median([_timed(run)[0] for _ in range(repeat)]))


def _index(path: Path) -> int:
    return int(path.stem)


def _environment(ray: Any) -> dict[str, Any]:
    import onnxruntime

    from onnxq.calibration.parallel import available_cores
    from onnxq.isa import cpuinfo_value

    return {
        "cpu": cpuinfo_value("model name") or platform.processor(),
        "cores": available_cores(),
        "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _markdown(report: dict[str, Any]) -> str:
    env, over = report["environment"], report["overheads"]
    lines = [
        "# Calibration on Ray beside local workers and ONNX Runtime",
        "",
        f"ResNet-18 224x224, {report['samples']} photo crops in batches of {BATCH} (one .npz "
        f"file each); {env['cpu']}, {env['cores']} cores; Ray {env['ray']}, ONNX Runtime "
        f"{env['onnxruntime']}. One run; onnxq collects histograms (percentile), no Hessians.",
        "",
        "| tool | workers | wall s | ms / sample | x local 1 |",
        "|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['tool']} | {run['workers']} | {run['wall_s']:.2f} | "
            f"{run['per_sample_ms']:.1f} | {run['x_local_1']:.2f} |"
        )
    lines += [
        "",
        "Ray's overheads (same model and batches):",
        "",
        "| what | value |",
        "|---|---|",
        f"| Ray local start / shutdown | {over['ray_start_s']:.2f} s / "
        f"{over['ray_shutdown_s']:.2f} s |",
        f"| actor start (constructor, ORT session, first batch) | {over['actor_start_s']:.2f} s |",
        f"| one batch ({over['batch_mb']:.1f} MB) driver -> actor, round trip (median) | "
        f"{over['feed_round_trip_ms']:.2f} ms |",
        f"| one batch path driver -> actor, round trip (median) | "
        f"{over['path_round_trip_ms']:.2f} ms |",
        f"| one batch observed in a shard (1 ORT thread; read from file) | "
        f"{over['shard_0_batch_ms']:.0f} ms, {over['shard_1_batch_ms']:.0f} ms |",
        f"| a shard's observers, pickled | {over['observers_mb']:.2f} MB |",
        f"| merge, per shard | {over['merge_ms_per_shard']:.1f} ms |",
        f"| with GPTQ Hessians: a shard's Hessians, pickled / their merge, per shard | "
        f"{over['hessian_observers_mb']:.0f} MB / {over['hessian_merge_ms_per_shard']:.0f} ms |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
