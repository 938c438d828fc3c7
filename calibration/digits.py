"""scikit-learn's 8x8 digits (ships offline): images, labels and fixed disjoint splits.

Pixels are scaled to [0, 1] (divided by 16) as float32 with shape ``[N, 1, 8, 8]``. The splits are
stratified with a fixed seed: a test set first, then a calibration set from what is left, the rest
for training. The three are disjoint by construction and their source indices are kept, so a
calibration set never leaks into an accuracy measurement.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike[str]

NUM_IMAGES = 1797
NUM_CLASSES = 10
TEST_SIZE = 400
CALIB_SIZE = 200


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images ``float32 [N, 1, 8, 8]`` in [0, 1] and labels ``int64 [N]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModuleNotFoundError(
            "the digits recipes need scikit-learn: pip install 'onnxq[demo]'"
        ) from None
    bunch = load_digits()
    images = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return images, bunch.target.astype(np.int64)


@dataclass(frozen=True)
class DigitsSplits:
    """Disjoint train / calibration / test splits; ``*_idx`` index ``load_digits_images()``."""

    train_x: np.ndarray
    train_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_idx: np.ndarray
    calib_idx: np.ndarray
    test_idx: np.ndarray


def load_digits_splits(
    seed: int = 0, *, test_size: int = TEST_SIZE, calib_size: int = CALIB_SIZE
) -> DigitsSplits:
    """Stratified, seeded splits: ``test_size`` test, ``calib_size`` calibration, rest train."""
    from sklearn.model_selection import train_test_split

    if test_size < NUM_CLASSES or calib_size < NUM_CLASSES:
        raise ValueError(f"test_size and calib_size must be >= {NUM_CLASSES}")
    if test_size + calib_size > NUM_IMAGES - NUM_CLASSES:
        raise ValueError(f"test_size + calib_size must leave training data (< {NUM_IMAGES})")
    images, labels = load_digits_images()
    index = np.arange(len(labels))
    pool_idx, test_idx = train_test_split(
        index, test_size=test_size, stratify=labels, random_state=seed
    )
    train_idx, calib_idx = train_test_split(
        pool_idx, test_size=calib_size, stratify=labels[pool_idx], random_state=seed
    )
    train_idx, calib_idx, test_idx = np.sort(train_idx), np.sort(calib_idx), np.sort(test_idx)
    return DigitsSplits(
        train_x=images[train_idx],
        train_y=labels[train_idx],
        calib_x=images[calib_idx],
        calib_y=labels[calib_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
        train_idx=train_idx,
        calib_idx=calib_idx,
        test_idx=test_idx,
    )


def write_npz(path: PathLike, x: np.ndarray, *, input_name: str = "input") -> Path:
    """Write ``x`` under the key ``input_name`` (the model's input name), atomically."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **{input_name: np.ascontiguousarray(x)})
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
