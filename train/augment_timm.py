"""timm's RandAugment ops (``timm/data/auto_augment.py``), for ``train.augment.apply_op(...,
convention='timm')``: the same Pillow operations with the same arguments, so the pixels are
timm's exactly.

The magnitude is timm's *level*: the ``m`` of a ``rand-m9-...`` string, on timm's 0..10 scale
(``_LEVEL_DENOM``; ``mmax`` allows more), after the policy's magnitude noise and clamp. Each op
maps it to its argument as timm's ``LEVEL_TO_ARG`` does; for the ops that timm negates at random
(Rotate, ShearX/Y, TranslateX/YRel and the ``...Increasing`` enhancements) a negative level is
the negated argument, and the other ops take levels >= 0. The geometric ops sample with
``interpolation`` (timm draws bilinear or bicubic per op unless one is configured) and fill with
``fill`` (timm's RandAugment in ``create_transform``: the dataset mean, rounded to 0..255).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0
# The ops of timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS.
TIMM_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "PosterizeIncreasing",
    "Solarize",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "Color",
    "ColorIncreasing",
    "Contrast",
    "ContrastIncreasing",
    "Brightness",
    "BrightnessIncreasing",
    "Sharpness",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# The ops whose argument timm negates with probability 1/2.
SIGNED = frozenset(
    ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    + tuple(f"{k}Increasing" for k in ("Color", "Contrast", "Brightness", "Sharpness"))
)
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_ENHANCERS = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
}


def _signed(value: float, negative: bool) -> float:
    return -value if negative else value


def apply_timm_op(
    image: np.ndarray,
    name: str,
    level: float,
    fill: tuple[int, ...] = (128, 128, 128),
    interpolation: str = "bicubic",
) -> np.ndarray:
    """``image`` (``uint8 [H, W, 3]``) with timm's op ``name`` at ``level`` (see the module)."""
    if name not in TIMM_OPS:
        raise ValueError(f"unknown timm op {name!r}; the ops are {', '.join(TIMM_OPS)}.")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}; got {interpolation!r}.")
    if image.shape[-1] != 3:
        raise ValueError(f"timm's ops take RGB images [H, W, 3]; got {image.shape}.")
    negative = level < 0
    if negative and name not in SIGNED:
        raise ValueError(f"timm's {name} takes a level >= 0; got {level}.")
    level = abs(float(level))
    img = Image.fromarray(image)
    frac = level / LEVEL_DENOM
    geometry = dict(resample=INTERPOLATIONS[interpolation], fillcolor=tuple(fill))
    if name == "AutoContrast":
        img = ImageOps.autocontrast(img)
    elif name == "Equalize":
        img = ImageOps.equalize(img)
    elif name == "Invert":
        img = ImageOps.invert(img)
    elif name == "Rotate":
        img = img.rotate(_signed(frac * 30.0, negative), **geometry)
    elif name.startswith("Posterize"):
        bits = int(frac * 4)
        bits = 4 - bits if name == "PosterizeIncreasing" else bits
        if bits <= 0:
            # Keep no bit: black, as Pillow before 13 posterizes; Pillow 13 refuses < 1 bit (and
            # timm with it: PosterizeIncreasing from level 10, Posterize below level 2.5).
            return np.zeros_like(image)
        img = img if bits >= 8 else ImageOps.posterize(img, bits)
    elif name == "SolarizeAdd":
        add = min(128, int(frac * 110))
        table = [min(255, i + add) if i < 128 else i for i in range(256)]
        img = img.point(table * len(img.getbands()))
    elif name.startswith("Solarize"):
        threshold = min(256, int(frac * 256))
        img = ImageOps.solarize(img, 256 - threshold if name == "SolarizeIncreasing" else threshold)
    elif name.endswith("Increasing"):
        factor = max(0.1, 1.0 + _signed(frac * 0.9, negative))
        img = _ENHANCERS[name[: -len("Increasing")]](img).enhance(factor)
    elif name in _ENHANCERS:
        img = _ENHANCERS[name](img).enhance(frac * 1.8 + 0.1)
    elif name in ("ShearX", "ShearY"):
        shear = _signed(frac * 0.3, negative)
        matrix = (1, shear, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, shear, 1, 0)
        img = img.transform(img.size, Image.Transform.AFFINE, matrix, **geometry)
    else:  # TranslateXRel, TranslateYRel: a share of the side, timm's translate_pct 0.45
        share = _signed(frac * 0.45, negative)
        if name == "TranslateXRel":
            matrix = (1, 0, share * img.size[0], 0, 1, 0)
        else:
            matrix = (1, 0, 0, 0, 1, share * img.size[1])
        img = img.transform(img.size, Image.Transform.AFFINE, matrix, **geometry)
    return np.asarray(img)
