"""``--target openvino`` against its peers, in OpenVINO, in one run:
``python -m benchmarks.openvino_target``.

For a CNN (the zoo ResNet-18) and a transformer (ViT-S/16, ``models.vit``), both at 224x224 and
calibrated on the same photo crops (``wide_calibration_crops``: eight photos), and a trained
transformer (all-MiniLM-L6-v2, calibrated on and measured with sentences, as in
``benchmarks.run``), four models run in OpenVINO's CPU plugin: fp32, onnxq ``--target
openvino``, onnxq's default target (``ort-cpu``) and ONNX Runtime's ``quantize_static`` QDQ
output (per-channel, u8 activations, s8 weights, after its ``quant_pre_process``); for the
photos also onnxq ``--target openvino`` calibrated on the two scikit-learn photos only. For
each: how many weighted layers run u8/i8 in OpenVINO's runtime model, SQNR and mean cosine
against fp32 (OpenVINO, f32) on held-out data (photos: crops of the evaluation region of the
two scikit-learn photos; SQNR on other crops of their calibration region too), the largest
share of an activation's values clipped on the held-out data (``onnxq.coverage``), and batch-1
latency at a fixed thread count, interleaved, at two inference precisions: ``f32`` and the plugin's
default (``bf16`` on CPUs with AMX, so there "fp32" means what a user gets without a hint).

Options: ``--models resnet,vit,minilm``, ``--out benchmarks/results``, ``--threads 1``,
``--rounds 10``, ``--calib 128`` (photo crops), ``--quick`` (8 calibration crops, MiniLM's quick
zoo sizes, 3 rounds: a smoke run), ``--onednn-max-isa ISA`` (sets ``ONEDNN_MAX_CPU_ISA`` before
OpenVINO loads, e.g. ``AVX2``: an *emulation* of an older CPU, recorded as such; writes
``openvino-ISA.md``), ``--keep-models DIR``.
Writes ``openvino.md`` and ``openvino.json`` into ``--out``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

DEFAULT_OUT = Path("benchmarks/results")
MODELS = ("resnet", "vit", "minilm")
TITLES = {"resnet": "ResNet-18", "vit": "ViT-S/16", "minilm": "all-MiniLM-L6-v2"}
MINILM_EVAL = 100
VARIANTS = (
    ("fp32", "fp32"),
    ("onnxq-openvino", "onnxq --target openvino"),
    ("onnxq-openvino-2photos", "onnxq --target openvino, calibrated on 2 photos only"),
    ("onnxq-default", "onnxq (default target ort-cpu)"),
    ("ort-static", "ORT quantize_static (QDQ, per-channel)"),
)
EVAL_IMAGES = 8
Feeds = dict[str, np.ndarray]  # samples on axis 0


@dataclass(frozen=True)
class Case:
    """One model and its data: calibration, evaluation and (photos) other crops of the
    calibration region."""

    fp32: Path
    calib: Feeds
    evaluation: Feeds
    in_region: Feeds | None = None
    narrow_calib: Feeds | None = None  # photos: the two photos' calibration region only


@dataclass
class Row:
    """One model variant: weighted layers int8 in OpenVINO, SQNR, latencies."""

    slug: str
    label: str
    path: Path
    integer: int = 0
    weighted: int = 0
    sqnr_db: float | None = None
    sqnr_in_region_db: float | None = None
    cosine: float | None = None
    clipped: float | None = None
    latency_ms: dict[str, float] | None = None
    quantize_s: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openvino_target")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--onednn-max-isa", default=None)
    parser.add_argument("--keep-models", type=Path, default=None)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {MODELS}")
    if args.quick:
        args.calib, args.rounds = 8, 3
    return args


def prepare_case(name: str, folder: Path, calib_images: int, *, quick: bool = False) -> Case:
    """The float model ``name`` exported (and checked against torch) into ``folder``, with its
    data."""
    if name == "minilm":
        from benchmarks.zoo import FULL, QUICK, load_feeds, prepare

        zoo = prepare("minilm", folder / "minilm", (QUICK if quick else FULL)["minilm"])
        evaluation = {k: v[:MINILM_EVAL] for k, v in load_feeds(zoo.eval).items()}
        return Case(zoo.fp32, load_feeds(zoo.calib), evaluation)
    from calibration.images import (
        eval_inputs,
        photo_crops,
        resnet_inputs,
        wide_calibration_crops,
    )
    from models.resnet import resnet18_factory
    from models.vit import vit_s_factory
    from onnxq.export import export_torch

    factory = {"resnet": resnet18_factory, "vit": vit_s_factory}[name]
    module, example = factory()
    path = folder / f"{name}.fp32.onnx"
    export_torch(module, example, path, input_names=["input"])
    return Case(
        path,
        {"input": wide_calibration_crops(calib_images)},
        {"input": eval_inputs(EVAL_IMAGES)},
        {"input": photo_crops("calib", EVAL_IMAGES, seed=1)},
        {"input": resnet_inputs(calib_images)},
    )


def quantize_variants(fp32: Path, calib: Feeds, narrow_calib: Feeds | None = None) -> list[Row]:
    """fp32 and the quantized variants of one model (onnxq calibrated on ``narrow_calib`` too,
    where given), written beside ``fp32``."""
    import onnxq
    from onnxq.config import QuantConfig

    rows = [Row("fp32", "fp32", fp32)]
    onnxq_variants = [
        ("onnxq-openvino", "openvino", calib),
        ("onnxq-openvino-2photos", "openvino", narrow_calib),
        ("onnxq-default", "ort-cpu", calib),
    ]
    for slug, target, data in onnxq_variants:
        if data is None:
            continue
        path = fp32.with_name(fp32.name.replace("fp32", slug))
        start = time.perf_counter()
        onnx.save(onnxq.quantize(fp32, data, QuantConfig(target=target)), path)
        rows.append(Row(slug, dict(VARIANTS)[slug], path, quantize_s=time.perf_counter() - start))
    path = fp32.with_name(fp32.name.replace("fp32", "ort-static"))
    start = time.perf_counter()
    _ort_quantize_static(fp32, path, calib)
    elapsed = time.perf_counter() - start
    rows.append(Row("ort-static", dict(VARIANTS)["ort-static"], path, quantize_s=elapsed))
    return rows


def _ort_quantize_static(fp32: Path, out: Path, calib: Feeds) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from benchmarks.zoo import batches

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(batches(calib, 1))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    fp32, out = fp32.resolve(), out.resolve()
    prepared = out.with_suffix(".pre.onnx")
    with contextlib.chdir(out.parent):  # ORT's quantizers leave side files in the cwd
        try:
            quant_pre_process(str(fp32), str(prepared))
        except Exception:  # ORT's symbolic shape inference gives up on some graphs (MiniLM)
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


def measure(rows: list[Row], case: Case, *, threads: int, rounds: int) -> None:
    """Fill each row's int8 counts, SQNR and mean cosine on the evaluation data, SQNR on other
    crops of the calibration region (photos), the largest share of an activation's values
    clipped on the evaluation data, and latencies (f32 and the plugin's default)."""
    from benchmarks.zoo import batches
    from onnxq.coverage import range_coverage
    from onnxq.evaluate import cosine_per_sample, sqnr_db
    from onnxq.targets.openvino import run_model, runtime_precisions

    evaluation = batches(case.evaluation, 1)
    in_region = None if case.in_region is None else batches(case.in_region, 1)

    def outputs(path: Path, feeds: list[Feeds]) -> np.ndarray:
        return np.concatenate([run_model(path, feed)[0] for feed in feeds])

    reference = outputs(rows[0].path, evaluation)
    in_region_reference = None if in_region is None else outputs(rows[0].path, in_region)
    for row in rows:
        report = runtime_precisions(row.path, inference_precision="f32")
        row.integer, row.weighted = len(report.integer_layers), len(report.weighted)
        if row.slug == "fp32":
            continue
        out = outputs(row.path, evaluation)
        row.sqnr_db = sqnr_db(reference, out)
        row.cosine = float(cosine_per_sample(reference, out).mean())
        if in_region is not None:
            row.sqnr_in_region_db = sqnr_db(in_region_reference, outputs(row.path, in_region))
        coverage = range_coverage(onnx.load(row.path), evaluation)
        row.clipped = coverage[0].fraction if coverage else 0.0
    _time(rows, evaluation[0], threads=threads, rounds=rounds)


def _time(rows: list[Row], feed: Feeds, *, threads: int, rounds: int) -> None:
    from onnxq.targets.openvino import time_models

    for row in rows:
        row.latency_ms = {}
    for precision in ("f32", None):
        latencies = time_models(
            [row.path for row in rows],
            feed,
            threads=threads,
            rounds=rounds,
            runs_per_round=5,
            inference_precision=precision,
        )
        for row, latency in zip(rows, latencies, strict=True):
            row.latency_ms[precision or "default"] = latency.median_ms


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import openvino as ov

    from benchmarks.cpu_mask import active_mask
    from benchmarks.zoo import FULL, QUICK
    from onnxq.isa import cpu_features
    from onnxq.runtime import cpu_model_name

    features = cpu_features()
    core = ov.Core()
    return {
        "openvino": ov.get_version(),
        "cpu_model": cpu_model_name(),
        "cpu_flags": [name for name in ("avx2", "avx512", "vnni") if getattr(features, name)],
        "cpu_mask": active_mask(),
        "default_inference_precision": core.get_property(
            "CPU", "INFERENCE_PRECISION_HINT"
        ).to_string(),
        "onednn_max_cpu_isa": args.onednn_max_isa or "native",
        "threads": args.threads,
        "rounds": args.rounds,
        "calibration_images": args.calib,
        "calibration_sentences": (QUICK if args.quick else FULL)["minilm"].calib,
        "python": platform.python_version(),
    }


def markdown(results: dict[str, list[Row]], env: dict[str, Any]) -> str:
    from calibration.images import EVAL_WIDTH

    isa = env["onednn_max_cpu_isa"]
    lines = [
        "# onnxq --target openvino, measured in OpenVINO",
        "",
        f"OpenVINO {env['openvino']}, CPU plugin; {env['cpu_model']} "
        f"({', '.join(env['cpu_flags'])}); oneDNN ISA: {isa}"
        + (" (EMULATED with ONEDNN_MAX_CPU_ISA)" if isa != "native" else "")
        + (f"; CPUID masked to {env['cpu_mask']}" if env.get("cpu_mask") else "")
        + f"; {env['threads']} thread(s), batch 1, {env['rounds']} interleaved rounds x 5 runs, "
        f"median; accuracy vs fp32 in OpenVINO (f32).",
        "",
        f"Photos (ResNet-18, ViT-S): calibration on {env['calibration_images']} crops of eight "
        "photos (the calibration region of scikit-learn's two sample photos and six sample "
        "photos of scikit-image and matplotlib, whole: `calibration.images."
        "wide_calibration_crops`); '2 photos only': on "
        f"{env['calibration_images']} crops of the two scikit-learn photos' calibration region. "
        f"'eval' is {EVAL_IMAGES} crops of the evaluation region (the right {EVAL_WIDTH} columns "
        "of the two scikit-learn photos, pixels no calibration crop saw), 'calib region' "
        f"{EVAL_IMAGES} other crops of their calibration region. MiniLM: "
        f"calibration on {env['calibration_sentences']} sentences, 'eval' is up to "
        f"{MINILM_EVAL} held-out sentences (seq 64). "
        "'cosine': mean per-sample cosine of the first output on 'eval'. 'clipped': the largest "
        "share of one activation's values beyond its quantization range on 'eval' "
        "(`onnxq.coverage`): where it is large, the calibration data does not cover the "
        "evaluation data and the accuracy lost there is the ranges', not the scheme's.",
        "",
        "Latency ratios are to fp32 at the same inference precision: `f32` (hint set) and "
        f"the plugin's default (`{env['default_inference_precision']}` here; bf16 on CPUs "
        "with AMX: float layers run bf16 there, in the fp32 model and in the quantized ones).",
        "",
        "Produced by `python -m benchmarks.openvino_target"
        + (f" --onednn-max-isa {isa}" if isa != "native" else "")
        + "`.",
        "",
    ]
    for name, rows in results.items():
        base = rows[0].latency_ms
        lines += [
            f"## {name}",
            "",
            "| variant | weighted layers u8/i8 | SQNR dB eval | SQNR dB calib region | cosine "
            "| clipped | f32 hint ms | vs fp32 | default hint ms | vs fp32 | quantize s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lat = row.latency_ms
            lines.append(
                f"| {row.label} | {row.integer} / {row.weighted} "
                f"| {_cell(row.sqnr_db, '{:.1f}')} | {_cell(row.sqnr_in_region_db, '{:.1f}')} "
                f"| {_cell(row.cosine, '{:.4f}')} | {_cell(row.clipped, '{:.2%}')} "
                f"| {lat['f32']:.2f} | {lat['f32'] / base['f32']:.2f}x "
                f"| {lat['default']:.2f} | {lat['default'] / base['default']:.2f}x "
                f"| {'-' if row.quantize_s is None else f'{row.quantize_s:.1f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.onednn_max_isa:
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.onednn_max_isa  # before OpenVINO loads
    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="onnxq-ov-bench-") as tmp:
        folder = args.keep_models or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            print(f"{name}: export and quantize", file=sys.stderr)
            case = prepare_case(name, folder, args.calib, quick=args.quick)
            rows = quantize_variants(case.fp32, case.calib, case.narrow_calib)
            print(f"{name}: measure in OpenVINO", file=sys.stderr)
            measure(rows, case, threads=args.threads, rounds=args.rounds)
            results[TITLES[name]] = rows
    env = environment(args)
    suffix = f"-{args.onednn_max_isa}" if args.onednn_max_isa else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"openvino{suffix}.md").write_text(markdown(results, env))
    from onnxq.model_io import write_json

    data = {
        "environment": env,
        "models": {
            name: [
                {k: (str(v) if isinstance(v, Path) else v) for k, v in row.__dict__.items()}
                for row in rows
            ]
            for name, rows in results.items()
        },
    }
    write_json(data, args.out / f"openvino{suffix}.json")
    print(f"wrote {args.out / f'openvino{suffix}.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
