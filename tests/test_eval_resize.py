"""Evaluation at its own size (``train/data/eval_resize.py``) against torchvision's v2 transforms.

torchvision's reference pipeline is its ``ImageFolder`` loader (Pillow, ``convert('RGB')``),
``PILToTensor``, then ``Resize(eval_resize_size, interpolation, antialias=True)`` and
``CenterCrop(eval_image_size)`` on the ``uint8`` tensor. The stated bound (the module's
docstring): 0 levels, 0 pixels differing, on x86 CPUs with AVX2 or AVX-512, where PyTorch runs
the ``uint8`` kernels that ``eval_resize`` reproduces; elsewhere torchvision takes other kernels
(bilinear in float32, rounded once), which move its own output by up to 1 level, so the bound
there is 1 level on at most a quarter of the values.
"""

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_worker import tiny_config  # noqa: E402

from resnet_jax.torch_reference import import_reference  # noqa: E402
from train.config import ConfigError, validate_config  # noqa: E402
from train.data import core, eval_resize, image_ops, tf_ops  # noqa: E402
from train.data.eval_resize import EvalOptions  # noqa: E402

torchvision = import_reference("torchvision")
torch = pytest.importorskip("torch")
from torchvision.transforms import v2  # noqa: E402

# (height, width) of the test photos: landscape, portrait, square, nearly the resize size (an
# upscale of one side), and smaller than it (both sides upscaled).
SHAPES = ((50, 90), (90, 57), (73, 73), (41, 60), (30, 36))


def _photo(height: int, width: int, seed: int) -> bytes:
    """A JPEG of smooth colour with grain, as a photo has: both edges and flat areas."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 6 + 2, width // 6 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    grain = rng.integers(-12, 13, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _torchvision(data: bytes, resize: int, crop: int, interpolation: str) -> np.ndarray:
    mode = getattr(v2.InterpolationMode, interpolation.upper())
    pipeline = v2.Compose(
        [v2.PILToTensor(), v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(crop)]
    )
    return pipeline(Image.open(io.BytesIO(data)).convert("RGB")).permute(1, 2, 0).numpy()


def _bound() -> tuple[int, float]:
    """(max abs difference in levels, fraction of values differing) the docstring states."""
    return (0, 0.0) if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else (1, 0.25)


def _assert_within(got: np.ndarray, want: np.ndarray, interpolation: str) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    levels, fraction = _bound()
    assert diff.max() <= levels and (diff > 0).mean() <= fraction, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("interpolation", eval_resize.INTERPOLATIONS)
def test_eval_images_are_torchvisions_resize_and_center_crop(interpolation):
    """Resize 40, crop 32 of JPEGs of several sizes and aspect ratios, through both pipelines:
    the image-folder path (``image_ops.eval_image`` of the file's bytes) and the TFDS path
    (``tf_ops.preprocess_eval_image`` of the encoded file, and of decoded ``uint8`` pixels)."""
    for i, (h, w) in enumerate(SHAPES):
        data = _photo(h, w, i)
        want = _torchvision(data, 40, 32, interpolation)
        got = image_ops.eval_image(data, 32, resize_size=40, interpolation=interpolation)
        _assert_within(got, want, interpolation)
        info = core.DatasetInfo("t", 2, (16, 16, 3), 0, 0, (), core.IMAGENET_MEAN, core.IMAGENET_STD)
        options = dict(size=32, resize_size=40, interpolation=interpolation)
        from_file = tf_ops.preprocess_eval_image(tf_ops.get_tf().constant(data), info, **options).numpy()
        np.testing.assert_array_equal(from_file, got)  # one implementation for both pipelines
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(tf_ops.preprocess_eval_image(pixels, info, **options).numpy(), got)


def test_the_v2_recipes_232_224_on_a_photo_sized_jpeg():
    data = _photo(375, 500, 7)
    for interpolation in eval_resize.INTERPOLATIONS:
        got = image_ops.eval_image(data, 224, resize_size=232, interpolation=interpolation)
        _assert_within(got, _torchvision(data, 232, 224, interpolation), interpolation)


def test_float_arrays_are_resized_as_torchvision_resizes_a_float_tensor():
    """``train.predict``'s ``.npy`` inputs: the same filter, unquantised and not rounded
    (torchvision computes in float32: 1e-3 of a level covers its rounding)."""
    pixels = np.random.default_rng(0).uniform(0, 255, (45, 70, 3)).astype(np.float32)
    for interpolation in eval_resize.INTERPOLATIONS:
        mode = getattr(v2.InterpolationMode, interpolation.upper())
        ref = v2.Compose([v2.Resize(40, interpolation=mode, antialias=True), v2.CenterCrop(32)])
        want = ref(torch.from_numpy(pixels).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        got = image_ops.eval_array(pixels, 32, resize_size=40, interpolation=interpolation)
        assert got.dtype == np.float32 and got.shape == (32, 32, 3)
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_resized_shape_and_crop_anchor_are_torchvisions():
    for h, w in ((50, 90), (90, 57), (333, 500), (101, 100), (7, 1000)):
        image = torch.zeros(1, h, w)
        want = tuple(v2.Resize(40, antialias=True)(image).shape[1:])
        assert eval_resize.shorter_side_shape(h, w, 40) == want
    grid = np.arange(7 * 10).reshape(7, 10, 1)
    want = v2.CenterCrop(4)(torch.from_numpy(grid).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(eval_resize.center_crop(grid, 4), want)  # odd margins: round half even


def test_interpolation_is_the_training_crops_resize_too():
    """torchvision's RandomResizedCrop resizes with --interpolation: the crop's pixels are
    Pillow's resize of the box with that filter."""
    data = _photo(60, 80, 3)
    config = tiny_config(train_augment="inception_crop", random_flip=False)
    rng_seed = [5, 1]
    got = {}
    for interpolation in eval_resize.INTERPOLATIONS:
        config.interpolation = interpolation
        got[interpolation] = image_ops.train_image(data, np.random.default_rng(rng_seed), 24, config)
        top, left, h, w = image_ops.sample_crop(
            np.random.default_rng(rng_seed),
            60,
            80,
            tuple(config.crop_area_range),
            tuple(config.crop_aspect_ratio_range),
            0.1,
        )
        box = Image.fromarray(image_ops.decode_jpeg(data)[top : top + h, left : left + w])
        want = box.resize((24, 24), image_ops.FILTERS[interpolation], reducing_gap=None)
        np.testing.assert_array_equal(got[interpolation], np.asarray(want))
    assert not np.array_equal(got["bilinear"], got["bicubic"])


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"eval_image_size": -1}, "config.eval_image_size must be >= 0"),
        ({"eval_resize_size": -3}, "config.eval_resize_size must be >= 0"),
        (
            {"interpolation": "lanczos"},
            "config.interpolation='lanczos' is not valid; choose one of: bilinear, bicubic",
        ),
        (
            {"eval_image_size": 40, "eval_resize_size": 32},
            "config.eval_image_size (40) must be <= config.eval_resize_size (32)",
        ),
        (
            {"image_size": 40, "eval_resize_size": 32},
            "config.eval_image_size (40) must be <= config.eval_resize_size (32)",
        ),
        ({"eval_image_size": 12}, "config.eval_image_size=12 is not available for sklearn_digits"),
    ],
)
def test_bad_eval_sizes_are_one_line_naming_the_field(fields, words):
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_config(**fields))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_defaults_keep_the_training_size_and_crop_fraction():
    options = EvalOptions.from_config(tiny_config(dataset="synthetic", image_size=24), 24)
    assert options == EvalOptions(size=24, crop_fraction=1.0, resize_size=0, interpolation="bilinear")
    validate_config(tiny_config(dataset="synthetic", image_size=16, eval_image_size=24, eval_resize_size=28))
