"""The automatic augmentation policies of ``config.auto_augment``: which ops, at which
magnitudes, each training image gets; the ops themselves are ``train.augment.apply_op``.

* ``'ta_wide'``: torchvision's ``TrivialAugmentWide`` (31 magnitude bins): one op drawn uniformly
  from its augmentation space, a magnitude bin drawn uniformly, a random sign for signed ops;
* ``'ra'``: torchvision's ``RandAugment``: ``ra_num_ops`` ops in turn, each drawn uniformly, at
  bin ``ra_magnitude`` of ``ra_num_magnitude_bins``, with a random sign for signed ops;
* ``'aa'``: torchvision's ``AutoAugment`` with ``AutoAugmentPolicy.IMAGENET`` (the paper's
  ImageNet policy, which timm's ``'original'`` also is): one of 25 sub-policies, each op applied
  with its probability at its bin of 10.

Torchvision's defaults hold: nearest-pixel sampling and zero fill for the geometric ops.
(torchvision's reference training script passes its ``--interpolation``, bilinear by default, to
these policies; here it is nearest, the policies' own default.)

The draws come from the example's generator (``np.random.Generator``, keyed on seed, epoch and
example position like its crop's, so a resumed run draws the same), in the order torchvision's
``forward`` draws from torch: ``integers(n)`` where it calls ``torch.randint(n, ())`` and
``random()`` where it calls ``torch.rand(())``, so ``tests/test_autoaugment.py`` can replay
our draws into torchvision's own policies. The magnitude bins are torchvision's
(``augmentation_space``), for the image's own height and width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from train.augment import apply_op, linspace

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

    @classmethod
    def from_config(cls, config: Any) -> Policy | None:
        """The policy of ``config.auto_augment`` (None when ''); ``ValueError`` if unknown."""
        return make_policy(
            str(config.auto_augment or ""),
            int(config.ra_num_ops),
            int(config.ra_magnitude),
            int(config.ra_num_magnitude_bins),
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
            image = apply_op(image, name, magnitude)
        return image


@functools.lru_cache(maxsize=8)
def make_policy(name: str, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31) -> Policy | None:
    """The policy ``name`` (``auto_augment``; None when ''), with the ``ra_*`` fields for 'ra'."""
    if not name:
        return None
    if name not in AUTO_AUGMENTS:
        raise ValueError(f"config.auto_augment must be '' (off) or one of {AUTO_AUGMENTS}; got {name!r}.")
    if name == "ra":
        if num_ops < 0 or num_bins < 1 or not 0 <= magnitude < num_bins:
            raise ValueError(
                "config.auto_augment='ra' needs ra_num_ops >= 0, ra_num_magnitude_bins >= 1 and 0 <= "
                f"ra_magnitude < ra_num_magnitude_bins; got {num_ops}, {num_bins} and {magnitude}."
            )
        return Policy(name, num_ops, magnitude, num_bins)
    return Policy(name, num_bins=31 if name == "ta_wide" else 10)


def auto_augment(image: Any, rng: np.random.Generator, size: int, config: Any) -> np.ndarray:
    """The image-folder training op (``image_ops.train_ops``, after the flip) and the TFDS
    path's: ``config.auto_augment``'s policy on ``uint8 [H, W, C]`` pixels (or a Pillow image)."""
    return Policy.from_config(config)(np.asarray(image), rng)
