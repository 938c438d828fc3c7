"""Weight-only 4-bit (and blocked 8-bit) next to fp32: ``python -m benchmarks.weight_only``.

Two models, each measured by ``onnxq.evaluate.compare`` in one run (same feeds, interleaved
latency blocks, same thread count):

* ``minilm``: the real all-MiniLM-L6-v2 (sequence 128), onnxq weight-only uint4/int4 with
  nearest and GPTQ rounding, blocked uint8, and ONNX Runtime's own ``MatMulNBitsQuantizer``
  (4-bit, block 32, asymmetric) as the peer: cosine to fp32 on 96 held-out sentences, size,
  batch-1 latency.
* ``mlp4096``: a MatMul-bound stack (``--layers`` x [MatMul 4096x4096 + bias + SiLU]) with
  random weights; input ``[tokens, 4096]``, so batch-1 latency is one token (a GEMV, bound by
  reading the weights) and throughput is ``--tokens`` tokens per run (a GEMM).

Options: ``--models minilm,mlp4096``, ``--out DIR`` (``results.md``/``results.json``),
``--threads N`` (ORT intra-op threads; default the usable cores), ``--runs N`` (latency runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.config import QuantConfig
from onnxq.evaluate import compare
from onnxq.model_io import save_model
from onnxq.runtime import Provider, environment
from onnxq.weight_only import quantize_weight_only_with_report

Feeds = dict[str, np.ndarray]
DEFAULT_OUT = Path("benchmarks/results/weight_only")


def onnxq_variant(**changes: Any) -> Callable[[Path, Path, Feeds | None], list[str]]:
    """An onnxq weight-only variant: ``(fp32, out, calib) -> notes``."""

    def run(fp32: Path, out: Path, calib: Feeds | None) -> list[str]:
        config = QuantConfig(**{k: v for k, v in changes.items() if k != "gptq"})
        data = calib if changes.get("gptq") else None
        result = quantize_weight_only_with_report(fp32, config, calibration_data=data)
        save_model(result.model, out)
        blocked = sum(d.quantized and d.op_type != "Gather" for d in result.report.decisions)
        return [f"{blocked} weights blocked", *result.report.notes]

    return run


def ort_matmul_nbits(fp32: Path, out: Path, calib: Feeds | None) -> list[str]:
    """ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN): 4-bit, block 32, asymmetric, QOperator."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(fp32), bits=4, block_size=32, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return ["ORT MatMulNBitsQuantizer, 4-bit, block 32, asymmetric, nearest"]


VARIANTS: dict[str, dict[str, Callable[[Path, Path, Feeds | None], list[str]]]] = {
    "minilm": {
        "onnxq uint4 b32 nearest": onnxq_variant(weight_type="uint4"),
        "onnxq uint4 b32 GPTQ": onnxq_variant(weight_type="uint4", gptq=True),
        "onnxq int4 b32 GPTQ": onnxq_variant(weight_type="int4", gptq=True),
        "onnxq uint4 b128 GPTQ": onnxq_variant(weight_type="uint4", block_size=128, gptq=True),
        "onnxq uint8 b32 nearest": onnxq_variant(weight_type="uint8"),
        "ORT MatMulNBits uint4 b32": ort_matmul_nbits,
    },
    "mlp4096": {
        "onnxq uint4 b32 nearest": onnxq_variant(weight_type="uint4"),
        "onnxq uint4 b128 nearest": onnxq_variant(weight_type="uint4", block_size=128),
        "onnxq uint8 b32 nearest": onnxq_variant(weight_type="uint8"),
    },
}


def minilm(work: Path) -> tuple[Path, Feeds, Feeds]:
    """fp32 MiniLM, 32 calibration sentences, 96 evaluation sentences (sequence 128)."""
    from calibration.text import calibration_sentences, encode, evaluation_sentences
    from models.minilm import export_minilm, load_tokenizer

    path = work / "minilm.onnx"
    export_minilm(path)
    tokenizer = load_tokenizer()
    calib = encode(calibration_sentences(32), tokenizer)
    return path, calib, encode(evaluation_sentences(96), tokenizer)


def mlp4096(work: Path, layers: int, tokens: int) -> tuple[Path, None, Feeds]:
    """``layers`` x [MatMul(4096x4096) + bias + SiLU], random N(0, 1/4096) weights."""
    rng = np.random.default_rng(0)
    width = 4096
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Sigmoid", [f"a{i}"], [f"s{i}"]),
            helper.make_node("Mul", [f"a{i}", f"s{i}"], [f"h{i}"]),
        ]
        prev = f"h{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "mlp4096",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = work / "mlp4096.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    return path, None, {"x": x}


def measure(
    name: str,
    fp32: Path,
    calib: Feeds | None,
    evaluation: Feeds,
    work: Path,
    *,
    threads: int,
    runs: int,
    throughput_batch: int,
) -> dict[str, Any]:
    """Quantize with every variant of ``name``, then one ``compare`` over all of them."""
    paths, notes, seconds = [], {}, {}
    for label, quantize in VARIANTS[name].items():
        out = work / f"{name}-{label.replace(' ', '-')}.onnx"
        start = time.perf_counter()
        notes[label] = quantize(fp32, out, calib)
        seconds[label] = time.perf_counter() - start
        paths.append(out)
        _log(f"[{name}] {label}: {seconds[label]:.1f} s")
    result = compare(
        fp32,
        paths,
        evaluation,
        batch_size=16,
        latency_runs=runs,
        warmup=max(3, runs // 10),
        throughput_batch=throughput_batch,
        intra_op_threads=threads,
        measure_memory=False,
    )
    rows = []
    for label, row in zip(["fp32", *VARIANTS[name]], result.rows, strict=True):
        ratios = result.ratios(row)
        rows.append(
            {
                "variant": label,
                "cosine_mean": row.accuracy.cosine_mean,
                "cosine_min": row.accuracy.cosine_min,
                "sqnr_db": row.accuracy.sqnr_db,
                "size_mb": row.size_bytes / 1e6,
                "size_x_fp32": ratios["size"],
                "p50_ms": row.latency.p50_ms,
                "p50_x_fp32": ratios["p50"],
                "throughput": row.throughput,
                "throughput_x_fp32": ratios["throughput"],
                "quantize_s": seconds.get(label),
                "notes": notes.get(label, ["reference"]),
            }
        )
    return {"model": name, "throughput_batch": throughput_batch, "rows": rows}


def write(out: Path, results: list[dict[str, Any]], run_info: dict[str, Any]) -> Path:
    """``results.json`` and ``results.md`` (one table per model) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"run": run_info, "models": results}, indent=2))
    lines = [f"# Weight-only benchmark\n\n`{run_info['command']}`\n", f"{run_info['env']}\n"]
    for model in results:
        batch = model["throughput_batch"]
        lines += [
            f"\n## {model['model']}\n",
            f"| variant | cosine mean | cosine min | SQNR dB | size MB | size x fp32 | "
            f"p50 ms (batch 1) | x fp32 | batch {batch} /s | x fp32 | quantize s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in model["rows"]:
            lines.append(
                f"| {r['variant']} | {_f(r['cosine_mean'], 4)} | {_f(r['cosine_min'], 4)} | "
                f"{_f(r['sqnr_db'], 1)} | {r['size_mb']:.1f} | {_f(r['size_x_fp32'], 3)} | "
                f"{r['p50_ms']:.2f} | {_f(r['p50_x_fp32'], 2)} | {r['throughput']:.1f} | "
                f"{_f(r['throughput_x_fp32'], 2)} | {_f(r['quantize_s'], 1)} |"
            )
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weight_only", description=__doc__)
    parser.add_argument("--models", default="minilm,mlp4096")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(VARIANTS))
    if unknown or not models:
        parser.error(f"--models: choose from {', '.join(VARIANTS)}")
    threads = args.threads or len(os.sched_getaffinity(0))
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxq-wo-bench-") as tmp:
        work = Path(tmp)
        for name in models:
            _log(f"[{name}] building")
            if name == "minilm":
                fp32, calib, evaluation = minilm(work)
                batch = 8
            else:
                fp32, calib, evaluation = mlp4096(work, args.layers, args.tokens)
                batch = args.tokens
            results.append(
                measure(
                    name,
                    fp32,
                    calib,
                    evaluation,
                    work,
                    threads=threads,
                    runs=args.runs,
                    throughput_batch=batch,
                )
            )
    env = environment(Provider.CPU, intra_op_threads=threads)
    command = "python -m benchmarks.weight_only " + " ".join(argv or sys.argv[1:])
    info = {"command": command.strip(), "env": json.dumps(env, default=str)}
    _log(f"wrote {write(args.out, results, info)}")
    return 0


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
