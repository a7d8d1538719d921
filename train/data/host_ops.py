"""The TFDS path's per-image ops after the crop and flip -- ``config.auto_augment``
(``autoaugment.py``) and random erasing (``erase.py``) -- by the very NumPy/Pillow code the image
folders run, called from ``tf.data`` with ``tf.numpy_function``.

One implementation serves both pipelines, so their parity with torchvision and timm is checked
once. The alternative, moving TFDS training onto Grain over ``tfds.data_source``, would also
have given one pipeline, but it needs TFDS's array_record files (the sets prepared as TFRecord,
ImageNet's usual form, cannot be read that way) and would give up the TFRecord path's JPEG
crop-before-decode; the numpy_function keeps the TFDS path as it is and adds only these ops. Their
Python runs under the GIL, so tf.data's parallel map overlaps it with TF's decoding and cropping
but runs these ops one image at a time per process.

Draws: a NumPy generator keyed on the example's stateless seed ``(fold_seed(seed, epoch,
host), position in the host's epoch)`` (``tfds.py``) and a tag, so a resumed run draws the same.
The policy draws first, then the erasing, from that one generator, as on image folders.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from train.data.augment import AugmentOptions
from train.data.autoaugment import Policy
from train.data.core import DatasetInfo
from train.data.erase import erase_normalised

# Keeps these draws apart from any other generator keyed on the same example seed.
_TAG = 0xA06


def example_rng(seed: Any) -> np.random.Generator:
    """The generator of the example with stateless seed ``seed`` (int64 ``[2]``)."""
    return np.random.default_rng([int(s) & 0xFFFFFFFFFFFFFFFF for s in np.asarray(seed)] + [_TAG])


def host_augment(
    image: np.ndarray, rng: np.random.Generator, options: AugmentOptions, info: DatasetInfo
) -> np.ndarray:
    """``uint8 [H, W, C]`` -> the policy's image (``uint8``), then, if erasing is on, the
    normalised float32 image with its box erased."""
    policy = Policy.from_config(options)
    if policy is not None:
        image = policy(np.ascontiguousarray(image), rng)
    if options.random_erase_prob > 0:
        image = erase_normalised(image, rng, options, info.mean, info.std)
    return image


def apply(image, seed, info: DatasetInfo, config: Any):
    """``host_augment`` inside the ``tf.data`` graph (``tf.numpy_function``)."""
    import tensorflow as tf

    options = AugmentOptions.from_config(config)
    erase = options.random_erase_prob > 0
    dtype = tf.float32 if erase else tf.uint8

    def run(pixels: np.ndarray, example_seed: np.ndarray) -> np.ndarray:
        out = host_augment(pixels, example_rng(example_seed), options, info)
        return np.asarray(out, np.float32 if erase else np.uint8)

    out = tf.numpy_function(run, [image, seed], dtype, stateful=False)
    out.set_shape(info.image_shape)
    return out
