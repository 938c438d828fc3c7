"""An LSTM sequence classifier for scikit-learn's 8x8 digits read as sequences.

Each image is 8 time steps of 8 pixel rows: ``float [N, 8, 8]`` in [0, 1] -> 10 logits. A
two-layer ``nn.LSTM(8, HIDDEN)`` reads the rows top to bottom and a Linear head classifies the
last step's hidden state. ``train_lstm`` is deterministic for a seed (one thread, seeded init and
shuffling) and reaches about 97-98% test accuracy on ``calibration.digits`` splits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.training import fit_classifier

STEPS = 8
FEATURES = 8
HIDDEN = 256
LAYERS = 2
NUM_CLASSES = 10


class DigitsLSTM(nn.Module):
    """``nn.LSTM(8, hidden, num_layers, batch_first=True)`` + Linear on the last time step."""

    def __init__(
        self, hidden: int = HIDDEN, layers: int = LAYERS, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, hidden, num_layers=layers, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.classifier(out[:, -1])


def as_sequences(images: np.ndarray) -> np.ndarray:
    """``[N, 1, 8, 8]`` digit images (or already ``[N, 8, 8]``) as ``float32 [N, 8, 8]`` rows."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (STEPS, FEATURES):
        raise ValueError(f"expected images [N, 1, 8, 8] or [N, 8, 8], got {x.shape}")
    return np.ascontiguousarray(x)


def build_lstm(seed: int = 0) -> DigitsLSTM:
    """The untrained network, initialised from ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsLSTM()


def train_lstm(
    train_x: np.ndarray,
    train_y: np.ndarray,
    *,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> DigitsLSTM:
    """Train with AdamW and a one-cycle schedule; returns the model in eval mode.

    ``train_x`` is ``[N, 8, 8]`` (or ``[N, 1, 8, 8]`` images). Deterministic: seeded init and
    shuffling, run on one thread (restored afterwards).
    """
    x = torch.as_tensor(as_sequences(train_x))
    y = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    if len(x) != len(y):
        raise ValueError(f"{len(x)} sequences but {len(y)} labels")
    return fit_classifier(
        build_lstm(seed),
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        clip_norm=1.0,
    )


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on digit sequences or images."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(as_sequences(x)))
    return float((logits.argmax(1).numpy() == np.asarray(y)).mean())


def lstm_factory() -> tuple[DigitsLSTM, torch.Tensor]:
    """For ``onnxq export models.lstm:lstm_factory``: trained model, example ``[1, 8, 8]``."""
    from calibration.digits import load_digits_splits

    splits = load_digits_splits()
    model = train_lstm(splits.train_x, splits.train_y)
    return model, torch.from_numpy(as_sequences(splits.calib_x[:1]))
