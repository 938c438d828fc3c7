"""ResNet-style ``[N, 3, 224, 224]`` inputs cut from real photographs that ship offline.

scikit-learn bundles two photographs (``load_sample_images``: a temple in China and a flower,
427x640 RGB each). Crops of 224x224 at seeded positions, half of them mirrored, normalised with
the ImageNet mean and standard deviation, give natural-image statistics without a download.

Splits are disjoint in pixels: ``"eval"`` crops come from the right ``EVAL_WIDTH`` columns of
each photo, ``"warmup"`` (BatchNorm warm-up, standing in for training data) and ``"calib"``
crops from the columns left of them. A split's crops alternate between the two photos.

Two photos are few scenes: ``wide_calibration_crops`` adds six more photographs that ship
inside installed packages (``EXTRA_PHOTOS``: scikit-image's and matplotlib's sample data),
whole, in turn with the two photos' calibration regions; still disjoint from ``"eval"``.
"""

from __future__ import annotations

from functools import cache

import numpy as np

SIZE = 224
EVAL_WIDTH = 256
SPLITS = ("warmup", "calib", "eval")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_SPLIT_SEEDS = {"warmup": 101, "calib": 202, "eval": 303}


EXTRA_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
"""(package, file) of RGB photographs at least 224 pixels on each side, read offline."""


@cache
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(image) for image in load_sample_images().images)


@cache
def _extra_photos() -> tuple[np.ndarray, ...]:
    from importlib.resources import files

    from PIL import Image

    def load(package: str, name: str) -> np.ndarray:
        with Image.open(files(package).joinpath(name)) as image:
            return np.asarray(image.convert("RGB"))

    return tuple(load(package, name) for package, name in EXTRA_PHOTOS)


def _crop(photo: np.ndarray, left_min: int, left_max: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded 224x224 crop with its left edge in ``[left_min, left_max]``, mirrored half of
    the time, normalised: ``float32 [3, 224, 224]``."""
    top = int(rng.integers(0, photo.shape[0] - SIZE + 1))
    left = int(rng.integers(left_min, left_max + 1))
    crop = photo[top : top + SIZE, left : left + SIZE].astype(np.float32) / 255.0
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def _left_edges(split: str, width: int) -> tuple[int, int]:
    """Where a crop of ``split`` may start in a photo ``width`` wide."""
    if split == "eval":
        return width - EVAL_WIDTH, width - SIZE
    return 0, width - EVAL_WIDTH - SIZE


def photo_crops(split: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` normalised crops of ``split``: ``float32 [n, 3, 224, 224]`` (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = np.random.default_rng([seed, _SPLIT_SEEDS[split]])
    photos = _photos()
    crops = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        crops[i] = _crop(photo, *_left_edges(split, photo.shape[1]), rng)
    return crops


def wide_calibration_crops(n: int, seed: int = 0) -> np.ndarray:
    """``n`` calibration crops over eight scenes: the two photos' calibration regions and the
    ``EXTRA_PHOTOS`` whole, in turn (needs scikit-image): ``float32 [n, 3, 224, 224]``."""
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = np.random.default_rng([seed, _SPLIT_SEEDS["calib"], len(EXTRA_PHOTOS)])
    sources = [(photo, _left_edges("calib", photo.shape[1])) for photo in _photos()]
    sources += [(photo, (0, photo.shape[1] - SIZE)) for photo in _extra_photos()]
    crops = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        photo, (left_min, left_max) = sources[i % len(sources)]
        crops[i] = _crop(photo, left_min, left_max, rng)
    return crops


def resnet_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Calibration images for the ResNet-style zoo model."""
    return photo_crops("calib", n, seed)


def eval_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Evaluation images, disjoint in pixels from calibration and warm-up images."""
    return photo_crops("eval", n, seed)


def warmup_inputs(n: int = 32, seed: int = 0) -> np.ndarray:
    """Images for BatchNorm warm-up of randomly initialised ResNets."""
    return photo_crops("warmup", n, seed)
