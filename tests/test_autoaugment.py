"""The ``auto_augment`` policies (train/data/autoaugment.py) against torchvision's own
TrivialAugmentWide, RandAugment and AutoAugment (``transforms.v2``): their augmentation spaces
(ops, order, signs, magnitude bins) and sub-policies are torchvision's, and given the same draws
(ours replayed into torchvision's ``torch.randint``/``torch.rand``) torchvision's policy gives the
same image pixel for pixel."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_worker import tiny_config  # noqa: E402

from resnet_jax.torch_reference import import_reference  # noqa: E402
from train.config import ConfigError, default_config, validate_config  # noqa: E402
from train.data import autoaugment, registry  # noqa: E402

import_reference("torchvision")
torch = pytest.importorskip("torch")
from torchvision.transforms import v2  # noqa: E402

torch.set_num_threads(1)

REFERENCES = {
    "ta_wide": lambda: v2.TrivialAugmentWide(),
    "ra": lambda: v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31),
    "aa": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
}
BINS = {"ta_wide": 31, "ra": 31, "aa": 10}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class _Recorder:
    """A NumPy generator that logs each draw torchvision's policies make from torch."""

    def __init__(self, seed):
        self.rng, self.log = np.random.default_rng(seed), []

    def integers(self, n):
        value = int(self.rng.integers(n))
        self.log.append(("randint", n, value))
        return value

    def random(self):
        value = float(self.rng.random())
        self.log.append(("rand", None, value))
        return value


def _replay(monkeypatch, log):
    """torch.randint/torch.rand answer with the logged draws, in order (float64, as compared)."""
    log = list(log)

    def randint(n, size):
        kind, bound, value = log.pop(0)
        assert (kind, bound) == ("randint", n)
        return torch.tensor(value)

    def rand(size):
        kind, _, value = log.pop(0)
        assert kind == "rand"
        return torch.tensor(value, dtype=torch.float64)

    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch, "rand", rand)
    return log


@pytest.mark.parametrize("name", autoaugment.AUTO_AUGMENTS)
def test_augmentation_space_is_torchvisions(name):
    ref = REFERENCES[name]()._AUGMENTATION_SPACE
    for h, w in ((24, 31), (224, 224)):
        ours = autoaugment.augmentation_space(name, BINS[name], h, w)
        assert list(ours) == list(ref)
        for op, (bins, signed) in ours.items():
            ref_bins = ref[op][0](BINS[name], h, w)
            assert signed == ref[op][1], op
            if ref_bins is None:
                assert bins is None, op
            else:
                # The (op, magnitude) pairs a draw can give are the reference's, bit for bit.
                np.testing.assert_array_equal(bins, ref_bins.numpy(), err_msg=op)


def test_imagenet_policy_is_torchvisions():
    ref = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)._policies
    assert [tuple(map(tuple, p)) for p in ref] == [tuple(map(tuple, p)) for p in autoaugment.IMAGENET_POLICY]


@pytest.mark.parametrize("name", autoaugment.AUTO_AUGMENTS)
def test_policy_equals_torchvision_given_the_same_draws(name, monkeypatch):
    policy = autoaugment.make_policy(name)
    ref = REFERENCES[name]()
    seen = set()
    for seed in range(40):
        h, w = (20, 27) if seed % 2 else (16, 16)
        image = np.random.default_rng([seed, 1]).integers(0, 256, (h, w, 3), dtype=np.uint8)
        rng = _Recorder(seed)
        ops = policy.draw(rng, h, w)
        ours = policy(image, _Replayed(rng.log))
        seen |= {op for op, _ in ops}
        left = _replay(monkeypatch, rng.log)
        want = ref(torch.from_numpy(image).permute(2, 0, 1).contiguous()).permute(1, 2, 0).numpy()
        monkeypatch.undo()
        assert not left, "torchvision drew less than we did"
        np.testing.assert_array_equal(ours, want, err_msg=f"{name} seed {seed}: {ops}")
    assert len(seen) >= 8  # the images went through many different ops


def test_config_interpolation_bilinear_equals_torchvisions_bilinear_policies(monkeypatch):
    """``config.interpolation='bilinear'`` (torchvision's reference script passes its
    ``--interpolation`` to the policies): the policy equals torchvision's built with
    ``InterpolationMode.BILINEAR`` given the same draws, within the geometric op's bound
    (``tests/test_augment_ops.py``: one level on at most 0.1% of the values). A colour op after
    it (Equalize, Posterize, Solarize, ...) may turn that one level into more, so the max bound
    holds where none follows; the share of differing values holds everywhere."""
    config = default_config()
    config.interpolation = "bilinear"
    worst, differing, total = 0, 0, 0
    for name in autoaugment.AUTO_AUGMENTS:
        config.auto_augment = name
        policy = autoaugment.Policy.from_config(config)
        assert policy.interpolation == "bilinear"
        ref = REFERENCES[name]()
        ref.interpolation = v2.InterpolationMode.BILINEAR
        for seed in range(12):
            image = np.random.default_rng([seed, 2]).integers(0, 256, (20, 27, 3), dtype=np.uint8)
            rng = _Recorder(seed)
            ops = [op for op, _ in policy.draw(rng, 20, 27)]
            ours = policy(image, _Replayed(rng.log))
            _replay(monkeypatch, rng.log)
            want = ref(torch.from_numpy(image).permute(2, 0, 1).contiguous()).permute(1, 2, 0).numpy()
            monkeypatch.undo()
            diff = np.abs(ours.astype(int) - want.astype(int))
            geometric = [op in GEOMETRIC for op in ops]
            if not any(g and not all(geometric[i:]) for i, g in enumerate(geometric)):
                worst = max(worst, diff.max())
            differing, total = differing + (diff > 0).sum(), total + diff.size
    assert worst <= 1 and differing <= 1e-3 * total, (worst, differing / total)


class _TimmRecorder:
    """A NumPy generator that logs what timm's RandAugment draws from ``np.random``/``random``."""

    def __init__(self, seed):
        self.rng, self.log = np.random.default_rng(seed), []

    def _log(self, kind, value):
        self.log.append((kind, value))
        return value

    def integers(self, n):
        return self._log(("integers", n), int(self.rng.integers(n)))

    def random(self):
        return self._log("random", float(self.rng.random()))

    def normal(self, mu, sigma):
        return self._log(("gauss", mu, sigma), float(self.rng.normal(mu, sigma)))

    def uniform(self, lo, hi):
        return self._log(("uniform", lo, hi), float(self.rng.uniform(lo, hi)))


class _TimmReplay:
    """timm's ``random`` module and ``np.random.choice``, answering with the logged draws."""

    def __init__(self, log, num_layers):
        self.log, self.num_layers = list(log), num_layers

    def _next(self, kind):
        got, value = self.log.pop(0)
        assert got == kind, (got, kind)
        return value

    def choice(self, seq, size=None, replace=True, p=None):
        if size is None:  # random.choice(_RANDOM_INTERPOLATION)
            return seq[self._next(("integers", len(seq)))]
        assert size == self.num_layers and replace and p is None
        return [seq[self._next(("integers", len(seq)))] for _ in range(size)]

    def random(self):
        return self._next("random")

    def gauss(self, mu, sigma):
        return self._next(("gauss", mu, sigma))

    def uniform(self, lo, hi):
        return self._next(("uniform", lo, hi))


@pytest.mark.parametrize(
    "spec", ["rand-m9-mstd0.5-inc1", "rand-m7-mstd0.5", "rand-n3-m12-mmax15-p0.8-mstd101"]
)
def test_timm_rand_equals_timms_given_the_same_draws(spec, monkeypatch):
    from timm.data import auto_augment as timm_aa

    fill = (124, 116, 104)
    policy = autoaugment.make_policy(spec)
    ref = timm_aa.rand_augment_transform(spec, dict(translate_const=100, img_mean=fill))
    assert [op.name for op in ref.ops] == list(policy.ops) and ref.num_layers == policy.num_layers
    for op in ref.ops:
        assert (op.prob, op.magnitude) == (policy.prob, policy.magnitude)
        assert (op.magnitude_std, op.magnitude_max or 0) == (policy.magnitude_std, policy.magnitude_max)
    seen = set()
    for seed in range(40):
        image = np.random.default_rng([seed, 2]).integers(0, 256, (18, 23, 3), dtype=np.uint8)
        rng = _TimmRecorder(seed)
        ops = policy.draw(rng)
        seen |= {op for op, _, _ in ops}
        if any(op.startswith("Posterize") and op_bits_zero(op, level) for op, level, _ in ops):
            continue  # Pillow 13 refuses to keep 0 bits (timm raises; train/augment_timm.py)
        ours = policy(image, _Replayed(rng.log))
        replay = _TimmReplay(rng.log, policy.num_layers)
        monkeypatch.setattr(timm_aa, "random", replay)
        monkeypatch.setattr(timm_aa.np.random, "choice", replay.choice)
        want = np.asarray(ref(Image.fromarray(image)))
        monkeypatch.undo()
        assert not replay.log, "timm drew less than we did"
        np.testing.assert_array_equal(ours, want, err_msg=f"{spec} seed {seed}: {ops}")
    assert len(seen) >= 8


def op_bits_zero(name, level):
    frac = abs(level) / 10.0
    return (4 - int(frac * 4) if name == "PosterizeIncreasing" else int(frac * 4)) <= 0


@pytest.mark.parametrize("spec", ["rand-m9-tweights", "rand-q3", "rand-m1.5", "randx-m9"])
def test_bad_timm_strings_are_one_line(spec):
    with pytest.raises(ValueError, match="timm's rand- sections are"):
        autoaugment.make_policy(spec)


class _Replayed:
    """The recorded draws again, as a generator (so ``policy(image, rng)`` draws the same ops)."""

    def __init__(self, log):
        self.log = list(log)

    def integers(self, n):
        return self.log.pop(0)[-1]

    def random(self):
        return self.log.pop(0)[-1]

    def normal(self, mu, sigma):
        return self.log.pop(0)[-1]

    def uniform(self, lo, hi):
        return self.log.pop(0)[-1]


@pytest.mark.parametrize("name", ["ta_wide", "rand-m9-mstd0.5-inc1"])
def test_image_folder_applies_the_policy_keyed_on_seed_epoch_and_position(tmp_path, name):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    fields = dict(dataset="image_folder", data_dir=str(tmp_path), grain_worker_count=0, image_size=12)
    fields.update(train_augment="none", random_flip=False, seed=3)
    plain = next(registry.create_dataset(tiny_config(**fields)).train_iterator(4, start_step=1))
    config = tiny_config(**fields, auto_augment=name)
    augmented = registry.create_dataset(config)
    got = next(augmented.train_iterator(4, start_step=1))
    np.testing.assert_array_equal(got["label"], plain["label"])
    policy = autoaugment.Policy.from_config(config)
    for k in range(4):
        # Step 1 of epoch 0 holds positions 4..7; each example's generator is (seed, epoch, position).
        want = policy(plain["image"][k], np.random.default_rng([3, 0, 4 + k]))
        np.testing.assert_array_equal(got["image"][k], want)
    assert (got["image"] != plain["image"]).any()
    # A fresh pipeline from step 0 reaches the same batch at step 1 (a resume draws the same).
    stream = registry.create_dataset(tiny_config(**fields, auto_augment=name)).train_iterator(4)
    next(stream)
    np.testing.assert_array_equal(next(stream)["image"], got["image"])


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(auto_augment="trivial"), "config.auto_augment must be '' (off), one of"),
        (dict(auto_augment="ra", ra_magnitude=31), "ra_magnitude < ra_num_magnitude_bins"),
        (dict(auto_augment="ta_wide", dataset="sklearn_digits"), "implemented for dataset='image_folder'"),
        (
            dict(auto_augment="ra", interpolation="bicubic"),
            "config.interpolation must be one of ('nearest', 'bilinear')",
        ),
    ],
)
def test_bad_auto_augment_fields_are_one_line_naming_the_field(fields, message):
    config = default_config()
    for key, value in fields.items():  # (interpolation may be a field of its own elsewhere)
        setattr(config, key, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)
