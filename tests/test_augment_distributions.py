"""The augmentation samplers against the references' own samplers, as distributions.

``tests/test_autoaugment.py`` and ``tests/test_erase.py`` replay our draws into torchvision's and
timm's code; here nothing is replayed: our samplers draw from the pipeline's generators (keyed on
seed, epoch and example position), the references from their own ``torch``/``random``/
``np.random`` streams, and two-sample tests compare the results:

* the ``auto_augment`` policies (``Policy.draw``/``TimmRandAugment.draw``, what the pipeline
  applies): the number of ops per image, each op's frequency and the joint (op, magnitude, sign)
  histogram, against torchvision's ``TrivialAugmentWide``/``RandAugment``/``AutoAugment`` forward
  (``_apply_op`` recording its arguments) and timm's ``RandAugment`` (each ``AugmentOp``'s op
  recording its level, the sign its level function drew and the resampling timm's
  ``_check_args_tf`` picks): chi-square tests of homogeneity;
* random erasing (``random_erase``): the probability of erasing (binomial, against the exact
  ``Binomial(n, prob)``) and the box's area share, log aspect ratio, top and left against
  torchvision's ``RandomErasing.get_params``: two-sample Kolmogorov-Smirnov tests.

Mixup's lambda (KS against ``scipy.stats.beta``) and cutmix's box and corrected lambda (against
timm's ``cutmix_bbox_and_lam`` given the same draws) are ``tests/test_mixup.py``'s.

All seeds are fixed, so each test gives the same p-value on every run; the bar, ``ALPHA``, is
small so that a change of seed does not flake, while a sampler off by a few percent in any
category still fails at these sample sizes.
"""

import math
import random
from collections import Counter

import numpy as np
import pytest

from resnet_jax.torch_reference import import_reference
from train.data import autoaugment, erase

import_reference("torchvision")
timm = import_reference("timm")
torch = pytest.importorskip("torch")
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.autoaugment as tv_aa  # noqa: E402
from scipy import stats  # noqa: E402
from timm.data import auto_augment as timm_aa  # noqa: E402

torch.set_num_threads(1)

ALPHA = 1e-4
SIZE = 32  # the image side the policies' translate bins are drawn for
N_TV = 10000  # torchvision's forward is slow: draws per torchvision policy (each side)
N_TIMM = 10000


def _pipeline_rngs(n, seed=3, epoch=1):
    """The generators the image-folder pipeline gives examples 0..n-1 of an epoch."""
    return (np.random.default_rng([seed, epoch, pos]) for pos in range(n))


def _homogeneous(ours, ref, min_count=10):
    """Chi-square test of homogeneity of two category counters; categories with fewer than
    ``min_count`` draws in both together are pooled into one. Returns the p-value."""
    keys = sorted(set(ours) | set(ref), key=repr)
    table = np.array([[ours[k] for k in keys], [ref[k] for k in keys]], np.float64)
    rare = table.sum(0) < min_count
    table = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], 1)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(stats.chi2_contingency(table, correction=False).pvalue)


SUMMARIES = ("ops per image", "op", "(op, sign)", "(op, |magnitude|)", "(op, |magnitude|, sign)")


def _summaries(draws):
    """Counters (named by ``SUMMARIES``) of a list of per-image ``(op, magnitude)`` lists: the
    marginals have the power against a small bias in one of them, the joint against the rest."""
    counters = [Counter() for _ in SUMMARIES]
    for image_ops in draws:
        counters[0][len(image_ops)] += 1
        for name, magnitude in image_ops:
            size, sign = round(abs(magnitude), 4), int(np.sign(magnitude))
            for counter, key in zip(counters[1:], (name, (name, sign), (name, size), (name, size, sign))):
                counter[key] += 1
    return counters


def _assert_same_distribution(ours, ref):
    for what, a, b in zip(SUMMARIES, _summaries(ours), _summaries(ref)):
        p = _homogeneous(a, b)
        assert p > ALPHA, f"{what}: p = {p:.2e}\nours {sorted(a.items())[:40]}\nref {sorted(b.items())[:40]}"


TV_POLICIES = {
    "ta_wide": lambda: tv_aa.TrivialAugmentWide(),
    "ra": lambda: tv_aa.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31),
    "aa": lambda: tv_aa.AutoAugment(tv_aa.AutoAugmentPolicy.IMAGENET),
}


def _torchvision_draws(monkeypatch, name, n):
    """torchvision's own policy ``name``, its forward run ``n`` times on a tiny image with
    ``_apply_op`` recording ``(op, magnitude)``. (Its augmentation space, a pure function of
    the bins and image size, is cached: rebuilding it each call is most of the forward's time.)"""
    log = []
    monkeypatch.setattr(
        tv_aa, "_apply_op", lambda img, op, magnitude, **kw: log.append((op, magnitude)) or img
    )
    policy = TV_POLICIES[name]()
    space, cache = policy._augmentation_space, {}
    policy._augmentation_space = lambda *a: cache[a] if a in cache else cache.setdefault(a, space(*a))
    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    torch.manual_seed(1234)
    draws = []
    for _ in range(n):
        log.clear()
        policy(image)
        # torchvision's v1 Solarize thresholds are on the 0..255 scale; ours (and v2's) a
        # fraction of the maximum.
        draws.append([(op, m / 255.0 if op == "Solarize" else m) for op, m in log])
    return draws


@pytest.mark.parametrize("name", autoaugment.AUTO_AUGMENTS)
def test_torchvision_policies_draw_torchvisions_distribution(monkeypatch, name):
    policy = autoaugment.make_policy(name)  # ra: ra_num_ops=2, ra_magnitude=9, 31 bins (the defaults)
    ours = [policy.draw(rng, SIZE, SIZE) for rng in _pipeline_rngs(N_TV)]
    _assert_same_distribution(ours, _torchvision_draws(monkeypatch, name, N_TV))


def _timm_draws(monkeypatch, spec, n):
    """timm's own ``rand_augment_transform(spec)`` called ``n`` times, each op recording
    ``(op, signed level, resampling)``: the level after its noise and clamp (the argument of its
    level function), signed as the level function's output (its random negation), the
    resampling as timm's ``_check_args_tf`` draws it for the geometric ops."""
    log = []
    transform = timm_aa.rand_augment_transform(spec, {"img_mean": autoaugment.TIMM_FILL})
    for op in transform.ops:

        def level_fn(level, hparams, op=op, inner=op.level_fn):
            args = inner(level, hparams) if inner is not None else ()
            # A signed op's level function negates at random: below 0 (geometric ops) or below
            # 1, the identity (the Increasing enhancements), is the negative sign.
            centre = 1.0 if op.name.endswith("Increasing") else 0.0
            sign = -1.0 if op.name in autoaugment.SIGNED and args and args[0] < centre else 1.0
            log.append([op.name, sign * level, "bicubic"])
            return args

        def aug_fn(img, *args, op=op, **kwargs):
            if op.name in autoaugment._TIMM_GEOMETRIC:
                kwargs = dict(kwargs)
                timm_aa._check_args_tf(kwargs)
                log[-1][2] = {2: "bilinear", 3: "bicubic"}[int(kwargs["resample"])]
            return img

        monkeypatch.setattr(op, "level_fn", level_fn)
        monkeypatch.setattr(op, "aug_fn", aug_fn)
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(4321)
    np.random.seed(4321)
    draws = []
    try:
        for _ in range(n):
            log.clear()
            transform(None)
            draws.append([tuple(entry) for entry in log])
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return draws


TIMM_SUMMARIES = ("ops per image", "op", "(op, sign)", "(op, level bin)", "(op, resampling)", "joint")


def _timm_summaries(draws, bins):
    """Counters (named by ``TIMM_SUMMARIES``) of timm-style ``(op, level, resampling)`` draws."""
    counters = [Counter() for _ in TIMM_SUMMARIES]
    for image_ops in draws:
        counters[0][len(image_ops)] += 1
        for name, level, interpolation in image_ops:
            size, sign = int(np.searchsorted(bins, abs(level), side="right")), level < 0
            keys = (
                name,
                (name, sign),
                (name, size),
                (name, interpolation),
                (name, size, sign, interpolation),
            )
            for counter, key in zip(counters[1:], keys):
                counter[key] += 1
    return counters


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-mstd0.5"])
def test_timm_rand_augment_draws_timms_distribution(monkeypatch, spec):
    policy = autoaugment.make_policy(spec)
    ours = [policy.draw(rng) for rng in _pipeline_rngs(N_TIMM)]
    ref = _timm_draws(monkeypatch, spec, N_TIMM)
    assert {name for d in ref for name, _, _ in d} == set(policy.ops)
    # Level bins: quarter-levels around the magnitude; the clamp at 10 has its own bin.
    bins = np.array([policy.magnitude + k * 0.25 for k in range(-6, 7)] + [10.0 - 1e-9])
    bins = np.unique(np.clip(bins, 0, 10.0 - 1e-9))
    for what, a, b in zip(TIMM_SUMMARIES, _timm_summaries(ours, bins), _timm_summaries(ref, bins)):
        p = _homogeneous(a, b)
        assert p > ALPHA, f"{what}: p = {p:.2e}\nours {sorted(a.items())[:40]}\nref {sorted(b.items())[:40]}"
    # And the levels themselves, pooled over the ops: two-sample KS.
    ours_levels = np.array([abs(level) for d in ours for _, level, _ in d])
    ref_levels = np.array([abs(level) for d in ref for _, level, _ in d])
    assert stats.ks_2samp(ours_levels, ref_levels).pvalue > ALPHA


H, W = 40, 56  # not square, so a swapped height and width would show
SCALE, RATIO = (0.02, 1 / 3), (0.3, 1 / 0.3)


def _box_stats(boxes):
    top, left, h, w = np.asarray(boxes, np.float64).T
    return {"area share": h * w / (H * W), "log aspect": np.log(h / w), "top": top, "left": left}


def test_random_erasing_matches_torchvisions_sampler():
    n, prob = 6000, 0.6
    ours, erased = [], 0
    for rng in _pipeline_rngs(n):
        image = erase.random_erase(np.ones((H, W, 1), np.float32), rng, prob, "const", SCALE, RATIO)
        zeros = np.argwhere(image[..., 0] == 0)
        if len(zeros):
            erased += 1
            (top, left), (bottom, right) = zeros.min(0), zeros.max(0)
            assert len(zeros) == (bottom - top + 1) * (right - left + 1)  # one solid box
            ours.append((top, left, bottom - top + 1, right - left + 1))
    # Erased with probability prob (and a box always found at this size): Binomial(n, prob).
    assert stats.binomtest(erased, n, prob).pvalue > ALPHA

    torch.manual_seed(99)
    image = torch.zeros(1, H, W)
    ref = []
    for _ in range(len(ours)):
        top, left, h, w, _ = T.RandomErasing.get_params(image, scale=SCALE, ratio=RATIO, value=[0.0])
        assert (h, w) != (H, W)  # torchvision's "no box found" (ours: None); not expected here
        ref.append((top, left, h, w))
    ours_stats, ref_stats = _box_stats(ours), _box_stats(ref)
    for key in ours_stats:
        p = stats.ks_2samp(ours_stats[key], ref_stats[key]).pvalue
        assert p > ALPHA, f"{key}: KS p = {p:.2e}"
    # The erased box's share of the image really spans torchvision's range.
    assert ours_stats["area share"].max() > 0.3 and ours_stats["area share"].min() < 0.03
    assert math.isclose(np.mean(ours_stats["area share"]), np.mean(ref_stats["area share"]), abs_tol=0.01)
