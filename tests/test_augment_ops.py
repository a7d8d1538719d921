"""``train.augment.apply_op`` against torchvision's own ops (``transforms.v2``, the ``_apply_op``
of its auto-augment policies on uint8 tensors): every op, every magnitude bin of
TrivialAugmentWide, RandAugment and AutoAugment, both signs, each on one of four random images
(sides 7 to 31, odd and even, square and not, one of few grey levels); pixel for pixel (max abs
diff 0); the geometric ops' bilinear sampling within one grey level on rare pixels."""

import numpy as np
import pytest

from resnet_jax.torch_reference import import_reference
from train.augment import OPS, apply_op, linspace

import_reference("torchvision")
torch = pytest.importorskip("torch")
from torchvision.transforms import v2  # noqa: E402

torch.set_num_threads(1)  # tiny images: threads only add overhead on a busy machine
REF = v2.TrivialAugmentWide()
# Odd and even sides, square and not (a square takes torchvision's quarter-turn path).
SIZES = [(7, 9), (16, 16), (24, 31)]


def _images(rng):
    for h, w in SIZES:
        yield rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # Few levels (ties in the histogram ops) and a flat channel (autocontrast's special case).
    coarse = (rng.integers(0, 5, (12, 10, 3)) * 60).astype(np.uint8)
    coarse[..., 1] = 77
    yield coarse


def _reference(image, name, magnitude):
    t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    out = REF._apply_image_or_video_transform(
        t, name, magnitude, interpolation=REF.interpolation, fill=REF._fill
    )
    return out.permute(1, 2, 0).numpy()


def _magnitudes(name, h, w):
    """Every signed magnitude any of torchvision's three policies can give ``name``."""
    values = {0.0}
    for cls, bins in ((v2.TrivialAugmentWide, 31), (v2.RandAugment, 31), (v2.AutoAugment, 10)):
        space = cls._AUGMENTATION_SPACE
        if name in space:
            mags, signed = space[name][0](bins, h, w), space[name][1]
            if mags is not None:
                values |= {float(m) for m in mags} | ({-float(m) for m in mags} if signed else set())
    return sorted(values)


@pytest.mark.parametrize("name", OPS)
def test_op_equals_torchvision_on_every_magnitude(name):
    rng = np.random.default_rng(OPS.index(name))
    images = list(_images(rng))
    for k, image in enumerate(images):
        # Each magnitude on one of the images in turn (all of them on every image is 4x slower).
        for magnitude in _magnitudes(name, *image.shape[:2])[k :: len(images)]:
            ours = apply_op(image, name, magnitude)
            ref = _reference(image, name, magnitude)
            assert ours.dtype == np.uint8 and ours.shape == image.shape
            diff = np.abs(ours.astype(int) - ref.astype(int)).max()
            assert diff == 0, (name, image.shape, magnitude, diff)


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def test_bilinear_geometric_ops_equal_torchvisions_within_one_level_on_rare_pixels():
    """``interpolation='bilinear'`` (torchvision's reference script's choice) against the
    policies' op with ``InterpolationMode.BILINEAR``: every magnitude of the geometric ops, each on
    one of the four images. Bound: max abs diff 1 (torch's vectorised float32 kernel may round a weighted sum
    near a half the other way) on at most 0.1% of the pixel values."""
    ref = v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)
    rng = np.random.default_rng(5)
    worst, differing, total, unlike_nearest = 0, 0, 0, 0
    images = list(_images(rng))
    for k, image in enumerate(images):
        t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        for name in GEOMETRIC:
            for magnitude in _magnitudes(name, *image.shape[:2])[k :: len(images)]:
                ours = apply_op(image, name, magnitude, interpolation="bilinear")
                want = ref._apply_image_or_video_transform(
                    t, name, magnitude, interpolation=ref.interpolation, fill=ref._fill
                )
                diff = np.abs(ours.astype(int) - want.permute(1, 2, 0).numpy().astype(int))
                worst, differing, total = (
                    max(worst, diff.max()),
                    differing + (diff > 0).sum(),
                    total + diff.size,
                )
                unlike_nearest += (ours != apply_op(image, name, magnitude)).sum()
    assert worst <= 1 and differing <= 1e-3 * total, (worst, differing / total)
    assert unlike_nearest > 0.3 * total  # bilinear really is not the nearest sampling


def test_linspace_is_torch_linspace_bit_for_bit():
    for steps in (1, 2, 10, 31, 100):
        for start, end in ((0, 0.99), (0, 32), (0, 135), (1, 0), (0, 0.3), (0, 150 / 331 * 224), (-3.5, 3.5)):
            np.testing.assert_array_equal(
                linspace(start, end, steps), torch.linspace(start, end, steps).numpy()
            )


def test_apply_op_rejects_bad_input():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown op 'Blur'"):
        apply_op(image, "Blur", 1.0)
    with pytest.raises(ValueError, match="convention"):
        apply_op(image, "Rotate", 1.0, convention="keras")
    with pytest.raises(ValueError, match="uint8"):
        apply_op(image.astype(np.float32), "Rotate", 1.0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        apply_op(image, "Rotate", 1.0, interpolation="bicubic")


# ----------------------------------------------------------------------------------------------
# convention='timm': timm's own op functions (timm/data/auto_augment.py, Pillow).

from train.augment_timm import SIGNED, TIMM_OPS  # noqa: E402

timm = import_reference("timm")
from PIL import Image  # noqa: E402
from timm.data import auto_augment as timm_aa  # noqa: E402

PIL_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@pytest.mark.parametrize("name", TIMM_OPS)
def test_timm_op_equals_timms_at_every_level(name, monkeypatch):
    rng = np.random.default_rng(100 + TIMM_OPS.index(name))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    fill = (124, 116, 104)
    cases = [(level, negative) for level in (0, 1, 3.7, 5, 7, 9, 10, 13) for negative in (False, True)]
    for k, (level, negative) in enumerate(cases):
        if negative and name not in SIGNED:
            continue
        interpolation = ("bilinear", "bicubic")[(k // 2) % 2]  # each level with one of the two
        image = images[k % len(images)]
        if (name, level < 2.5) == ("Posterize", True) or (name, level >= 10) == ("PosterizeIncreasing", True):
            # Zero bits kept, which Pillow 13 refuses (timm's call raises): black, as older Pillow.
            assert not apply_op(image, name, level, "timm").any()
            continue
        hparams = dict(img_mean=fill, interpolation=PIL_RESAMPLE[interpolation])
        op = timm_aa.AugmentOp(name, prob=1.0, magnitude=level, hparams=dict(hparams, magnitude_max=20))
        # timm negates a signed op's argument when random.random() > 0.5.
        monkeypatch.setattr(timm_aa.random, "random", lambda draw=0.9 if negative else 0.1: draw)
        want = np.asarray(op(Image.fromarray(image)))
        monkeypatch.undo()
        got = apply_op(
            image, name, -level if negative else level, "timm", fill=fill, interpolation=interpolation
        )
        np.testing.assert_array_equal(got, want, err_msg=f"{name} level {level} negative {negative}")
