"""QAT end to end on real held-out digits: a scheme where post-training int8 loses points
(depthwise CNN with a BatchNorm-folded outlier channel, per-tensor 7-bit weights), QAT from
prepare_qat wins them back, and the exported ONNX gives the module's accuracy in ONNX Runtime.
Also ``onnxq demo --qat`` through the CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from click.testing import CliRunner  # noqa: E402

from calibration.digits import load_digits_splits  # noqa: E402
from models.digits_dwcnn import train_digits_dwcnn  # noqa: E402
from onnxq.cli import main  # noqa: E402
from onnxq.config import QuantConfig, WeightRounding  # noqa: E402
from onnxq.export import export_torch  # noqa: E402
from onnxq.pipeline import quantize  # noqa: E402
from onnxq.qat import export_qat, finetune, prepare_qat  # noqa: E402
from onnxq.qat.fake_quant import clip_scale_ceiling  # noqa: E402

pytestmark = pytest.mark.slow


def _top1(session_or_logits, x: np.ndarray, y: np.ndarray) -> float:
    logits = session_or_logits.run(None, {"x": x})[0]
    return 100 * float((logits.argmax(1) == y).mean())


def _session(model: onnx.ModelProto | str, *, fused: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def test_qat_recovers_what_post_training_loses(tmp_path) -> None:
    torch.set_num_threads(2)
    splits = load_digits_splits(seed=0)
    model = train_digits_dwcnn(splits.train_x, splits.train_y, seed=0)
    example = torch.from_numpy(splits.calib_x[:1])
    fp32 = tmp_path / "fp32.onnx"
    export_torch(model, example, fp32, input_names=["x"])
    config = QuantConfig(per_channel=False)  # ort-cpu: exact on every CPU (7-bit weights)
    ptq = quantize(fp32, {"x": splits.calib_x}, config)
    test_x, test_y = splits.test_x, splits.test_y
    fp32_top1 = _top1(_session(str(fp32), fused=True), test_x, test_y)
    ptq_top1 = _top1(_session(ptq, fused=True), test_x, test_y)
    assert ptq_top1 <= fp32_top1 - 1.0, (fp32_top1, ptq_top1)

    nearest = replace(config, weight_rounding=WeightRounding.NEAREST)  # as the demo trains
    module = prepare_qat(model, example, {"x": splits.calib_x}, nearest)
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(splits.train_x), torch.from_numpy(splits.train_y)
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    finetune(module, loader, torch.nn.functional.cross_entropy, 10, 1e-3, scale_lr=1e-2)
    with torch.no_grad():
        module_top1 = 100 * float(
            (module(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean()
        )
    assert module_top1 >= fp32_top1 - 0.3, (fp32_top1, module_top1)

    proto = export_qat(
        module, tmp_path / "qat.onnx", example_inputs=torch.from_numpy(splits.calib_x)
    )
    assert _top1(_session(proto, fused=False), test_x, test_y) == module_top1
    assert abs(_top1(_session(proto, fused=True), test_x, test_y) - module_top1) <= 0.25


def test_clip_ceiling_keeps_the_q_range_inside_relu6() -> None:
    ceiling = clip_scale_ceiling(0.0, 6.0, 0, 255, 0)
    assert np.float32(255) * np.float32(ceiling) <= np.float32(6.0)
    assert np.float32(255) * np.nextafter(np.float32(ceiling), np.float32(1)) > np.float32(6.0)
    assert clip_scale_ceiling(0.0, None, 0, 255, 0) is None  # Relu: nothing to cap
    assert clip_scale_ceiling(0.0, 6.0, -128, 127, 0) == pytest.approx(6.0 / 127)  # symmetric
    assert clip_scale_ceiling(-1.0, 1.0, -128, 127, 0) == pytest.approx(1.0 / 128)


def test_demo_qat_prints_the_three_rows(tmp_path) -> None:
    result = CliRunner().invoke(main, ["demo", "--qat", "--out-dir", str(tmp_path), "--runs", "5"])
    assert result.exit_code == 0, result.output
    for name in ("digits_dw_fp32", "digits_dw_ptq", "digits_dw_qat"):
        assert name in result.output
        assert (tmp_path / f"{name}.onnx").is_file()
    assert (tmp_path / "qat.png").stat().st_size > 1000
    assert "post-training" in result.output and "QAT" in result.output
