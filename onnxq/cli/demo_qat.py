"""``onnxq demo --qat``: fp32 vs post-training int8 vs quantization-aware training, side by side.

A depthwise-separable CNN trained on scikit-learn's 8x8 digits (``models.digits_dwcnn``, the
shipped seed-0 weights, so every CPU shows the same numbers) has a dead channel whose
BatchNorm-folded weights are ~140x the others. With per-tensor 7-bit weights (``--target
ort-cpu``, ``per_channel=False``) and min-max ranges, post-training int8 loses points on held-out
digits; ``onnxq.qat`` fine-tunes the fake-quant module from onnxq's own post-training qparams
(LSQ scales) and exports the int8 QDQ model, which ONNX Runtime then measures next to the others.
The fourth row is post-training int8 with input-aware MSE weight ranges (``--weight-range mse``),
which clips the dead channel's weights and needs no training on this model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

QAT_EPOCHS = 20
QAT_LR = 1e-3
QAT_SCALE_LR = 1e-2
SEED = 0


def run(out_dir: Path, runs: int) -> None:
    """The QAT stage of the demo (prints; the CLI's ``demo --qat``)."""
    from dataclasses import replace

    import numpy as np
    import torch

    from calibration.digits import load_digits_splits
    from models.digits_dwcnn import pretrained_digits_dwcnn
    from onnxq.config import QuantConfig, WeightRange, WeightRounding
    from onnxq.evaluate import compare
    from onnxq.export import export_torch
    from onnxq.model_io import save_model
    from onnxq.pipeline import quantize_with_report
    from onnxq.qat import export_qat, finetune, prepare_qat
    from onnxq.qat.export import check_export
    from onnxq.report import format_table, plot

    torch.set_num_threads(2)
    splits = load_digits_splits(seed=SEED)
    click.echo(
        f"digits: {len(splits.train_x)} train, {len(splits.calib_x)} calibration, "
        f"{len(splits.test_x)} test images (scikit-learn, offline)"
    )
    model = pretrained_digits_dwcnn()
    config = QuantConfig(target="ort-cpu", per_channel=False)
    click.echo(
        "scheme: --target ort-cpu (u8 activations, 7-bit s8 weights), per-tensor weights, "
        "min-max ranges"
    )
    example = torch.from_numpy(splits.calib_x[:1])
    fp32 = out_dir / "digits_dw_fp32.onnx"
    export_torch(model, example, fp32, input_names=["x"])
    ptq = out_dir / "digits_dw_ptq.onnx"
    save_model(quantize_with_report(fp32, {"x": splits.calib_x}, config).model, ptq)
    ptq_mse = out_dir / "digits_dw_ptq_mse.onnx"
    mse_config = replace(config, weight_range=WeightRange.MSE)
    save_model(quantize_with_report(fp32, {"x": splits.calib_x}, mse_config).model, ptq_mse)

    start = time.perf_counter()
    # Training from the float weights (nearest levels) ends higher than from GPTQ's levels
    # (98.75% vs 98.00% after ten epochs): GPTQ's start pays off only for a few steps.
    qat_config = replace(config, weight_rounding=WeightRounding.NEAREST)
    module = prepare_qat(model, example, {"x": splits.calib_x}, qat_config)
    loader = _loader(splits.train_x, splits.train_y)
    finetune(module, loader, torch.nn.functional.cross_entropy, QAT_EPOCHS, QAT_LR,
             scale_lr=QAT_SCALE_LR, seed=SEED)  # fmt: skip
    seconds = time.perf_counter() - start
    qat = out_dir / "digits_dw_qat.onnx"
    proto = export_qat(module, qat, example_inputs=torch.from_numpy(splits.calib_x))
    check = check_export(module, proto, torch.from_numpy(splits.calib_x))
    with torch.no_grad():
        logits = module(torch.from_numpy(splits.test_x)).numpy()
    module_top1 = float((np.argmax(logits, 1) == splits.test_y).mean())
    click.echo(
        f"QAT: prepare_qat + {QAT_EPOCHS} epochs of finetune in {seconds:.1f} s; exported {qat} "
        f"(ONNX Runtime vs module, RMS: {check.fake_quant_error:.1e} unfused, "
        f"{check.fused_error:.1e} fused)"
    )
    comparison = compare(
        fp32, [ptq, qat, ptq_mse], {"x": splits.test_x}, labels=splits.test_y, latency_runs=runs
    )
    click.echo(format_table(comparison))
    png = plot(comparison, out_dir / "qat.png")
    fp32_top1 = comparison.fp32.accuracy.top1
    ptq_top1, qat_top1, mse_top1 = (row.accuracy.top1 for row in comparison.quantized)
    click.echo(
        f"top-1 on {len(splits.test_y)} held-out digits: fp32 {100 * fp32_top1:.2f}%, "
        f"post-training {100 * ptq_top1:.2f}%, QAT {100 * qat_top1:.2f}% "
        f"(fake-quant module in torch {100 * module_top1:.2f}%), post-training with MSE "
        f"weight ranges {100 * mse_top1:.2f}%; plot: {png}"
    )


def _loader(x: Any, y: Any) -> Any:
    import torch

    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    generator = torch.Generator().manual_seed(SEED)
    return torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, generator=generator)
