"""The training augmentation's options: which crop, and the fields that tune it.

Where to change the augmentation:

* the per-image ops of image folders (Pillow and NumPy): ``train/data/image_ops.py``,
  ``train_ops`` lists them in order (a crop from ``CROPS``, then ``flip_lr``);
* the same ops for TFDS (TF ops, inside ``tf.data``): ``train/data/tf_ops.py``, ``CROPS`` and
  ``preprocess_train_image``;
* the digits' (in memory): ``train/data/digits.py``;
* the automatic augmentation policies (``auto_augment``), after the crop and flip, on ``uint8``
  pixels, for image folders and TFDS alike: ``train/data/autoaugment.py``, ops in
  ``train/augment.py``;
* random erasing, after normalisation (image folders): ``train/data/erase.py``;
* mixup and cutmix, per batch inside the train step: ``train/mixup.py``.

A new option is a field here, with its default in ``configs/default.py``; the image-folder
path ships ``AugmentOptions`` to its Grain workers, so the new field travels with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# config.train_augment: the crop (or resize) that starts the training preprocessing.
TRAIN_AUGMENTATIONS = ("inception_crop", "pad_crop", "none")


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """The config fields that the per-image training preprocessing reads, by the same names."""

    train_augment: str  # one of TRAIN_AUGMENTATIONS
    crop_padding: int  # pad_crop: pixels of reflect padding on each side
    random_flip: bool  # a horizontal flip with probability 1/2
    crop_area_range: tuple[float, float]  # inception_crop: the box's share of the image's area
    crop_aspect_ratio_range: tuple[float, float]  # inception_crop: the box's width / height
    crop_min_object_covered: float  # inception_crop: TF's sample_distorted_bounding_box
    # torchvision's --interpolation, 'bilinear' or 'bicubic': inception_crop's resize (its
    # RandomResizedCrop) and the geometric ops of torchvision's auto-augment policies, as its
    # reference script passes it to both.
    interpolation: str
    jpeg_reduced_decode: bool  # image folders, inception_crop: decode large JPEGs at 1/2..1/8
    auto_augment: str  # '' or a policy of train/data/autoaugment.py, after the crop and flip
    ra_num_ops: int  # auto_augment='ra': ops per image
    ra_magnitude: int  # auto_augment='ra': the magnitude bin
    ra_num_magnitude_bins: int  # auto_augment='ra': bins of each op's magnitude range
    normalize_mean: tuple[float, ...]  # timm's rand- policies fill with the mean pixel (() = ImageNet's)
    random_erase_prob: float  # image folders: timm's RandomErasing after normalisation (erase.py)
    random_erase_mode: str  # 'const' (zeros) or 'pixel' (per-pixel standard normal)
    random_erase_scale: tuple[float, float]  # the box's share of the image's area
    random_erase_ratio: tuple[float, float]  # the box's height / width, log-uniform

    @classmethod
    def from_config(cls, config: Any) -> AugmentOptions:
        """The options of ``config`` (a ``ConfigDict`` or any object with these fields)."""
        return cls(
            **{
                f.name: getattr(config, f.name)
                if f.default is dataclasses.MISSING
                else getattr(config, f.name, f.default)
                for f in dataclasses.fields(cls)
            }
        )
