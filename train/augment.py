"""One augmentation op on one image, as torchvision's (or timm's) auto-augment policies apply it:
``apply_op(image, name, magnitude)``, the public entry and the code that training runs
(``train/data/autoaugment.py`` draws the ops and magnitudes of a policy and calls it).

``image`` is one ``uint8 [H, W, C]`` NumPy image (C = 3, or 1), and so is the result. ``name``
and ``magnitude`` are those of the augmentation space of torchvision's ``TrivialAugmentWide``,
``RandAugment`` and ``AutoAugment`` (``torchvision.transforms.v2``): the magnitude is in the op's
own units and signed where the op is -- degrees (Rotate), pixels (TranslateX/Y, truncated to an
integer as torchvision does), the shear's tangent (ShearX/Y), a factor delta (Brightness, Color,
Contrast, Sharpness: factor ``1 + magnitude``), bits kept (Posterize), a threshold as a fraction
of 255 (Solarize); Identity, AutoContrast, Equalize and Invert ignore it. As torchvision's
policies do by default, geometric ops sample the nearest pixel and fill with 0; with
``interpolation='bilinear'`` (torchvision's reference training script's default) they sample as
``grid_sample``'s bilinear mode, equal to torchvision's within one grey level on rare pixels.

Each op repeats the float32 arithmetic of ``torchvision.transforms.v2.functional`` on ``uint8``
tensors step for step, so the result equals torchvision's pixel for pixel
(``tests/test_augment_ops.py``):

* the colour blends (Brightness, Color, Contrast, Sharpness) compute ``a + alpha * b`` as torch's
  ``add_(b, alpha=...)`` does on x86 CPUs, with one rounding (a fused multiply-add); float64
  holds that product and sum exactly for pixel values, so rounding once to float32 matches it;
* the sampling grid of the geometric ops is torch's (``_affine_grid``): the same float32
  products and sums in the same order, the same ``linspace`` values, then ``grid_sample``'s
  ``nearest`` (round half to even) and its zero padding;
* Contrast's mean is exact while the grey image's sum stays below 2**24 (any image up to 256 x
  256 pixels); above it torch's float32 sum rounds in an order of its own, and the mean (hence
  a pixel, rarely) may differ by one grey level.

The magnitude bins of torchvision's policies are ``torch.linspace``'s float32 values, whose last
bit decides some ops (``int(16.0)`` is not ``int(15.999999)``): ``linspace`` gives the same.

The magnitude's sign and value come from the policy's draw; nothing here is random.
``convention='timm'`` takes timm's op names and levels instead (``train/augment_timm.py``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from train.augment_timm import apply_timm_op

CONVENTIONS = ("torchvision", "timm")
TORCHVISION_INTERPOLATIONS = ("nearest", "bilinear")  # of the geometric ops
# The ops of torchvision's TrivialAugmentWide/RandAugment/AutoAugment augmentation spaces.
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)

_F32 = np.float32


def linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, bit for bit as torch's CPU kernel computes
    it: ``step = (end - start) / (steps - 1)`` in float32; element ``i`` is ``start + step * i`` in
    the first half and ``end - step * (steps - 1 - i)`` in the second, each rounded once (a fused
    multiply-add, exact in float64 before the one rounding to float32)."""
    start32, end32 = _F32(start), _F32(end)
    if steps == 1:
        return np.array([start32], _F32)
    step = np.float64((end32 - start32) / _F32(steps - 1))
    i = np.arange(steps)
    first = np.float64(start32) + step * i
    second = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(_F32)


def _fma32(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` rounded once (exact in float64 for pixel-sized operands)."""
    return (np.asarray(a, np.float64) * np.float64(b) + np.asarray(c, np.float64)).astype(_F32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Clamp to 0..255, then truncate (torch's float -> uint8 cast)."""
    return np.clip(x, 0, 255).astype(np.uint8)


_LEVELS = np.arange(256, dtype=np.uint8)[:, None]  # every uint8 value, as a one-channel image


def _lookup(image: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """``tables[c][image[..., c]]`` per channel (``tables``: ``uint8 [C, 256]``), by Pillow's
    ``Image.point`` in one pass of C: the ops whose output pixel depends on that pixel's value
    alone (Contrast, AutoContrast, Solarize, Equalize) compute their float32 arithmetic once per
    level, on ``_LEVELS``, and so give the same bytes as computing it per pixel."""
    channels = image.shape[-1]
    source = Image.fromarray(np.ascontiguousarray(image[..., 0] if channels == 1 else image))
    return np.array(source.point(np.asarray(tables, np.uint8).reshape(-1).tolist())).reshape(image.shape)


def _grey(image: np.ndarray) -> np.ndarray:
    """torchvision's luma (``0.2989 R + 0.587 G + 0.114 B`` in float32, floored), ``[H, W, 1]``."""
    if image.shape[-1] == 1:
        return image.astype(_F32)
    r, g, b = (image[..., k].astype(_F32) for k in range(3))
    luma = _fma32(b, _F32(0.114), _fma32(g, _F32(0.587), r * _F32(0.2989)))
    return np.floor(luma)[..., None]


def _blend(image: np.ndarray, other, ratio: float) -> np.ndarray:
    """torchvision's ``_blend``: ``image * ratio + other * (1 - ratio)``, clamped, to uint8."""
    scaled = image.astype(_F32) * _F32(ratio)
    return _to_uint8(_fma32(np.broadcast_to(other, image.shape), _F32(1.0 - ratio), scaled))


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return _to_uint8(image.astype(_F32) * _F32(factor))


def color(image: np.ndarray, factor: float) -> np.ndarray:
    if image.shape[-1] == 1:
        return image.copy()
    return _blend(image, _grey(image), factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    grey = _grey(image)
    # The floored grey levels are integers: their sum is exact below 2**24, as torch's is.
    mean = _F32(float(grey.astype(np.float64).sum())) / _F32(grey.size)
    table = _blend(_LEVELS, mean, factor)[:, 0]
    return _lookup(image, np.broadcast_to(table, (image.shape[-1], 256)))


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    height, width = image.shape[:2]
    if height <= 2 or width <= 2:
        return image.copy()
    x = image.astype(np.int32)
    # torchvision's 3x3 blur (1s around, 5 in the middle, /13), rounded; the exact integer sum
    # over 13 is never half-way between integers, so torch's float32 convolution rounds the same.
    total = 4 * x[1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            total = total + x[dy : dy + height - 2, dx : dx + width - 2]
    blurred = (2 * total + 13) // 26
    out = image.astype(_F32)
    inner = out[1:-1, 1:-1]
    out[1:-1, 1:-1] = _fma32((blurred - x[1:-1, 1:-1]).astype(_F32), _F32(1.0 - factor), inner)
    return _to_uint8(out)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    if bits >= 8:
        return image.copy()
    return image & np.uint8((0xFF << (8 - bits)) & 0xFF)


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """Invert the pixels at or above ``threshold`` (0..255 units, compared in float32)."""
    levels = _LEVELS[:, 0]
    table = np.where(levels.astype(_F32) >= _F32(threshold), 255 - levels, levels)
    return _lookup(image, np.broadcast_to(table, (image.shape[-1], 256)))


def autocontrast(image: np.ndarray) -> np.ndarray:
    # Channel-major first: NumPy reduces contiguous rows far faster than a strided axis.
    planes = np.ascontiguousarray(np.moveaxis(image, -1, 0)).reshape(image.shape[-1], -1)
    low = planes.min(axis=1).astype(_F32)[:, None]
    high = planes.max(axis=1).astype(_F32)[:, None]
    flat = high == low
    inv_scale = (high - low) * _F32(1.0 / 255.0)
    low = np.where(flat, _F32(0), low)
    inv_scale = np.where(flat, _F32(1), inv_scale)
    return _lookup(image, _to_uint8((_LEVELS[:, 0].astype(_F32) - low) / inv_scale))


def equalize(image: np.ndarray) -> np.ndarray:
    """Pillow's histogram equalisation per channel, as torchvision computes it."""
    channels = image.shape[-1]
    source = Image.fromarray(np.ascontiguousarray(image[..., 0] if channels == 1 else image))
    hists = np.asarray(source.histogram(), np.int64).reshape(channels, 256)
    pixels = image.shape[0] * image.shape[1]
    tables = np.tile(_LEVELS[:, 0], (channels, 1))
    for k, hist in enumerate(hists):
        cum = np.cumsum(hist)
        # Pillow's step leaves out the pixels of the channel's brightest level.
        step = (pixels - hist[int(np.argmax(cum))]) // 255
        if step == 0:
            continue  # the channel is left as it is
        tables[k, 0] = 0
        tables[k, 1:] = np.clip((cum[:-1] + step // 2) // step, 0, 255)
    return _lookup(image, tables)


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - image


# ----------------------------------------------------------------------------------------------
# Geometry: torchvision's inverse affine matrix, torch's float32 grid, nearest sampling, zero fill.


def _inverse_affine(
    center: tuple[float, float], angle: float, translate: tuple[float, float], shear: tuple[float, float]
) -> list[float]:
    """The output -> input map (torchvision's ``_get_inverse_affine_matrix`` at scale 1), in
    float64 with its operations in its order, so the float32 matrix is the same."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    cos_sy, tan_sx = math.cos(sy), math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    m = [d / 1.0, -b / 1.0, 0.0, -c / 1.0, a / 1.0, 0.0]
    ux, uy = cx + translate[0], cy + translate[1]
    m[2] += cx - m[0] * ux - m[1] * uy
    m[5] += cy - m[3] * ux - m[4] * uy
    return m


def _warp(image: np.ndarray, matrix: list[float], interpolation: str = "nearest") -> np.ndarray:
    """``image`` sampled at each output pixel's centre mapped by ``matrix`` (centred pixel
    coordinates, as torch's grid), 0 outside the image: the nearest input pixel, or
    ``'bilinear'``: the four around it weighted as ``grid_sample``'s (zero outside), rounded."""
    height, width = image.shape[:2]
    theta = np.asarray(matrix, _F32).reshape(2, 3).T / np.array([0.5 * width, 0.5 * height], _F32)
    xs = linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width)[None, :]
    ys = linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height)[:, None]
    gx = (xs * theta[0, 0] + ys * theta[1, 0]) + theta[2, 0]
    gy = (xs * theta[0, 1] + ys * theta[1, 1]) + theta[2, 1]
    # grid_sample(align_corners=False): back to pixel units.
    x = ((gx + _F32(1)) * _F32(width) - _F32(1)) / _F32(2)
    y = ((gy + _F32(1)) * _F32(height) - _F32(1)) / _F32(2)
    if interpolation == "bilinear":
        return _bilinear(image, x, y)
    ix, iy = np.rint(x), np.rint(y)  # the nearest pixel, half to even
    inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    # One gather of 4-byte pixels (a gather of 3-byte rows is slower), from the image plus a zero
    # pixel at index H * W that every point outside reads.
    channels = image.shape[-1]
    padded = np.zeros((height * width + 1, 4), np.uint8)
    padded[:-1, :channels] = image.reshape(-1, channels)
    index = np.where(inside, iy * width + ix, height * width).astype(np.intp)
    out = padded.view(np.uint32).reshape(-1)[index]
    return np.ascontiguousarray(out.view(np.uint8).reshape(height, width, 4)[..., :channels])


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``grid_sample``'s bilinear mode at pixel coordinates ``x``, ``y`` (float32), zero outside,
    then torchvision's round half to even back to ``uint8``. torch's vectorised kernel may round
    a weight or sum differently in the last float32 bit, so a pixel near a half may differ by 1."""
    height, width, channels = image.shape
    x0, y0 = np.floor(x), np.floor(y)
    wx, wy = x - x0, y - y0
    ex, ny = _F32(1) - wx, _F32(1) - wy
    # Each channel as a float32 plane with a zero border for the outside: corners beyond the
    # border read 0 (their weight times zero, as grid_sample skips them). One flat index per
    # corner gathers every plane into contiguous arrays; the sums are in torch's order.
    planes = np.zeros((channels, height + 2, width + 2), _F32)
    planes[:, 1:-1, 1:-1] = np.moveaxis(image, -1, 0)
    planes = planes.reshape(channels, -1)
    rows = [(np.clip(y0 + d, -1, height).astype(np.intp) + 1) * (width + 2) for d in (0, 1)]
    cols = [np.clip(x0 + d, -1, width).astype(np.intp) + 1 for d in (0, 1)]
    out = np.zeros((channels, height, width), _F32)
    for dy, dx, weight in ((0, 0, ny * ex), (0, 1, ny * wx), (1, 0, wy * ex), (1, 1, wy * wx)):
        index = rows[dy] + cols[dx]
        for c in range(channels):
            out[c] += planes[c][index] * weight
    return np.ascontiguousarray(np.moveaxis(np.rint(out).astype(np.uint8), 0, -1))


def affine(
    image: np.ndarray,
    angle: float = 0.0,
    translate: tuple[float, float] = (0.0, 0.0),
    shear: tuple[float, float] = (0.0, 0.0),
    center: tuple[float, float] | None = None,
    interpolation: str = "nearest",
) -> np.ndarray:
    """torchvision's ``affine`` at scale 1 (degrees; ``center`` in pixels, None: the image's),
    ``'nearest'`` or ``'bilinear'``."""
    height, width = image.shape[:2]
    centre = (0.0, 0.0) if center is None else (center[0] - width * 0.5, center[1] - height * 0.5)
    matrix = _inverse_affine(centre, angle, (float(translate[0]), float(translate[1])), shear)
    return _warp(image, matrix, interpolation)


def rotate(image: np.ndarray, angle: float, interpolation: str = "nearest") -> np.ndarray:
    """torchvision's ``rotate`` about the centre, counter-clockwise in degrees, same size."""
    angle = angle % 360
    height, width = image.shape[:2]
    # torchvision's exact paths (quarter turns of a square image need no sampling).
    if angle == 0:
        return image.copy()
    if angle == 180:
        return np.ascontiguousarray(image[::-1, ::-1])
    if height == width and angle in (90, 270):
        return np.ascontiguousarray(np.rot90(image, k=1 if angle == 90 else 3, axes=(0, 1)))
    return _warp(image, _inverse_affine((0.0, 0.0), -angle, (0.0, 0.0), (0.0, 0.0)), interpolation)


def apply_op(
    image: np.ndarray,
    name: str,
    magnitude: float,
    convention: str = "torchvision",
    *,
    fill: tuple[int, ...] = (128, 128, 128),
    interpolation: str | None = None,
) -> np.ndarray:
    """``image`` (``uint8 [H, W, C]``) with op ``name`` at ``magnitude`` applied; a new array.

    ``convention='torchvision'``: torchvision's op names and units (see the module docstring;
    zero fill; ``interpolation`` ``'nearest'`` (None: the policies' default) or ``'bilinear'``,
    as torchvision's reference training script passes it). ``convention='timm'``: timm's
    RandAugment op names, with the magnitude its level on the 0..10 scale
    (``train/augment_timm.py``); ``fill`` and ``interpolation`` (``'bilinear'`` or ``'bicubic'``;
    None: bicubic) are then its geometric ops' fill colour and resampling.

    >>> import numpy as np
    >>> image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    >>> apply_op(image, "Posterize", 4)[0, 1].tolist()
    [0, 0, 0]
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}; got {convention!r}.")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"apply_op takes one uint8 [H, W, 1 or 3] image; got {image.dtype} {image.shape}.")
    if convention == "timm":
        return apply_timm_op(image, name, magnitude, fill, interpolation or "bicubic")
    interpolation = interpolation or "nearest"
    if interpolation not in TORCHVISION_INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {TORCHVISION_INTERPOLATIONS} for torchvision's ops; "
            f"got {interpolation!r}."
        )
    geometry = dict(interpolation=interpolation)
    m = float(magnitude)
    if name == "Identity":
        return image.copy()
    if name == "ShearX":
        return affine(image, shear=(math.degrees(math.atan(m)), 0.0), center=(0.0, 0.0), **geometry)
    if name == "ShearY":
        return affine(image, shear=(0.0, math.degrees(math.atan(m))), center=(0.0, 0.0), **geometry)
    if name == "TranslateX":
        return affine(image, translate=(int(m), 0), **geometry)
    if name == "TranslateY":
        return affine(image, translate=(0, int(m)), **geometry)
    if name == "Rotate":
        return rotate(image, m, **geometry)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        factor = 1.0 + m
        if factor < 0:
            raise ValueError(f"{name}: magnitude must be >= -1 (factor 1 + magnitude); got {m}.")
        return {"Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness}[name](
            image, factor
        )
    if name == "Posterize":
        return posterize(image, int(m))
    if name == "Solarize":
        return solarize(image, 255.0 * m)
    if name == "AutoContrast":
        return autocontrast(image)
    if name == "Equalize":
        return equalize(image)
    if name == "Invert":
        return invert(image)
    raise ValueError(f"unknown op {name!r}; the ops are {', '.join(OPS)}.")
