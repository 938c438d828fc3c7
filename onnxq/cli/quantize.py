"""``onnxq quantize``: static int8 QDQ quantization with a short summary."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from onnxq.cli.options import (
    CALIB_HELP,
    batching,
    engine_options,
    method_option,
    plan_filters,
    target_option,
)
from onnxq.config import (
    ACTIVATION_TYPES,
    QuantConfig,
    QuantMode,
    QuantType,
    WeightRange,
    WeightRounding,
)
from onnxq.errors import ConfigError
from onnxq.executor import Executor
from onnxq.model_io import check_output_path, save_model, write_json
from onnxq.targets import DEFAULT_TARGET, get_target
from onnxq.targets.ort_format import ort_path


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help=CALIB_HELP,
)
@click.option(
    "--ranges",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Ranges file from `onnxq calibrate`: skips calibration (instead of --calib).",
)
@click.option(
    "--mode",
    type=click.Choice([m.value for m in QuantMode]),
    default=QuantMode.STATIC.value,
    show_default=True,
    help="dynamic: int8 weights, activations quantized at run time (--calib optional: it "
    "only feeds SmoothQuant). weight-only: blocked 4- or 8-bit MatMul weights (MatMulNBits in "
    "ONNX Runtime), float activations (--calib optional: it feeds GPTQ).",
)
@click.option(
    "--block-size",
    type=int,
    default=32,
    show_default=True,
    help="weight-only: weights along K sharing one scale (a power of two >= 16: 32, 64, 128).",
)
@click.option(
    "--weight-rounding",
    type=click.Choice([r.value for r in WeightRounding]),
    default="gptq",
    show_default=True,
    help="gptq: error-compensating rounding from calibration data; nearest: plain rounding.",
)
@click.option(
    "--smooth-alpha",
    type=float,
    default=None,
    help="SmoothQuant strength for weight-MatMul inputs (from --calib; dynamic mode without "
    "it: from random token sequences, for token models). Default: 0.7 for 8-bit weights, "
    "0.6 for 7-bit ones.",
)
@click.option("--no-smooth", is_flag=True, help="Turn SmoothQuant off.")
@click.option(
    "--smooth-fold-only",
    is_flag=True,
    help="Smooth only where the factor folds into a LayerNorm or MatMul (SmoothQuant adds no "
    "node; post-LN encoders then smooth fewer inputs).",
)
@method_option
@click.option("--percentile", type=float, default=99.999, show_default=True)
@click.option(
    "--averaging-constant",
    type=float,
    default=0.01,
    show_default=True,
    help="EMA weight of each batch for --method moving_average.",
)
@click.option(
    "--weight-range",
    type=click.Choice([r.value for r in WeightRange]),
    default="minmax",
    show_default=True,
    help="Weight ranges: min-max, or clipped for the least squared error (each weight's error "
    "weighed by its input's E[x^2] from calibration: weights of dead inputs are clipped).",
)
@target_option
@click.option(
    "--per-channel/--per-tensor",
    default=None,
    help="Weight scales per output channel (default: where the target allows it).",
)
@click.option(
    "--activation-type",
    type=click.Choice([t.value for t in ACTIVATION_TYPES]),
    default=None,
    help="Default: the target's (ort-cpu: uint8).",
)
@click.option(
    "--weight-type",
    type=click.Choice([t.value for t in QuantType]),
    default=None,
    help="Default: the target's (ort-cpu: int8). weight-only: uint4 (default, a zero point "
    "per block), int4 (symmetric), uint8 or int8.",
)
@click.option(
    "--reduce-range/--no-reduce-range",
    default=None,
    help="7-bit weights. Default: the target's (on for ort-cpu, safe on x86 without VNNI).",
)
@batching
@engine_options
@plan_filters
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=Path),
    help="Evaluation data for --min-cosine / --min-sqnr / --max-drop (default: --calib).",
)
@click.option(
    "--min-cosine",
    type=float,
    help="Leave the fewest layers float so that mean cosine to fp32 on --eval >= this.",
)
@click.option(
    "--min-sqnr",
    type=float,
    help="Leave the fewest layers float so that the output SQNR to fp32 on --eval >= this (dB).",
)
@click.option(
    "--max-drop",
    type=float,
    help="Leave the fewest layers float so that top-1 drops at most this many points.",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, path_type=Path),
    help=".npy labels for --max-drop (default: fp32's own predictions).",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the run's report as JSON.",
)
def command(
    model: Path,
    output: Path,
    calib: Path | None,
    ranges: Path | None,
    mode: str,
    block_size: int,
    weight_rounding: str,
    smooth_alpha: float | None,
    no_smooth: bool,
    smooth_fold_only: bool,
    method: str,
    percentile: float,
    averaging_constant: float,
    weight_range: str,
    target: str,
    per_channel: bool | None,
    activation_type: str | None,
    weight_type: str | None,
    reduce_range: bool | None,
    batch_size: int,
    max_samples: int | None,
    executor: Executor,
    plan: dict[str, Any],
    eval_data: Path | None,
    min_cosine: float | None,
    min_sqnr: float | None,
    max_drop: float | None,
    labels: Path | None,
    summary_json: Path | None,
) -> None:
    """Int8 quantization of MODEL: static QDQ calibrated on --calib data (or --ranges),
    --mode dynamic, or --mode weight-only (4-bit MatMul weights).

    A QDQ model from another tool (torch.ao / pt2e QAT, ModelOpt) given without --calib or
    --ranges is finished with its own qparams: int8 weights, int32 biases, Q/DQ placement ONNX
    Runtime fuses. It keeps its scheme (the ort-cpu rules it breaks are warnings) unless
    --target is given, which converts it where that is exact."""
    from tqdm import tqdm

    from onnxq.dynamic import quantize_dynamic_with_report
    from onnxq.pipeline import quantize_with_report
    from onnxq.weight_only import quantize_weight_only_with_report

    if mode == QuantMode.STATIC and calib is None and ranges is None:
        _finish_qdq(model, output, target, summary_json)
        return
    if mode == QuantMode.STATIC and (calib is None) == (ranges is None):
        raise ConfigError("give --calib DATA or --ranges FILE (exactly one)")
    if mode != QuantMode.STATIC and ranges is not None:
        raise ConfigError("--ranges applies to static mode only")
    sources = [path for path in (model, calib, ranges) if path is not None]
    check_output_path(output, *sources)
    if ".ort" in get_target(target).extra_files:
        check_output_path(ort_path(output), *sources)
    if summary_json is not None:
        check_output_path(summary_json, output, *sources)
    config = QuantConfig(
        target=target,
        method=method,
        percentile=percentile,
        averaging_constant=averaging_constant,
        weight_range=weight_range,
        per_channel=per_channel,
        activation_type=activation_type,
        weight_type=weight_type,
        reduce_range=reduce_range,
        batch_size=batch_size,
        max_samples=max_samples,
        **plan,
        weight_rounding=weight_rounding,
        smooth=not no_smooth,
        smooth_alpha=smooth_alpha,
        smooth_fold_only=smooth_fold_only,
        block_size=block_size,
    )
    targeted = any(value is not None for value in (min_cosine, min_sqnr, max_drop))
    if (eval_data is not None and not targeted) or (
        targeted and (mode != QuantMode.STATIC or calib is None)
    ):
        raise ConfigError(
            "--min-cosine/--min-sqnr/--max-drop need --calib (static mode); --eval needs one "
            "of them"
        )
    if targeted:
        import numpy as np

        from onnxq.sensitivity import quantize_to_target

        truth = np.load(labels) if labels is not None else None
        result = quantize_to_target(
            model,
            calib,
            calib if eval_data is None else eval_data,
            config,
            min_cosine=min_cosine,
            min_sqnr=min_sqnr,
            max_drop=max_drop,
            labels=truth,
            executor=executor,
        )
        _save(result.model, output, target)
        _report(result.report.to_dict(), output, summary_json)
        return
    if mode == QuantMode.DYNAMIC:
        result = quantize_dynamic_with_report(model, config, calibration_data=calib)
        _save(result.model, output, target)
        _report(result.report.to_dict(), output, summary_json)
        return
    with tqdm(
        desc="calibrating",
        unit="sample",
        file=sys.stderr,
        disable=None if calib is not None else True,
        total=max_samples,
    ) as bar:
        if mode == QuantMode.WEIGHT_ONLY:
            result = quantize_weight_only_with_report(
                model,
                config,
                calibration_data=calib,
                workers=executor.workers,
                on_batch=lambda n: bar.update(n - bar.n),
            )
        else:
            result = quantize_with_report(
                model,
                calib,
                config,
                ranges=ranges,
                executor=executor,
                on_batch=lambda n: bar.update(n - bar.n),
            )
    _save(result.model, output, target)
    _report(result.report.to_dict(), output, summary_json)


def _finish_qdq(model: Path, output: Path, target: str, summary_json: Path | None) -> None:
    """A QDQ model without --calib/--ranges: finished with its own qparams (``onnxq.finish``);
    a float model needs data."""
    from onnxq.finish import carries_qdq, finish_qdq_with_report
    from onnxq.model_io import load_model

    proto = load_model(model)
    if not carries_qdq(proto):
        raise ConfigError("give --calib DATA or --ranges FILE (exactly one)")
    check_output_path(output, model)
    if summary_json is not None:
        check_output_path(summary_json, output, model)
    explicit = click.get_current_context().get_parameter_source("target")
    chosen = target if explicit is not click.core.ParameterSource.DEFAULT else None
    result = finish_qdq_with_report(proto, target=chosen)
    _save(result.model, output, chosen or DEFAULT_TARGET)
    _report(result.report.to_dict(), output, summary_json)


def _save(model: Any, output: Path, target: str) -> None:
    """``OUT.onnx``, then the files the target writes beside it (``.ort`` for ort-mobile)."""
    from onnxq.targets.ort_format import write_extra_files

    save_model(model, output)
    for path in write_extra_files(output, get_target(target).extra_files):
        click.echo(f"wrote {path}")


def _report(report: dict, output: Path, summary_json: Path | None) -> None:
    click.echo(_summary(report, output))
    if summary_json is not None:
        write_json(report, summary_json)


def _summary(report: dict, output: Path) -> str:
    """A few lines: what was quantized, what stayed float and why, size before and after."""
    quantized = [d for d in report["decisions"] if d["quantized"]]
    kernels = Counter(d["op_type"] for d in quantized)
    floats = Counter(
        (d["op_type"], re.sub(r"'[^']*'", "'...'", d["reason"]))
        for d in report["decisions"]
        if not d["quantized"]
    )
    lines = [
        f"quantized {len(quantized)} nodes: "
        + ", ".join(f"{op} x{n}" for op, n in kernels.most_common())
        if quantized
        else "quantized 0 nodes: the output computes as the float model"
    ]
    if floats:
        lines.append(f"left float {sum(floats.values())} nodes:")
        lines += [f"  {op} x{n}: {reason}" for (op, reason), n in floats.most_common()]
    before, after = report["size_before"], report["size_after"]
    lines.append(f"size: {_mb(before)} -> {_mb(after)} ({100 * after / before:.1f}%)")
    config = report["config"]
    lines.append(_scheme_line(config))
    if report.get("finished"):
        return "\n".join(lines + _finished_lines(report, output))
    reduce = "on" if report["reduce_range"] else "off"
    source = f"from {report['ranges_file']} " if report.get("ranges_file") else ""
    if config.get("mode") == QuantMode.WEIGHT_ONLY:
        data = f", GPTQ Hessians from {report['samples']} samples" if report["samples"] else ""
        lines.append(f"weight-only: {config['weight_rounding']} rounding{data}")
    elif config.get("mode") == "dynamic":
        lines.append(f"dynamic: reduce_range {reduce} ({report['reduce_range_reason']})")
    else:
        lines.append(
            f"calibration: {source}{report['samples']} samples, {config['method']}; "
            f"reduce_range {reduce} ({report['reduce_range_reason']})"
        )
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report.get("quality"):
        quality = report["quality"]
        lines.append(
            f"output vs fp32 on {quality['batches']} calibration batches: SQNR "
            f"{quality['sqnr_db']:.1f} dB, cosine {quality['cosine']:.4f}"
        )
    lines += [f"warning: {warning}" for warning in report.get("warnings", [])]
    if report["uncalibrated"]:
        skipped = ", ".join(report["uncalibrated"])
        lines.append(f"no finite calibration values, left float: {skipped}")
    lines.append(f"wrote {output}")
    return "\n".join(lines)


def _finished_lines(report: dict, output: Path) -> list[str]:
    """What finishing a QDQ model did (no calibration), what blocked ORT, rule warnings."""
    finished = report["finished"]
    changes = ", ".join(f"{rule} x{len(nodes)}" for rule, nodes in finished["changes"].items())
    lines = [f"finished from the model's own Q/DQ (no calibration): {changes or 'no change'}"]
    lines += [f"blocked: {line}" for line in finished["blocked"]]
    lines += [f"warning: {warning}" for warning in report.get("warnings", [])]
    return [*lines, f"wrote {output}"]


def _scheme_line(config: dict) -> str:
    """E.g. ``target ort-cpu: activations uint8, weights int8 (7-bit), per-channel``."""
    if config.get("mode") == QuantMode.WEIGHT_ONLY:
        return (
            f"target {config['target']}: activations float, weights {config['weight_type']} "
            f"in blocks of {config['block_size']} along K"
        )
    bits = " (7-bit)" if config.get("reduce_range") else ""
    symmetric = " symmetric" if config.get("activation_symmetric") else ""
    granularity = "per-channel" if config.get("per_channel") else "per-tensor"
    return (
        f"target {config['target']}: activations {config['activation_type']}{symmetric}, "
        f"weights {config['weight_type']}{bits}, {granularity}"
    )


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
