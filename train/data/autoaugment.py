"""The automatic augmentation policies of ``config.auto_augment``: which ops, at which
magnitudes, each training image gets; the ops themselves are ``train.augment.apply_op``.

* ``'ta_wide'``: torchvision's ``TrivialAugmentWide`` (31 magnitude bins): one op drawn uniformly
  from its augmentation space, a magnitude bin drawn uniformly, a random sign for signed ops;
* ``'ra'``: torchvision's ``RandAugment``: ``ra_num_ops`` ops in turn, each drawn uniformly, at
  bin ``ra_magnitude`` of ``ra_num_magnitude_bins``, with a random sign for signed ops;
* timm's ``'rand-...'`` strings (``'rand-m9-mstd0.5-inc1'``, ``'rand-m7-mstd0.5'``): timm's
  ``RandAugment`` (``rand_augment_transform``, ``TimmRandAugment``), its grammar parsed as timm
  does, its ops on Pillow (``train/augment_timm.py``), filling with the mean pixel as timm's
  ``create_transform`` does and drawing bilinear or bicubic resampling per geometric op (timm's
  default ``interpolation='random'``);
* ``'aa'``: torchvision's ``AutoAugment`` with ``AutoAugmentPolicy.IMAGENET`` (the paper's
  ImageNet policy, which timm's ``'original'`` also is): one of 25 sub-policies, each op applied
  with its probability at its bin of 10.

torchvision's policies fill with zero and sample the nearest pixel in their geometric ops (their
default), or bilinearly where the config's ``interpolation`` (torchvision's ``--interpolation``,
which its reference training script passes to these policies) is ``'bilinear'``; a config without
that field keeps nearest. timm's ``rand-`` policies draw bilinear or bicubic per op whatever it
is (timm's training default, ``--train-interpolation random``).

The draws come from the example's generator (``np.random.Generator``, keyed on seed, epoch and
example position like its crop's, so a resumed run draws the same), in the order torchvision's
``forward`` draws from torch: ``integers(n)`` where it calls ``torch.randint(n, ())`` and
``random()`` where it calls ``torch.rand(())`` (timm's: see ``TimmRandAugment``), so
``tests/test_autoaugment.py`` can replay our draws into torchvision's and timm's own policies.
The magnitude bins are torchvision's (``augmentation_space``), for the image's own height and
width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import numpy as np

from train.augment import TORCHVISION_INTERPOLATIONS, apply_op, linspace
from train.augment_timm import LEVEL_DENOM, SIGNED
from train.data.core import IMAGENET_MEAN

AUTO_AUGMENTS = ("ta_wide", "ra", "aa")

# torchvision's AutoAugmentPolicy.IMAGENET: pairs of (op, probability, magnitude bin of 10).
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def _posterize_bits(num_bins: int, levels: int) -> np.ndarray:
    """torchvision's Posterize bins: ``8 - i / ((num_bins - 1) / levels)``, rounded half to even."""
    i = np.arange(num_bins).astype(np.float32)
    return np.rint(np.float32(8) - i / np.float32((num_bins - 1) / levels)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def augmentation_space(policy: str, num_bins: int, height: int, width: int) -> dict[str, tuple[Any, bool]]:
    """``{op: (magnitude bins or None, signed)}`` of torchvision's policy (``'ta_wide'``, ``'ra'``
    or ``'aa'``), in torchvision's order (the uniform op draw indexes it); cached, not to be
    changed."""
    if policy == "ta_wide":
        shear, tx, ty, rot, enhance, levels = 0.99, 32.0, 32.0, 135.0, 0.99, 6
    else:
        shear, tx, ty, rot, enhance, levels = 0.3, 150.0 / 331.0 * width, 150.0 / 331.0 * height, 30.0, 0.9, 4
    space: dict[str, tuple[Any, bool]] = {} if policy == "aa" else {"Identity": (None, False)}
    space.update(
        {
            "ShearX": (linspace(0.0, shear, num_bins), True),
            "ShearY": (linspace(0.0, shear, num_bins), True),
            "TranslateX": (linspace(0.0, tx, num_bins), True),
            "TranslateY": (linspace(0.0, ty, num_bins), True),
            "Rotate": (linspace(0.0, rot, num_bins), True),
            **{
                name: (linspace(0.0, enhance, num_bins), True)
                for name in ("Brightness", "Color", "Contrast", "Sharpness")
            },
            "Posterize": (_posterize_bits(num_bins, levels), False),
            "Solarize": (linspace(1.0, 0.0, num_bins), False),
            "AutoContrast": (None, False),
            "Equalize": (None, False),
        }
    )
    if policy == "aa":
        space["Invert"] = (None, False)
    return space


@dataclasses.dataclass(frozen=True)
class Policy:
    """One ``config.auto_augment`` with its fields (``ra_*`` for ``'ra'``)."""

    name: str  # one of AUTO_AUGMENTS
    num_ops: int = 2  # 'ra'
    magnitude: int = 9  # 'ra': the bin
    num_bins: int = 31  # 'ta_wide', 'ra'
    interpolation: str = "nearest"  # the geometric ops' sampling: 'nearest' or 'bilinear'

    @classmethod
    def from_config(cls, config: Any) -> Policy | TimmRandAugment | None:
        """The policy of ``config.auto_augment`` (None when ''); ``ValueError`` if unknown."""
        return make_policy(
            str(config.auto_augment or ""),
            int(config.ra_num_ops),
            int(config.ra_magnitude),
            int(config.ra_num_magnitude_bins),
            timm_fill(config.normalize_mean),
            str(config.interpolation),
        )

    def draw(self, rng: np.random.Generator, height: int, width: int) -> list[tuple[str, float]]:
        """The ``(op, signed magnitude)`` list for one image of ``height`` x ``width``."""
        space = augmentation_space(self.name, self.num_bins, height, width)
        names = list(space)
        ops = []

        def signed(name: str, bins: Any, index: int) -> tuple[str, float]:
            magnitude = float(bins[index])
            if space[name][1] and float(rng.random()) <= 0.5:
                magnitude = -magnitude
            return name, magnitude

        if self.name == "aa":
            for name, prob, index in IMAGENET_POLICY[int(rng.integers(len(IMAGENET_POLICY)))]:
                if not float(rng.random()) <= prob:
                    continue
                bins = space[name][0]
                ops.append((name, 0.0) if bins is None else signed(name, bins, index))
            return ops
        for _ in range(self.num_ops if self.name == "ra" else 1):
            name = names[int(rng.integers(len(names)))]
            bins = space[name][0]
            if bins is None:
                ops.append((name, 0.0))
            elif self.name == "ra":
                ops.append(signed(name, bins, self.magnitude))
            else:
                ops.append(signed(name, bins, int(rng.integers(self.num_bins))))
        return ops

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``uint8 [H, W, C]`` -> the same with this policy's drawn ops applied in turn."""
        for name, magnitude in self.draw(rng, image.shape[0], image.shape[1]):
            image = apply_op(image, name, magnitude, interpolation=self.interpolation)
        return image


# timm's RandAugment op lists (``_RAND_TRANSFORMS``; ``inc1``: ``_RAND_INCREASING_TRANSFORMS``).
TIMM_RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
TIMM_RAND_INCREASING_OPS = tuple(
    f"{name}Increasing"
    if name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
    else name
    for name in TIMM_RAND_OPS
)
_TIMM_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TIMM_FILL = (124, 116, 104)  # ImageNet's mean pixel, timm's default fill for RandAugment


@dataclasses.dataclass(frozen=True)
class TimmRandAugment:
    """timm's ``rand-...`` policy (``rand_augment_transform``): ``num_layers`` ops drawn uniformly
    with replacement, each applied with probability ``prob`` at level ``magnitude`` (plus normal
    noise of std ``magnitude_std``, uniform in [0, magnitude] when infinite), clamped to [0,
    ``magnitude_max`` or 10]; the geometric ops draw bilinear or bicubic resampling.

    Draws, in timm's order: the ops (``np.random.choice``: ``integers`` each); per op, ``random()``
    against ``prob`` (when below 1), the noise (``normal``/``uniform``), ``random() > 0.5`` for
    the sign of a signed op, ``integers(2)`` for the resampling of a geometric op."""

    ops: tuple[str, ...]
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = 0.0
    fill: tuple[int, ...] = TIMM_FILL

    @classmethod
    def parse(cls, spec: str, fill: tuple[int, ...] = TIMM_FILL) -> TimmRandAugment:
        """timm's grammar: ``rand`` then ``-``-separated ``m`` (int), ``n`` (int), ``p``
        (float), ``mstd`` (float; > 100: uniform), ``mmax`` (int), ``inc`` (0/1); as timm, a
        section without a number is ignored."""
        parts = spec.split("-")
        fields: dict[str, Any] = {"fill": tuple(fill)}
        increasing = False
        bad = f"config.auto_augment={spec!r}: timm's rand- sections are m, n, p, mstd, mmax and inc"
        if parts[0] != "rand":
            raise ValueError(f"{bad}, after 'rand'.")
        for part in parts[1:]:
            if part.startswith("t"):
                raise ValueError(f"{bad}; the t (op set) section is not supported.")
            pieces = re.split(r"(\d.*)", part)
            if len(pieces) < 2:
                continue
            key, value = pieces[:2]
            try:
                if key == "mstd":
                    fields["magnitude_std"] = math.inf if float(value) > 100 else float(value)
                elif key == "mmax":
                    fields["magnitude_max"] = int(value)
                elif key == "inc":
                    increasing = bool(int(value))
                elif key == "m":
                    fields["magnitude"] = int(value)
                elif key == "n":
                    fields["num_layers"] = int(value)
                elif key == "p":
                    fields["prob"] = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{bad}; got {part!r}.") from None
        return cls(TIMM_RAND_INCREASING_OPS if increasing else TIMM_RAND_OPS, **fields)

    def draw(self, rng: np.random.Generator, height: int = 0, width: int = 0) -> list[tuple[str, float, str]]:
        """``(op, signed level, interpolation)`` for one image."""
        chosen = [self.ops[int(rng.integers(len(self.ops)))] for _ in range(self.num_layers)]
        drawn = []
        for name in chosen:
            if self.prob < 1.0 and float(rng.random()) > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std == math.inf:
                level = float(rng.uniform(0, level))
            elif self.magnitude_std > 0:
                level = float(rng.normal(level, self.magnitude_std))
            level = max(0.0, min(level, self.magnitude_max or LEVEL_DENOM))
            if name in SIGNED and float(rng.random()) > 0.5:
                level = -level
            interpolation = "bicubic"
            if name in _TIMM_GEOMETRIC:
                interpolation = ("bilinear", "bicubic")[int(rng.integers(2))]
            drawn.append((name, level, interpolation))
        return drawn

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for name, level, interpolation in self.draw(rng):
            image = apply_op(image, name, level, "timm", fill=self.fill, interpolation=interpolation)
        return image


@functools.lru_cache(maxsize=8)
def make_policy(
    name: str,
    num_ops: int = 2,
    magnitude: int = 9,
    num_bins: int = 31,
    fill: tuple[int, ...] = TIMM_FILL,
    interpolation: str = "nearest",
) -> Policy | TimmRandAugment | None:
    """The policy ``name`` (``auto_augment``; None when ''), with the ``ra_*`` fields for 'ra',
    for timm's the fill colour of its geometric ops, for torchvision's their sampling
    (``interpolation``)."""
    if not name:
        return None
    if name.startswith("rand"):
        return TimmRandAugment.parse(name, fill)
    if name not in AUTO_AUGMENTS:
        raise ValueError(
            f"config.auto_augment must be '' (off), one of {AUTO_AUGMENTS} or timm's 'rand-m9-mstd0.5-inc1' "
            f"form; got {name!r}."
        )
    if interpolation not in TORCHVISION_INTERPOLATIONS:
        raise ValueError(
            f"config.interpolation must be one of {TORCHVISION_INTERPOLATIONS} with config.auto_augment="
            f"{name!r} (torchvision's policies' geometric ops); got {interpolation!r}."
        )
    if name == "ra":
        if num_ops < 0 or num_bins < 1 or not 0 <= magnitude < num_bins:
            raise ValueError(
                "config.auto_augment='ra' needs ra_num_ops >= 0, ra_num_magnitude_bins >= 1 and 0 <= "
                f"ra_magnitude < ra_num_magnitude_bins; got {num_ops}, {num_bins} and {magnitude}."
            )
        return Policy(name, num_ops, magnitude, num_bins, interpolation)
    return Policy(name, num_bins=31 if name == "ta_wide" else 10, interpolation=interpolation)


def timm_fill(normalize_mean: Any) -> tuple[int, ...]:
    """timm's fill for its RandAugment (``create_transform``): the mean pixel, rounded (0..255
    units: ``config.normalize_mean``, else ImageNet's)."""
    mean = tuple(normalize_mean) or IMAGENET_MEAN
    if len(mean) == 1:
        mean = mean * 3
    return tuple(min(255, round(float(m))) for m in mean)


def auto_augment(image: Any, rng: np.random.Generator, size: int, config: Any) -> np.ndarray:
    """The image-folder training op (``image_ops.train_ops``, after the flip) and the TFDS
    path's: ``config.auto_augment``'s policy on ``uint8 [H, W, C]`` pixels (or a Pillow image)."""
    return Policy.from_config(config)(np.ascontiguousarray(image), rng)
