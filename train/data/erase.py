"""Random erasing, as timm's ``RandomErasing`` (``timm/data/random_erasing.py``) does it: one
per-image NumPy op on the *normalised* image, where timm and torchvision apply it.

With probability ``random_erase_prob`` one box (timm's ``min_count = max_count = 1``) is erased:
per attempt (10 at most), an area fraction uniform in ``random_erase_scale`` and an aspect ratio
log-uniform in ``random_erase_ratio`` give ``h = round(sqrt(area * ratio))`` and ``w =
round(sqrt(area / ratio))``; a box smaller than the image in both sides is placed uniformly and
filled with zeros (``'const'``: the dataset mean once normalised) or with one standard normal
draw per pixel and channel (``'pixel'``). torchvision's ``RandomErasing`` samples the same way
(its ``value=0`` and ``value='random'``), with ``ratio=(0.3, 3.3)`` where timm's is
``(0.3, 1/0.3)``.

The draws come from the example's generator (keyed on seed, epoch and example position, as its
crop's), in the order timm makes them: ``random() > prob`` skips the image; per attempt
``uniform`` (area), ``uniform`` (log ratio); then ``integers`` (top), ``integers`` (left) and the
normal fill. ``tests/test_erase.py`` feeds timm's op the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ERASE_MODES = ("const", "pixel")


def erase_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[int, int, int, int] | None:
    """``(top, left, h, w)`` of the box to erase, or None when 10 attempts found none that fits."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = float(rng.uniform(*scale)) * area
        aspect = math.exp(float(rng.uniform(*log_ratio)))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return None


def random_erase(
    image: np.ndarray,
    rng: np.random.Generator,
    prob: float,
    mode: str = "const",
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """``image`` (normalised float ``[H, W, C]``, modified in place) with one box erased with
    probability ``prob``: zeros (``mode='const'``) or standard normal pixels (``'pixel'``)."""
    if mode not in ERASE_MODES:
        raise ValueError(f"random_erase_mode must be one of {ERASE_MODES}; got {mode!r}.")
    if float(rng.random()) > prob:
        return image
    height, width, channels = image.shape
    box = erase_box(rng, height, width, scale, ratio)
    if box is None:
        return image
    top, left, h, w = box
    if mode == "pixel":
        fill = rng.standard_normal((h, w, channels), dtype=np.float32)
    else:
        fill = 0.0
    image[top : top + h, left : left + w] = fill
    return image


def erase_normalised(
    pixels: np.ndarray, rng: np.random.Generator, options: Any, mean: Any, std: Any
) -> np.ndarray:
    """``uint8`` pixels -> normalised float32, then ``random_erase`` with ``options``' fields."""
    image = (pixels.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return random_erase(
        image,
        rng,
        float(options.random_erase_prob),
        options.random_erase_mode,
        tuple(options.random_erase_scale),
        tuple(options.random_erase_ratio),
    )
