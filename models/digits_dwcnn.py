"""A small depthwise-separable CNN (MobileNet-v1 style) for scikit-learn's 8x8 digits.

``float [N, 1, 8, 8]`` in [0, 1] -> 10 logits. Depthwise convolutions with BatchNorm folded
into them have very different ranges per output channel, the classic case where per-tensor
int8 weights lose accuracy after training and quantization-aware training wins it back
(Krishnamoorthi 2018). Trained with ``lr=0.03`` (the default here, seed 0), one channel of the
last pointwise block's input dies (always 0 after ReLU6): BatchNorm's running variance there is
~0, so folding scales that depthwise channel's weights to ~140x the median channel's. Its
output does not depend on them, but a per-tensor weight range does.

``pretrained_digits_dwcnn()`` loads exactly those weights (``digits_dwcnn_seed0.npz``, what
``train_digits_dwcnn`` gives with seed 0 and 2 torch threads on an AVX-512 CPU). Training rounds
differently with AVX2 kernels and ends a few test digits apart, so comparisons that must agree on
every CPU start from the shipped weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.digits_cnn import INPUT_SHAPE, NUM_CLASSES
from models.training import fit_classifier

PRETRAINED = Path(__file__).with_name("digits_dwcnn_seed0.npz")


def _separable(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """Depthwise 3x3 -> BN -> ReLU6, pointwise 1x1 -> BN -> ReLU6."""
    return [
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    ]


class DigitsDepthwiseCNN(nn.Module):
    """Conv 3x3 (1 -> 16), three separable blocks (16 -> 32 -> 64, stride 2 -> 64), global
    average pool, Linear(64 -> 10)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            *_separable(16, 32),
            *_separable(32, 64, stride=2),
            *_separable(64, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_digits_dwcnn(
    train_x: np.ndarray,
    train_y: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-2,
    seed: int = 0,
) -> DigitsDepthwiseCNN:
    """Train with AdamW and a one-cycle schedule (deterministic); returns it in eval mode."""
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    y = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE or len(x) != len(y):
        raise ValueError(f"expected train_x [N, 1, 8, 8] and train_y [N], got {x.shape}, {y.shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsDepthwiseCNN()
    return fit_classifier(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


def pretrained_digits_dwcnn() -> DigitsDepthwiseCNN:
    """The shipped seed-0 model (see the module docstring), in eval mode."""
    model = DigitsDepthwiseCNN()
    with np.load(PRETRAINED) as saved:
        model.load_state_dict({name: torch.from_numpy(saved[name]) for name in saved.files})
    return model.eval()
