"""Per-image preprocessing with TensorFlow ops: the TFDS path's training augmentation and the
evaluation resize-and-crop (also ``train.predict``'s for runs on TFDS sets, digits and synthetic
data).

Evaluation with ``eval_resize_size`` (torchvision's ``Resize + CenterCrop``) runs the image-folder
path's NumPy code (``train/data/eval_resize.py``) through ``tf.numpy_function``: TF's resize
computes in float and rounds once, torchvision's in 8-bit integers per axis, so one implementation
serves both pipelines and they give the same pixels.

Training: a crop from ``CROPS`` (``config.train_augment``), the pixels rounded back to ``uint8``,
then a horizontal flip unless ``config.random_flip`` is False, then ``config.auto_augment`` and
random erasing, the image folders' NumPy/Pillow implementation called from the graph
(``train/data/host_ops.py``). Each op is keyed by a stateless
seed, so an example's result is a pure function of it. Normalisation happens on the accelerator
(``train/data/core.py``). ``train/data/image_ops.py`` has the same ops in Pillow and NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from train.data import eval_resize, host_ops, image_ops
from train.data.augment import TRAIN_AUGMENTATIONS
from train.data.core import DatasetError, DatasetInfo, normalize_pixels
from train.data.eval_resize import EvalOptions


def get_tf():
    """TensorFlow, kept off the accelerators: the input pipeline runs on the host."""
    import tensorflow as tf

    # The input pipeline runs on the host; never let TensorFlow reserve accelerator memory.
    tf.config.set_visible_devices([], "GPU")
    return tf


def decode(image, channels: int):
    return get_tf().io.decode_image(image, channels=channels, expand_animations=False)


def round_to_uint8(image):
    """Resized float pixels back to ``uint8`` (round to nearest); ``uint8`` input passes through."""
    tf = get_tf()
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# ----------------------------------------------------------------------------------------------
# The training crops: (image, seed, size, channels, config, jpeg=, encoded=) -> [size, size, C].


def inception_crop(image, seed, size: int, channels: int, config: Any, *, jpeg: bool, encoded: bool):
    """A random box of area ``crop_area_range`` and aspect ``crop_aspect_ratio_range``, resized
    to ``size`` (antialiased ``config.interpolation``, as torchvision's RandomResizedCrop); a
    JPEG has only the box decoded."""
    tf = get_tf()
    if encoded and not jpeg:
        image = decode(image, channels)
    shape = tf.image.extract_jpeg_shape(image) if jpeg else tf.shape(image)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=float(config.crop_min_object_covered),
        aspect_ratio_range=tuple(config.crop_aspect_ratio_range),
        area_range=tuple(config.crop_area_range),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    if jpeg:
        # Decode only the crop: much cheaper than decoding the whole JPEG.
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        image = tf.io.decode_and_crop_jpeg(image, window, channels=channels)
    else:
        image = tf.slice(image, begin, crop_size)
    return tf.image.resize(image, [size, size], method=config.interpolation, antialias=True)


def pad_crop(image, seed, size: int, channels: int, config: Any, *, jpeg: bool, encoded: bool):
    """Reflect-pad ``crop_padding`` pixels and crop ``size`` x ``size`` back at random (CIFAR)."""
    tf = get_tf()
    image = decode(image, channels) if encoded else image
    image = tf.image.resize(image, [size, size])  # no-op at native size
    pad = int(config.crop_padding)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(image, [size, size, channels], seed=seed)


def resize(image, seed, size: int, channels: int, config: Any, *, jpeg: bool, encoded: bool):
    """No crop: the whole image resized to ``size`` x ``size`` (``train_augment='none'``)."""
    return get_tf().image.resize(decode(image, channels) if encoded else image, [size, size])


CROPS = {"inception_crop": inception_crop, "pad_crop": pad_crop, "none": resize}


def preprocess_train_image(image, seed, info: DatasetInfo, config: Any, *, jpeg: bool, encoded: bool):
    """Training preprocessing of one example (TF ops): ``uint8 [H, W, C]`` pixels.

    ``image`` is the encoded file (``encoded``; ``jpeg`` when it is a JPEG) or a decoded ``uint8``
    array; ``seed`` is a stateless ``int64 [2]`` seed, so the result is a pure function of it.
    The crop is ``CROPS[config.train_augment]``; then a random horizontal flip unless
    ``config.random_flip`` is False.
    """
    tf = get_tf()
    size, channels = info.image_shape[0], info.image_shape[-1]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    crop = CROPS.get(config.train_augment)
    if crop is None:
        raise DatasetError(
            f"train_augment must be one of {TRAIN_AUGMENTATIONS}; got {config.train_augment!r}."
        )
    image = crop(image, crop_seed, size, channels, config, jpeg=jpeg, encoded=encoded)
    image = round_to_uint8(image)  # before the flip: a quarter of the bytes to move from here on
    if config.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    if config.auto_augment or config.random_erase_prob > 0:
        image = host_ops.apply(image, seed, info, config)
    return image


def preprocess_eval_image(
    image,
    info: DatasetInfo,
    crop_fraction: float = 0.875,
    *,
    size: int = 0,
    resize_size: int = 0,
    interpolation: str = "bilinear",
    to_uint8: bool = True,
):
    """Eval preprocessing of one decoded image (TF tensor) -> ``uint8 [size, size, C]`` pixels.

    Resize the shorter side to ``size / crop_fraction`` (256 for 224 at 0.875) and take the
    central ``size`` x ``size`` crop; ``crop_fraction=1`` resizes straight to ``size``
    (``size`` 0: the training size, ``info``'s). ``resize_size > 0``: torchvision's
    ``Resize(resize_size) + CenterCrop(size)`` instead (``torchvision_eval``), which also takes
    an RGB file's encoded bytes and decodes them with Pillow, as torchvision's loader does.
    Used for the eval split and by ``train.predict`` so both see identical inputs.
    ``to_uint8=False`` keeps float pixels (arrays whose values are not whole numbers).
    """
    tf = get_tf()
    size = size or info.image_shape[0]
    image = tf.convert_to_tensor(image)
    if resize_size:
        image = torchvision_eval(image, info.image_shape[-1], size, resize_size, interpolation)
    elif crop_fraction >= 1.0:
        image = tf.image.resize(image, [size, size], method=interpolation, antialias=True)
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = (size / crop_fraction) / tf.reduce_min(shape)
        new = tf.cast(tf.round(shape * scale), tf.int32)
        image = tf.image.resize(image, new, method=interpolation, antialias=True)
        top = (new[0] - size) // 2
        left = (new[1] - size) // 2
        image = image[top : top + size, left : left + size]
    return round_to_uint8(image) if to_uint8 else image


def torchvision_eval(image, channels: int, size: int, resize_size: int, interpolation: str):
    """torchvision's ``Resize(resize_size, antialias=True) + CenterCrop(size)`` of one image, by
    ``tf.numpy_function`` of the image-folder path's code: a ``uint8`` or float image
    (``eval_resize.resize_crop``), or an encoded RGB file, decoded by Pillow as there
    (``image_ops.eval_image``: torchvision's loader's pixels)."""
    tf = get_tf()
    if image.dtype == tf.string:
        out = tf.numpy_function(
            lambda data: image_ops.eval_image(
                # The file's bytes: as they are inside tf.data, a 0-d object array when eager.
                data.item() if isinstance(data, np.ndarray) else data,
                size,
                resize_size=resize_size,
                interpolation=interpolation,
            ),
            [image],
            tf.uint8,
            stateful=False,
        )
    else:
        if image.dtype != tf.uint8:
            image = tf.cast(image, tf.float32)
        out = tf.numpy_function(
            lambda pixels: eval_resize.resize_crop(pixels, resize_size, size, interpolation),
            [image],
            image.dtype,
            stateful=False,
        )
    out.set_shape([size, size, channels])
    return out


def load_image(path: str, info: DatasetInfo, options: EvalOptions) -> np.ndarray:
    """Read an image file and apply the eval preprocessing: normalised float32 [H, W, C]."""
    tf = get_tf()
    image = tf.io.read_file(path)
    if not (options.resize_size and info.image_shape[-1] == 3):  # else Pillow decodes it
        image = tf.io.decode_image(image, channels=info.image_shape[-1], expand_animations=False)
    return normalize_pixels(preprocess_eval_image(image, info, **options.kwargs()), info)


def load_array(pixels: np.ndarray, info: DatasetInfo, options: EvalOptions) -> np.ndarray:
    """Raw pixels ``[H, W, C]`` (0..255) with the eval preprocessing, not rounded: normalised
    float32."""
    image = preprocess_eval_image(np.asarray(pixels, np.float32), info, **options.kwargs(), to_uint8=False)
    return normalize_pixels(image, info)
