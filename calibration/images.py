"""ResNet-style ``[N, 3, 224, 224]`` inputs from real images that ship offline (sklearn digits).

Each 8x8 digit is upsampled bilinearly (half-pixel centres, edge clamp: like
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``), replicated to three
channels and normalised with fixed constants to roughly zero mean and unit variance.

The 1797 images are put in a fixed order by ``seed``. The last ``WARMUP_SIZE`` of that order are
reserved for BatchNorm warm-up (``warmup_inputs``); ``resnet_inputs(n, offset=k)`` draws positions
``k .. k+n-1`` of the rest, so calibration and evaluation sets with disjoint ranges never share an
image, and neither shares one with the warm-up set.
"""

from __future__ import annotations

import numpy as np

from calibration.digits import NUM_IMAGES, load_digits_images

SIZE = 224
WARMUP_SIZE = 32
AVAILABLE = NUM_IMAGES - WARMUP_SIZE
# Mean and standard deviation of the bilinearly upsampled digits in [0, 1] (measured once).
PIXEL_MEAN = 0.3053
PIXEL_STD = 0.3252


def resnet_indices(n: int, seed: int = 0, offset: int = 0) -> np.ndarray:
    """Indices into ``load_digits_images()`` of ``resnet_inputs(n, seed, offset)``."""
    if n < 1 or offset < 0 or offset + n > AVAILABLE:
        raise ValueError(f"need 1 <= n and 0 <= offset with offset + n <= {AVAILABLE}")
    return _order(seed)[offset : offset + n]


def warmup_indices(n: int = WARMUP_SIZE, seed: int = 0) -> np.ndarray:
    """Indices of ``warmup_inputs(n, seed)``: the reserved tail of the seeded order."""
    if not 1 <= n <= WARMUP_SIZE:
        raise ValueError(f"n must be from 1 to {WARMUP_SIZE}")
    return _order(seed)[AVAILABLE : AVAILABLE + n]


def resnet_inputs(n: int, seed: int = 0, offset: int = 0) -> np.ndarray:
    """Images at positions ``offset .. offset+n-1`` of the seeded order: ``float32 [n,3,224,224]``.

    About 0.6 MB an image: draw large sets in slices.
    """
    return _to_resnet(resnet_indices(n, seed, offset))


def resnet_labels(n: int, seed: int = 0, offset: int = 0) -> np.ndarray:
    """Digit labels matching ``resnet_inputs(n, seed, offset)``."""
    _, labels = load_digits_images()
    return labels[resnet_indices(n, seed, offset)]


def warmup_inputs(n: int = WARMUP_SIZE, seed: int = 0) -> np.ndarray:
    """Up to ``WARMUP_SIZE`` images reserved for BatchNorm warm-up (never in ``resnet_inputs``)."""
    return _to_resnet(warmup_indices(n, seed))


def upsample_bilinear(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear resize of ``[..., h, w]`` to ``[..., size, size]`` as two small matrix products."""
    height, width = images.shape[-2:]
    rows = _interp_matrix(height, size)
    cols = _interp_matrix(width, size)
    return (rows @ images @ cols.T).astype(np.float32)


def _order(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(NUM_IMAGES)


def _to_resnet(index: np.ndarray) -> np.ndarray:
    images, _ = load_digits_images()
    big = upsample_bilinear(images[index, 0])
    big = (big - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(np.repeat(big[:, None], 3, axis=1), dtype=np.float32)


def _interp_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` weights of half-pixel bilinear interpolation with edge clamping."""
    centres = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    centres = np.clip(centres, 0, src - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, src - 1)
    frac = centres - low
    matrix = np.zeros((dst, src), dtype=np.float32)
    matrix[np.arange(dst), low] += 1 - frac
    matrix[np.arange(dst), high] += frac
    return matrix
