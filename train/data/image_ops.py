"""Image preprocessing with Pillow and NumPy (no TensorFlow), for image folders read by Grain.

The same augmentation as the TF ops of ``train/data/tf_ops.py``, controlled by the same options
(``train/data/augment.py``), so a run reads the same kind of batches from a folder as from TFDS.
Training is a list of small named ops (``train_ops``), each ``op(image, rng, size, options)``:

* a crop from ``CROPS`` (``train_augment``): ``'inception_crop'``, a random box of area
  ``crop_area_range`` and aspect ratio ``crop_aspect_ratio_range`` (``crop_min_object_covered``),
  sampled the way TensorFlow's ``sample_distorted_bounding_box`` samples it (``sample_crop``),
  resized to ``image_size`` with antialiased ``interpolation`` (bilinear or bicubic) filtering;
  ``'pad_crop'`` (reflect-pad ``crop_padding`` pixels, random crop); ``'none'`` (``resize``);
* ``flip_lr``: a horizontal flip with probability 1/2, unless ``random_flip=False``;
* ``auto_augment``: a policy of ``train/data/autoaugment.py``, when ``auto_augment`` names one;
* evaluation (and ``train.predict``): resize the shorter side to ``image_size /
  eval_crop_fraction`` and take the central crop, the TF path's arithmetic (``eval_image``); or,
  with ``eval_resize_size``, torchvision's ``Resize + CenterCrop`` (``train/data/eval_resize.py``).

``tests/test_image_folder.py`` holds the two paths to the same results: eval pixels within the
rounding of Pillow's 8-bit resize, and the same distribution of crop scale and aspect ratio.

Decoding (``open_image``): any mode becomes RGB (grayscale, CMYK, palette; RGBA drops its alpha,
as torchvision's loader does), and the EXIF orientation is applied, so a phone photo is trained
on upright, as a viewer shows it (TF's decoders and torchvision's loader ignore the tag). A
16-bit PNG keeps the high byte of each value, as TF's ``decode_png`` does; for 16-bit grayscale,
which Pillow opens as mode ``I;16``, its ``convert("RGB")`` (and torchvision's loader) would
instead clip every value above 255 to white.

JPEGs (RGB or grayscale, upright) are decoded by simplejpeg when it is installed, with the
settings of TF's ``decode_jpeg``/``decode_and_crop_jpeg``/``decode_image`` defaults, which the TF
path uses for training and evaluation: libjpeg-turbo's fast integer IDCT (``fastdct=True``; TF's
``dct_method=''``) and smooth chroma upsampling (``fastupsample=False``; TF's
``fancy_upscaling=True``). The decoded pixels are then TF's bit for bit
(``tests/test_image_folder.py`` checks). A training crop is cut from the whole decode, so it
equals TF's ``decode_and_crop_jpeg`` of the same box except in the box's two outermost columns
on each side when the chroma is subsampled: libjpeg's cropped decode upsamples the chroma there
as if the box's edges were the image's (a mean difference from TF's 224 crops of 0.19 levels,
against 1.0 with Pillow's decode; BENCHMARKS.md, section 3b).
For training, a JPEG's bytes without an APP1 segment (EXIF, XMP) go to simplejpeg without
Pillow opening the file at all (``jpeg_size``), which saves the Python of Pillow's header parsing.
Without simplejpeg, or for any other file (CMYK, an EXIF orientation, not a JPEG), Pillow
decodes, and a JPEG's pixels then come from libjpeg's accurate integer IDCT, which Pillow always
uses: they differ from TF's by up to about 6 levels. simplejpeg's decode also
takes less CPU time than Pillow's (BENCHMARKS.md, section 3b).

``config.jpeg_reduced_decode=True`` (off by default) lets a JPEG whose training crop is at least
twice the model's input size decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's
``draft``). It saves inverse DCTs and resize work on large photos, not the entropy decoding, so
the gain depends on the file (BENCHMARKS.md, section 3b). The crop's
pixels are then those of a smaller image, not of the full decode that the TF path resizes (a
mean difference from TF's crop of 1.1-2.3 levels at 224, against 1.0 with the full decode).
Evaluation always decodes in full.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from train.data import autoaugment, eval_resize

try:  # optional: a faster JPEG decoder that gives TF's pixels (module docstring)
    import simplejpeg
except ImportError:  # pragma: no cover - installed with the train extra
    simplejpeg = None

EXIF_ORIENTATION = 0x0112
# Orientations 5-8 turn the stored image by 90 degrees: its width is the upright height.
_TRANSPOSED = (5, 6, 7, 8)
# config.interpolation -> Pillow's filter (antialiased when it reduces).
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def open_image(file: Any) -> Image.Image:
    """The image in ``file`` (a path, binary file object or the file's bytes), not yet decoded."""
    return Image.open(io.BytesIO(file) if isinstance(file, bytes) else file)


def _opened(image: Image.Image | bytes) -> Image.Image:
    """``image`` itself, or the file's ``bytes`` opened by Pillow."""
    return open_image(image) if isinstance(image, bytes) else image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of ``image`` once its EXIF orientation is applied."""
    width, height = image.size
    if _orientation(image) in _TRANSPOSED:
        width, height = height, width
    return height, width


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: treat the image as upright
        return 1


def jpeg_pixels(image: Image.Image) -> np.ndarray | None:
    """``uint8 [H, W, 3]`` pixels of an opened, not yet decoded, upright RGB or grayscale JPEG,
    decoded by simplejpeg; None for anything else (then Pillow decodes it).

    The same pixels as TF's default JPEG decode (module docstring). A file that
    simplejpeg rejects, even for what libjpeg only warns about, also returns None, so that
    Pillow decides whether it can be read, as it does for every other file.
    """
    if (
        simplejpeg is None
        or image.format != "JPEG"
        or image.mode not in ("RGB", "L")
        or getattr(image, "fp", None) is None
        or _orientation(image) != 1
    ):
        return None
    image.fp.seek(0)
    data = image.fp.read()
    try:
        pixels = decode_jpeg(data)
    except ValueError:
        return None
    image.close()  # Pillow closes the file once it has decoded; nothing else will here
    return pixels


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG file's bytes that simplejpeg decodes, unopened by Pillow, to the
    pixels ``jpeg_pixels`` gives; None for anything else.

    That is a YCbCr, RGB or grayscale JPEG without an APP1 segment: APP1 holds EXIF and XMP,
    either of which may carry an orientation that Pillow applies. The markers before the scan
    are walked here; simplejpeg reads the frame header. Skipping Pillow's header parsing, which
    is Python, leaves less of each image's work holding the GIL (BENCHMARKS.md, section 3b).
    """
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte; no length
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker == 0xE1:
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    else:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and height * width > Image.MAX_IMAGE_PIXELS:
        return None  # Pillow's open warns, or refuses a decompression bomb, as for any file
    return (height, width) if colorspace in ("YCbCr", "RGB", "Gray") else None


def decode_jpeg(data: bytes) -> np.ndarray:
    """``uint8 [H, W, 3]`` pixels of JPEG ``data`` by simplejpeg, as TF's default decode gives
    them: the fast integer IDCT and smooth chroma upsampling (module docstring)."""
    return simplejpeg.decode_jpeg(data, "RGB", fastdct=True, fastupsample=False)


def to_rgb(image: Image.Image, *, fast_jpeg: bool = True) -> Image.Image:
    """Decoded, upright (EXIF orientation applied) RGB; ``fast_jpeg=False`` decodes a JPEG with
    Pillow (libjpeg's accurate IDCT: torchvision's loader's pixels) instead of simplejpeg."""
    pixels = jpeg_pixels(image) if fast_jpeg else None
    if pixels is not None:
        return Image.fromarray(pixels)
    with warnings.catch_warnings():
        # Pillow suggests RGBA for palette images with transparency; RGB is what we want.
        warnings.simplefilter("ignore", UserWarning)
        if _orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
            # A 16-bit grayscale PNG: its high byte, as TF's decode gives it. Pillow's convert
            # would clip every value above 255 to white.
            image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
        return image if image.mode == "RGB" else image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# The random crop box.


def sample_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 10,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of an Inception-style random crop.

    The sampling rule of TensorFlow's ``sample_distorted_bounding_box`` with the whole image as
    the object: per attempt, an aspect ratio uniform in its range, then a crop height uniform
    among the integers whose area lies in ``area_range``, the width rounded from it; kept when it
    covers ``min_object_covered`` of the image. After ``max_attempts`` misses, the whole image.
    (Not torchvision's RandomResizedCrop, which draws the area uniformly instead of the height.)
    """
    image_area = float(height * width)
    lo_area, hi_area = area_range[0] * image_area, area_range[1] * image_area
    for _ in range(max_attempts):
        aspect = float(np.float32(rng.uniform(*aspect_ratio_range)))
        crop_h = _round(math.sqrt(lo_area / aspect))
        max_h = _round(math.sqrt(hi_area / aspect))
        if _round(max_h * aspect) > width:
            # The tallest crop whose rounded width still fits.
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if _round(max_h * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        crop_h = min(crop_h, max_h)
        if crop_h < max_h:
            crop_h += int(rng.integers(0, max_h - crop_h + 1))
        crop_w = _round(crop_h * aspect)
        area = float(crop_w * crop_h)
        if area < lo_area:  # rounding put it just outside the range: one pixel taller
            crop_h += 1
            crop_w = _round(crop_h * aspect)
            area = float(crop_w * crop_h)
        if area > hi_area:
            crop_h -= 1
            crop_w = _round(crop_h * aspect)
            area = float(crop_w * crop_h)
        if (
            area < lo_area
            or area > hi_area
            or not 0 < crop_w <= width
            or not 0 < crop_h <= height
            or area / image_area < min_object_covered
        ):
            continue
        top = int(rng.integers(0, height - crop_h)) if crop_h < height else 0
        left = int(rng.integers(0, width - crop_w)) if crop_w < width else 0
        return top, left, crop_h, crop_w
    return 0, 0, height, width


def _round(x: float) -> int:
    """Round half to even, as C's ``lrintf``."""
    return int(round(x))


# ----------------------------------------------------------------------------------------------
# Training and evaluation preprocessing of one image.


def inception_crop(
    image: Image.Image | bytes, rng: np.random.Generator, size: int, config: Any
) -> Image.Image:
    """A random box (``sample_crop``) of the file's bytes or the opened image, cut and resized
    to ``size`` x ``size`` (antialiased ``config.interpolation``). A JPEG that ``jpeg_size``
    takes is decoded by simplejpeg without Pillow opening it: the same pixels as through
    Pillow's ``open``."""
    shape = None
    if isinstance(image, bytes) and not config.jpeg_reduced_decode:
        shape = jpeg_size(image)
    if shape is None:
        image = _opened(image)
        shape = upright_size(image)
    height, width = shape
    top, left, crop_h, crop_w = sample_crop(
        rng,
        height,
        width,
        tuple(config.crop_area_range),
        tuple(config.crop_aspect_ratio_range),
        float(config.crop_min_object_covered),
    )
    pixels = None
    if isinstance(image, bytes):
        try:
            pixels = decode_jpeg(image)
        except ValueError:  # then Pillow decides whether it can be read, as jpeg_pixels does
            image = open_image(image)
    if pixels is None:
        # Cut first, then resize: a resize with ``box=`` would blend in pixels beyond the
        # box's edges, which TF's slice-then-resize does not.
        reduced = config.jpeg_reduced_decode and _draft(image, min(crop_h, crop_w) / size)
        pixels = None if reduced else jpeg_pixels(image)
    if pixels is not None:
        crop = crop_box(pixels, top, left, crop_h, crop_w)
    else:
        image = to_rgb(image)
        # The box in the (possibly reduced) decoded image's pixels.
        sy, sx = image.height / height, image.width / width
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        crop = image.crop(tuple(round(v) for v in box))
    # torchvision's RandomResizedCrop resizes with --interpolation too.
    return crop.resize((size, size), FILTERS[config.interpolation], reducing_gap=None)


def pad_crop(image: Image.Image | bytes, rng: np.random.Generator, size: int, config: Any) -> np.ndarray:
    """Resized to ``size`` (if it is not), reflect-padded by ``crop_padding`` pixels, and cropped
    back to ``size`` x ``size`` at random (CIFAR)."""
    image = to_rgb(_opened(image))
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pad = int(config.crop_padding)
    padded = np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, 2))
    return padded[dy : dy + size, dx : dx + size]


def resize(image: Image.Image | bytes, rng: np.random.Generator, size: int, config: Any) -> np.ndarray:
    """No crop: the whole image resized to ``size`` x ``size`` (``train_augment='none'``)."""
    image = to_rgb(_opened(image))
    return np.asarray(image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR))


def flip_lr(
    image: Image.Image | np.ndarray, rng: np.random.Generator, size: int, config: Any
) -> Image.Image | np.ndarray:
    """A horizontal flip with probability 1/2."""
    if rng.random() >= 0.5:
        return image
    if isinstance(image, Image.Image):
        # Pillow flips the small output, then one copy to NumPy follows.
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image[:, ::-1]


# config.train_augment -> the op that starts the training preprocessing.
CROPS = {"inception_crop": inception_crop, "pad_crop": pad_crop, "none": resize}


def train_ops(config: Any) -> list:
    """The training ops for ``config`` (``AugmentOptions`` or the run's config), in order; each is
    ``op(image, rng, size, config)``, and takes the one before's output (an opened image, the
    file's bytes for the first, or ``uint8 [H, W, 3]`` pixels)."""
    crop = CROPS.get(config.train_augment)
    if crop is None:
        raise ValueError(
            f"train_augment must be 'inception_crop', 'pad_crop' or 'none'; got {config.train_augment!r}."
        )
    ops = [crop, flip_lr] if config.random_flip else [crop]
    # The policy after the flip, as torchvision's reference presets order it.
    return [*ops, autoaugment.auto_augment] if config.auto_augment else ops


def train_image(image: Image.Image | bytes, rng: np.random.Generator, size: int, config: Any) -> np.ndarray:
    """Training preprocessing of one image file's bytes (or the opened image) -> ``uint8 [size,
    size, 3]``: ``train_ops(config)`` in turn, drawing from ``rng`` in that order."""
    for op in train_ops(config):
        image = op(image, rng, size, config)
    return np.ascontiguousarray(image, np.uint8)


def crop_box(pixels: np.ndarray, top: int, left: int, height: int, width: int) -> Image.Image:
    """The box of decoded ``uint8 [H, W, 3]`` pixels as a Pillow image, read in place (one copy,
    where ``Image.fromarray`` of the strided slice makes two)."""
    pixels = np.ascontiguousarray(pixels)
    row = pixels.shape[1] * 3
    flat = pixels.reshape(-1)[top * row + left * 3 :]
    return Image.frombuffer("RGB", (width, height), flat, "raw", "RGB", row, 1)


def _draft(image: Image.Image, reduction: float) -> bool:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the crop is that much larger than needed
    (``config.jpeg_reduced_decode``); whether it will."""
    if image.format == "JPEG" and reduction >= 2:
        return (
            image.draft("RGB", (math.ceil(image.width / reduction), math.ceil(image.height / reduction)))
            is not None
        )
    return False


def eval_image(
    image: Image.Image | bytes,
    size: int,
    crop_fraction: float = 0.875,
    *,
    resize_size: int = 0,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Evaluation preprocessing -> ``uint8 [size, size, 3]``: resize the shorter side to
    ``size / crop_fraction`` and take the central crop; ``crop_fraction >= 1`` resizes straight
    to ``size``. The TF path's arithmetic (float32 scale, round half to even).

    ``resize_size > 0``: torchvision's eval instead, bit for bit: Pillow's decode (its
    ``ImageFolder`` loader), then ``Resize(resize_size, antialias=True) + CenterCrop(size)`` on
    the ``uint8`` pixels (``eval_resize.resize_crop``)."""
    if resize_size:
        pixels = np.asarray(to_rgb(_opened(image), fast_jpeg=False))
        return eval_resize.resize_crop(pixels, resize_size, size, interpolation)
    image = to_rgb(_opened(image))
    new_h, new_w, top, left = _eval_geometry(image.height, image.width, size, crop_fraction)
    pixels = _resize(image, new_h, new_w, interpolation)
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def eval_array(
    pixels: np.ndarray,
    size: int,
    crop_fraction: float = 0.875,
    *,
    resize_size: int = 0,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """``eval_image`` of a raw pixel array ``[H, W, C]`` (values 0..255, whole or not) ->
    ``float32 [size, size, C]``, not rounded: each channel is resized as a 32-bit float image
    (Pillow's mode ``F``), as the TF path resizes an array (``train.predict``'s ``.npy`` inputs);
    with ``resize_size``, by ``eval_resize.resize_crop``'s float resize."""
    if resize_size:
        return eval_resize.resize_crop(np.asarray(pixels, np.float32), resize_size, size, interpolation)
    pixels = np.asarray(pixels, np.float32)
    height, width, channels = pixels.shape
    new_h, new_w, top, left = _eval_geometry(height, width, size, crop_fraction)
    out = np.empty((size, size, channels), np.float32)
    for c in range(channels):
        plane = Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="F")
        if (new_w, new_h) != (width, height):
            plane = plane.resize((new_w, new_h), FILTERS[interpolation], reducing_gap=None)
        out[..., c] = np.asarray(plane)[top : top + size, left : left + size]
    return out


def _eval_geometry(height: int, width: int, size: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """``(resized height, resized width, top, left)`` of the eval resize and central crop."""
    if crop_fraction >= 1.0:
        return size, size, 0, 0
    shape = np.array([height, width], np.float32)
    scale = np.float32(size / crop_fraction) / shape.min()
    new_h, new_w = (int(v) for v in np.round(shape * scale))
    return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


def _resize(image: Image.Image, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    if image.size != (width, height):
        image = image.resize((width, height), FILTERS[interpolation], reducing_gap=None)
    return np.asarray(image, np.uint8)
