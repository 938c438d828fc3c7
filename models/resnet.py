"""ResNet-18 written from scratch (no torchvision): BasicBlocks [2, 2, 2, 2], 64..512 channels.

Input ``float [N, 3, 224, 224]``, output ``[N, num_classes]`` logits. Weights are random (seeded);
``warm_up_batchnorm`` gives the BatchNorm layers real running statistics so activations have the
ranges a trained network would have, which is what quantization calibration needs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

WARMUP_BATCH = 8
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual; a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """7x7/2 stem conv-BN-ReLU, 3x3/2 max pool, four stages of BasicBlocks, avg pool, Linear."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        cin = 64
        for index, blocks in enumerate(layers):
            cout = 64 * 2**index
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(cin, cout, stride)]
            stage += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet:
    """ResNet-18 with weights drawn from ``seed`` (global RNG left untouched), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet((2, 2, 2, 2), num_classes).eval()


def warm_up_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor | np.ndarray]) -> nn.Module:
    """Set every BatchNorm's running stats to the cumulative average over ``batches``.

    Runs forward passes in train mode under ``no_grad`` with ``momentum=None`` (running stats
    reset first), restores each layer's momentum and returns the model in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    momenta = [m.momentum for m in norms]
    seen = 0
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        with torch.no_grad():
            for batch in batches:
                model(torch.as_tensor(batch, dtype=torch.float32))
                seen += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("warm_up_batchnorm needs at least one batch")
    return model


def resnet18_factory() -> tuple[ResNet, torch.Tensor]:
    """For ``onnxq export models.resnet:resnet18_factory``: warmed-up ResNet-18, example batch.

    BatchNorm is warmed up on ``calibration.images.warmup_inputs()`` (photo crops standing in for
    training data); the example input is ``resnet_inputs(1)``.
    """
    from calibration.images import resnet_inputs, warmup_inputs

    model = build_resnet18()
    images = warmup_inputs()
    warm_up_batchnorm(
        model, (images[i : i + WARMUP_BATCH] for i in range(0, len(images), WARMUP_BATCH))
    )
    return model, torch.from_numpy(resnet_inputs(1))
