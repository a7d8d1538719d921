"""Evaluation at its own size: torchvision's ``Resize(eval_resize_size, antialias=True) +
CenterCrop(eval_image_size)`` on ``uint8`` pixels, in NumPy, for both input pipelines.

torchvision's classification recipes evaluate at another size than they train at (V2: train at
176, evaluate ``Resize(232) + CenterCrop(224)``; timm's RSB A3: 160 and 224), so the eval input
is described by its own fields (``EvalOptions``): ``eval_image_size`` (0: ``image_size``),
``eval_resize_size`` (0: today's ``eval_crop_fraction`` arithmetic) and ``interpolation``.

The resize (``resize_uint8``) reproduces torchvision's tensor backend on ``uint8`` images, which
on x86 CPUs with AVX2 or AVX-512 runs PyTorch's own antialiased ``uint8`` kernels (derived from
Pillow-SIMD's): per axis, Pillow's separable filter weights (triangle, or Keys' cubic with
``a = -0.5``) normalised to sum 1, then quantised to 16-bit integers with the largest precision
that keeps the largest weight below ``2**15``; the width is resized first, the result rounded to
``uint8``, then the height. Pillow's own resize (torchvision's PIL backend) rounds its weights to
22 bits instead, so it differs by one level at a few pixels. ``resize_uint8`` computes the same
integers as PyTorch, so on those CPUs its output equals ``torchvision.transforms.v2``'s
``Resize(size, antialias=True)`` bit for bit: the stated bound is a max abs difference of 0
levels and 0 pixels differing, which ``tests/test_eval_resize.py`` holds it to on JPEGs of
several sizes and aspect ratios, for both interpolations. Elsewhere torchvision takes other
kernels (for bilinear, float32 with one rounding), which move its own output by up to one level;
the bound there is 1 level on at most a quarter of the values.

Raw float arrays (``train.predict``'s ``.npy`` inputs) are resized with the same weights
unquantised, as torchvision resizes a float tensor. The TFDS path runs these functions through
``tf.numpy_function``, so one implementation serves both pipelines.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# config.interpolation: torchvision's --interpolation choices this program implements.
INTERPOLATIONS = ("bilinear", "bicubic")
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # the filter's half-width at scale 1
_MAX_PRECISION = 22  # PyTorch's cap on the weights' fraction bits


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How one eval image becomes ``uint8 [size, size, C]``: with ``resize_size > 0`` the shorter
    side is resized to it and the centre ``size`` x ``size`` cropped (torchvision's); otherwise
    the ``crop_fraction`` arithmetic of ``image_ops.eval_image`` (the TF path's)."""

    size: int
    crop_fraction: float = 1.0
    resize_size: int = 0
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, config: Any, image_size: int) -> EvalOptions:
        """The eval options of ``config``; ``image_size`` is the training input size (the
        dataset's, which ``eval_image_size=0`` keeps)."""
        return cls(
            size=int(config.eval_image_size) or int(image_size),
            crop_fraction=float(config.eval_crop_fraction),
            resize_size=int(config.eval_resize_size),
            interpolation=str(config.interpolation),
        )

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``image_ops.eval_image`` and ``tf_ops.preprocess_eval_image``."""
        return dataclasses.asdict(self)

    def shape(self, channels: int) -> tuple[int, int, int]:
        """The eval batches' image shape."""
        return (self.size, self.size, channels)


def check_config(config: Any) -> str | None:
    """One line naming the eval-size field that is out of range, or None."""
    for field in ("eval_image_size", "eval_resize_size"):
        if int(config[field]) < 0:
            return f"config.{field} must be >= 0 (0: off); got {config[field]}."
    if config.interpolation not in INTERPOLATIONS:
        choices = ", ".join(INTERPOLATIONS)
        return f"config.interpolation={config.interpolation!r} is not valid; choose one of: {choices}."
    size = int(config.eval_image_size) or int(config.image_size)
    if config.eval_resize_size and size > int(config.eval_resize_size):
        return (
            f"config.eval_image_size ({size}) must be <= config.eval_resize_size "
            f"({config.eval_resize_size}): the centre crop is cut from the resized image."
        )
    return None


def _filter(x: np.ndarray, interpolation: str) -> np.ndarray:
    """The antialiasing filter (Pillow's and PyTorch's): a triangle, or Keys' cubic, a = -0.5."""
    x = np.abs(x)
    if interpolation == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_weights(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``, each ``[out_size, taps]``: output ``i`` along an axis is
    ``sum_k weight[i, k] * input[index[i, k]]``. Float64 weights, each row summing to 1, computed
    in PyTorch's (and Pillow's) order, so that the quantisation below rounds as theirs does."""
    scale = in_size / out_size
    support = _SUPPORT[interpolation] * max(scale, 1.0)
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = int((hi - lo).max())
    k = np.arange(taps)
    weight = _filter((lo[:, None] + k - centers[:, None] + 0.5) * inverse, interpolation)
    weight = np.where(k < (hi - lo)[:, None], weight, 0.0)
    total = np.zeros(out_size)
    for j in range(taps):  # summed in order, as the references do
        total += weight[:, j]
    weight = weight / np.where(total != 0.0, total, 1.0)[:, None]
    return np.minimum(lo[:, None] + k, in_size - 1), weight


def _int16_weights(weight: np.ndarray) -> tuple[np.ndarray, int]:
    """The weights as PyTorch's uint8 kernels hold them: integers below ``2**15`` with
    ``precision`` fraction bits (from the axis's largest weight), rounded half away from zero."""
    largest = float(weight.max())
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weight * (1 << precision)
    rounded = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    return rounded.astype(np.int32), precision


class _Axis:
    """One axis's resize from ``in_size`` to ``out_size``, of which only the outputs
    ``start .. start + count - 1`` are kept (the centre crop's): their taps and weights, the
    weights quantised over the whole axis as PyTorch does, so a kept output is the same as in
    the full resize."""

    def __init__(self, in_size: int, out_size: int, interpolation: str, start: int, count: int, uint8: bool):
        self.identity = in_size == out_size
        self.start, self.count = start, count
        if self.identity:
            self.first, self.last = start, start + count  # the input rows or columns read
            return
        index, weight = axis_weights(in_size, out_size, interpolation)
        self.precision = 0
        if uint8:
            weight, self.precision = _int16_weights(weight)
        index, self.weight = index[start : start + count], weight[start : start + count]
        self.first, self.last = int(index.min()), int(index.max()) + 1
        self.index = index - self.first  # into the input cut to first .. last - 1

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` (already cut to ``first .. last - 1`` along axis 0) -> the kept outputs
        along axis 0. Gathering whole rows is contiguous copies: the width pass transposes."""
        if self.identity:
            return pixels
        if not self.precision:  # float pixels: the weights unquantised, nothing rounded
            out = 0.0
            for j in range(self.index.shape[1]):
                out = out + pixels[self.index[:, j]] * self.weight[:, j, None, None]
            return np.asarray(out, np.float32)
        wide = np.ascontiguousarray(pixels, np.int32)
        # The 1 << (precision - 1) rounds the final shift to nearest.
        acc = np.full((self.count, *pixels.shape[1:]), 1 << (self.precision - 1), np.int32)
        term = np.empty_like(acc)
        for j in range(self.index.shape[1]):
            np.take(wide, self.index[:, j], axis=0, out=term)
            term *= self.weight[:, j, None, None]
            acc += term
        acc >>= self.precision
        return np.clip(acc, 0, 255).astype(np.uint8)


def _resize_box(
    pixels: np.ndarray,
    height: int,
    width: int,
    interpolation: str,
    top: int,
    left: int,
    crop_h: int,
    crop_w: int,
) -> np.ndarray:
    """The ``crop_h`` x ``crop_w`` box at ``(top, left)`` of ``pixels`` resized to ``height`` x
    ``width``, computing only that box: the width first, on only the input rows the box's
    output rows read, then the height (PyTorch's order; ``uint8`` rounded in between)."""
    uint8 = pixels.dtype == np.uint8
    if not uint8:
        pixels = pixels.astype(np.float64)
    rows = _Axis(pixels.shape[0], height, interpolation, top, crop_h, uint8)
    cols = _Axis(pixels.shape[1], width, interpolation, left, crop_w, uint8)
    pixels = pixels[rows.first : rows.last, cols.first : cols.last]
    if not cols.identity:
        pixels = cols.apply(np.ascontiguousarray(pixels.transpose(1, 0, 2))).transpose(1, 0, 2)
    pixels = rows.apply(np.ascontiguousarray(pixels))
    return np.ascontiguousarray(pixels if uint8 else pixels.astype(np.float32))


def resize_uint8(pixels: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    """``uint8 [H, W, C]`` -> ``uint8 [height, width, C]``, antialiased: torchvision v2's
    ``Resize((height, width), antialias=True)`` on a ``uint8`` tensor (module docstring)."""
    return _resize_box(np.asarray(pixels, np.uint8), height, width, interpolation, 0, 0, height, width)


def resize_float(pixels: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    """``resize_uint8`` of float pixels, unquantised and unrounded (torchvision on a float
    tensor): ``float32 [height, width, C]``."""
    return _resize_box(np.asarray(pixels, np.float64), height, width, interpolation, 0, 0, height, width)


def shorter_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The shape torchvision's ``Resize(size)`` gives: the shorter side ``size``, the longer
    ``int(size * long / short)`` (truncated, as torchvision does)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _anchor(length: int, size: int) -> int:
    """torchvision's ``CenterCrop`` offset: ``round((length - size) / 2)``, half to even."""
    return int(round((length - size) / 2.0))


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` of ``[H, W, C]`` (torchvision's ``CenterCrop`` anchor)."""
    top, left = _anchor(pixels.shape[0], size), _anchor(pixels.shape[1], size)
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def resize_crop(
    pixels: np.ndarray, resize_size: int, size: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """``Resize(resize_size, antialias=True) + CenterCrop(size)`` of ``uint8 [H, W, C]`` pixels
    (as ``resize_uint8``), or of float pixels (as ``resize_float``; not rounded); only the
    crop is computed."""
    pixels = np.asarray(pixels)
    size, resize_size = int(size), int(resize_size)
    if size > resize_size:
        raise ValueError(f"the crop ({size}) must not be larger than the resize ({resize_size}).")
    height, width = shorter_side_shape(pixels.shape[0], pixels.shape[1], resize_size)
    interpolation = interpolation.decode() if isinstance(interpolation, bytes) else str(interpolation)
    top, left = _anchor(height, size), _anchor(width, size)
    return _resize_box(pixels, height, width, interpolation, top, left, size, size)
