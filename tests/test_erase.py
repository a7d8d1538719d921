"""Random erasing (train/data/erase.py) against timm's own ``RandomErasing``, given the same draws."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_worker import tiny_config  # noqa: E402

from resnet_jax.torch_reference import import_reference  # noqa: E402
from train.data import erase, registry  # noqa: E402

timm = import_reference("timm")
torch = pytest.importorskip("torch")
from timm.data import random_erasing as timm_erasing  # noqa: E402

_GET_PIXELS = timm_erasing._get_pixels  # timm's fill, for 'const'


class _Recorder:
    """A NumPy generator that records what each of its draws returned, in order."""

    def __init__(self, seed):
        self.rng, self.log = np.random.default_rng(seed), []

    def _draw(self, kind, value):
        self.log.append((kind, value))
        return value

    def random(self):
        return self._draw("random", self.rng.random())

    def uniform(self, lo, hi):
        return self._draw("uniform", self.rng.uniform(lo, hi))

    def integers(self, lo, hi):
        return self._draw("integers", self.rng.integers(lo, hi))

    def standard_normal(self, shape, dtype):
        return self._draw("normal", self.rng.standard_normal(shape, dtype=dtype))


class _Replay:
    """timm's ``random`` module, answering with the recorded draws (randint is inclusive)."""

    def __init__(self, log):
        self.log = list(log)

    def _next(self, kind):
        got, value = self.log.pop(0)
        assert got == kind, (got, kind)
        return value

    def random(self):
        return self._next("random")

    def uniform(self, lo, hi):
        return self._next("uniform")

    def randint(self, lo, hi):
        value = self._next("integers")
        assert lo <= value <= hi
        return int(value)


@pytest.mark.parametrize("mode", erase.ERASE_MODES)
def test_random_erase_equals_timms_given_the_same_draws(monkeypatch, mode):
    height, width, channels = 12, 20, 3
    erased = 0
    for seed in range(12):
        image = np.random.default_rng(100 + seed).normal(size=(height, width, channels)).astype(np.float32)
        rec = _Recorder(seed)
        got = erase.random_erase(image.copy(), rec, 0.7, mode)

        replay = _Replay(rec.log)
        monkeypatch.setattr(timm_erasing, "random", replay)

        def pixels(per_pixel, rand_color, patch_size, dtype, device, replay=replay):
            if not per_pixel:
                return _GET_PIXELS(per_pixel, rand_color, patch_size, dtype=dtype, device=device)
            normal = replay._next("normal")
            assert tuple(patch_size) == (normal.shape[2], *normal.shape[:2])
            return torch.from_numpy(normal.transpose(2, 0, 1).copy())

        monkeypatch.setattr(timm_erasing, "_get_pixels", pixels)
        ref = timm_erasing.RandomErasing(probability=0.7, mode=mode, device="cpu")
        want = ref(torch.from_numpy(image.transpose(2, 0, 1).copy())).numpy().transpose(1, 2, 0)
        assert not replay.log  # timm made exactly our draws
        np.testing.assert_array_equal(got, want)
        erased += not np.array_equal(got, image)
    assert 3 <= erased < 12  # some images erased, some not


def test_erase_box_area_and_aspect_follow_their_ranges():
    """Over many draws the erased area's share and log aspect span their ranges as sampled."""
    rng = np.random.default_rng(0)
    boxes = [erase.erase_box(rng, 224, 224) for _ in range(3000)]
    boxes = np.array([b for b in boxes if b is not None], np.float64)
    top, left, h, w = boxes.T
    share, log_aspect = h * w / 224**2, np.log(h / w)
    assert (top + h <= 224).all() and (left + w <= 224).all() and (h < 224).all() and (w < 224).all()
    assert 0.015 < share.min() and share.max() < 0.35
    assert abs(np.mean(share) - (0.02 + 1 / 3) / 2) < 0.01  # uniform area share
    assert abs(np.mean(log_aspect)) < 0.05 and np.max(np.abs(log_aspect)) < math.log(1 / 0.3) + 0.1


def test_image_folder_batches_are_normalised_with_one_box_erased_and_resume_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (10, 10, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    fields = dict(dataset="image_folder", data_dir=str(tmp_path), grain_worker_count=0, image_size=10)
    fields.update(
        train_augment="none", normalize_mean=(100.0, 110.0, 120.0), normalize_std=(50.0, 60.0, 70.0)
    )
    plain = registry.create_dataset(tiny_config(**fields))
    config = tiny_config(**fields, random_erase_prob=1.0)
    erased = registry.create_dataset(config)
    want = next(plain.train_iterator(4, start_step=1))
    got = next(erased.train_iterator(4, start_step=1))
    assert want["image"].dtype == np.uint8 and got["image"].dtype == np.float32
    np.testing.assert_array_equal(got["label"], want["label"])
    normalised = (want["image"].astype(np.float32) - np.float32(fields["normalize_mean"])) / np.float32(
        fields["normalize_std"]
    )
    for image, ref in zip(got["image"], normalised):
        changed = np.any(image != ref, axis=-1)
        rows, cols = np.nonzero(changed)
        assert rows.size  # 'const' zeros over one box, the rest the step's normalisation
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert changed[box].all() and changed.sum() == changed[box].size
        assert (image[box] == 0).all()
    # The draws are keyed on (seed, epoch, example): the stream from step 0 holds the same batch.
    stream = erased.train_iterator(4)
    next(stream)
    np.testing.assert_array_equal(next(stream)["image"], got["image"])


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(random_erase_prob=0.25), "implemented for dataset='image_folder' and TFDS sets"),
        (dict(random_erase_prob=1.5), "random_erase_prob must be in [0, 1]"),
        (dict(random_erase_prob=0.25, random_erase_mode="rand"), "random_erase_mode='rand' is not valid"),
        (dict(random_erase_scale=(0.5, 0.1)), "random_erase_scale must be (low, high)"),
    ],
)
def test_bad_erasing_fields_are_one_line_naming_the_field(fields, message):
    from train.config import ConfigError, default_config, validate_config

    config = default_config()
    config.update(fields)
    escaped = "".join("\\" + ch if ch in "[]()" else ch for ch in message)
    with pytest.raises(ConfigError, match=escaped):
        validate_config(config)
