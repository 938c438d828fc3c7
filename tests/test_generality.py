"""Architectures and exports no issue names: the rules are general, not tuned to the zoo.

Depthwise convs with ReLU6 (Clip) and squeeze-excite (SiLU, Sigmoid, Mul); a U-Net-like graph
(Resize, Concat with the input, a Conv as graph output); Conv1d into a GRU. Old (11) and current
(17) opsets. Transformer encoders from both exporters are in ``passes/test_transformer_rules``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from support import run, sqnr_db

torch = pytest.importorskip("torch")
nn = torch.nn

from onnxq.dynamic import quantize_dynamic_with_report  # noqa: E402
from onnxq.export import export_torch  # noqa: E402
from onnxq.pipeline import quantize_with_report  # noqa: E402


class Mobile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16),
        )  # fmt: skip
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.SiLU(), nn.Conv2d(4, 16, 1),
            nn.Sigmoid(),
        )  # fmt: skip
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.dw(h)
        return self.head((h * self.se(h)).mean((2, 3)))


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down, self.mid = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.out = nn.Conv2d(11, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mid(torch.relu(self.down(x))))
        up = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.out(torch.cat([up, x], 1))


class Audio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gru = nn.Conv1d(4, 16, 5, padding=2), nn.GRU(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).permute(2, 0, 1)
        return self.head(self.gru(h)[0][-1])


CASES = {
    "mobile": (Mobile, (2, 3, 32, 32)),
    "unet": (UNet, (2, 3, 16, 16)),
    "audio": (Audio, (2, 4, 20)),
}


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("name", sorted(CASES))
def test_static_and_dynamic_stay_valid_and_close(name, opset, tmp_path):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    module = factory()
    module.train()
    with torch.no_grad():  # warm BatchNorm statistics where there are any
        for _ in range(3):
            module(torch.randn(8, *shape[1:]))
    module.eval()
    path = tmp_path / f"{name}.onnx"
    export_torch(module, torch.randn(*shape), path, opset=opset)
    rng = np.random.default_rng(0)
    calib = {"input": rng.standard_normal((16, *shape[1:])).astype(np.float32)}
    feed = {"input": rng.standard_normal((4, *shape[1:])).astype(np.float32)}
    reference = run(path, feed)[0]
    static = quantize_with_report(path, calib)
    dynamic = quantize_dynamic_with_report(path)
    for result in (static, dynamic):
        onnx.checker.check_model(result.model, full_check=True)
        assert sqnr_db(reference, run(result.model, feed)[0]) > 30
    assert static.report.quantized, "every case has something with an int8 kernel"
