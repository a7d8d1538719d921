"""Mixup and cutmix (train/mixup.py) against timm's own ``Mixup``, given the same draws."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from resnet_jax.torch_reference import import_reference
from train import mixup, steps

timm = import_reference("timm")
torch = pytest.importorskip("torch")
from timm.data import mixup as timm_mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402

B, H, W, C, K = 6, 8, 16, 3, 5  # H * W a power of 2: timm's float32 corrected lam is exact

# Per draw: lam (multiples of 1/1024, so timm's float32 1 - lam is exact), cutmix?, box centre.
# Row draws cover: blend, a box inside, boxes clipped at each border, a skipped row (lam 1)
# whose switch says cutmix, a box too small to paste anything.
LAM = np.array([0.25, 0.5, 1.0, 0.125, 0.998046875, 0.75])
CUT = np.array([False, True, True, True, True, True])
CY = np.array([3, 0, 4, 7, 2, 5])
CX = np.array([5, 15, 2, 1, 9, 14])


def _draws(mode, first):
    sel = slice(first, first + mixup.num_draws(mode, B))
    return LAM[sel], CUT[sel], CY[sel], CX[sel]


def _timm(monkeypatch, mode, first, images, labels, correct_lam, smoothing):
    lam, cut, cy, cx = _draws(mode, first)
    m = timm_mixup.Mixup(
        mixup_alpha=1.0,
        cutmix_alpha=1.0,
        mode=mode,
        correct_lam=correct_lam,
        label_smoothing=smoothing,
        num_classes=K,
    )
    m._params_per_batch = lambda: (float(lam[0]), bool(cut[0]))
    m._params_per_elem = lambda n: (lam[:n].astype(np.float32), cut[:n].copy())
    centres = [v for i in range(len(lam)) if lam[i] != 1 and cut[i] for v in (cy[i], cx[i])]
    queue = list(centres)
    monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None: queue.pop(0))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm's one_hot is torch.full's default dtype
    try:
        x, target = m(x, torch.from_numpy(labels.astype(np.int64)))
    finally:
        torch.set_default_dtype(default)
    assert not queue  # timm drew every box centre we gave it
    return x.numpy().transpose(0, 2, 3, 1), target.numpy()


# (mode, the first of the draws above it takes): batch blends, or pastes a clipped box.
CASES = [("batch", 0), ("batch", 1), ("pair", 0), ("pair", 3), ("elem", 0)]


@pytest.mark.parametrize("mode,first", CASES)
@pytest.mark.parametrize("correct_lam,smoothing", [(True, 0.1), (False, 0.0)])
def test_mix_equals_timm_mixup_given_the_same_draws(monkeypatch, mode, first, correct_lam, smoothing):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, H, W, C))
    labels = rng.integers(0, K, B)
    want_x, want_y = _timm(monkeypatch, mode, first, images, labels, correct_lam, smoothing)
    with jax.enable_x64(True):
        draws = mixup.MixDraws(*(np.asarray(d) for d in _draws(mode, first)))
        got_x, got_y = mixup.mix(
            images,
            labels,
            draws,
            mode=mode,
            num_classes=K,
            label_smoothing=smoothing,
            correct_lam=correct_lam,
        )
        assert got_x.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(got_x), want_x)
    np.testing.assert_array_equal(np.asarray(got_y), want_y)
    assert not np.array_equal(want_x, images)  # something was mixed


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_minmax_equals_timms_given_the_same_draws(monkeypatch, mode):
    """timm's rand_bbox_minmax: sides drawn in [min, max) of the image's, lam always corrected."""
    rng = np.random.default_rng(2)
    images, labels = rng.normal(size=(B, H, W, C)), rng.integers(0, K, B)
    n = mixup.num_draws(mode, B)
    lam, cut = np.roll(LAM, -1)[:n], np.roll(CUT, -1)[:n]  # batch: the first box
    cut_h, cut_w = rng.integers(1, 6, n), rng.integers(3, 12, n)  # in [int(H*.2), int(H*.8)) etc.
    top, left = rng.integers(0, H - cut_h + 1), rng.integers(0, W - cut_w + 1)
    m = timm_mixup.Mixup(
        cutmix_minmax=(0.2, 0.8), mode=mode, correct_lam=False, label_smoothing=0.1, num_classes=K
    )
    m._params_per_batch = lambda: (float(lam[0]), bool(cut[0]))
    m._params_per_elem = lambda k: (lam[:k].astype(np.float32), cut[:k].copy())
    queue = [int(v[i]) for i in range(n) if lam[i] != 1 and cut[i] for v in (cut_h, cut_w, top, left)]
    monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None: queue.pop(0))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x, want_y = m(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
    finally:
        torch.set_default_dtype(default)
    assert not queue
    with jax.enable_x64(True):
        draws = mixup.MixDraws(lam, cut, top, left, cut_h, cut_w)
        got_x, got_y = mixup.mix(
            images, labels, draws, mode=mode, num_classes=K, label_smoothing=0.1, correct_lam=False
        )
    np.testing.assert_array_equal(np.asarray(got_x), x.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(got_y), want_y.numpy())


@pytest.mark.parametrize("lam", [0.9, 0.5, 0.03, 0.0])
def test_cutmix_box_and_corrected_lam_equal_timms(monkeypatch, lam):
    for cy, cx in [(0, 0), (3, 8), (7, 15), (5, 1)]:
        queue = [cy, cx]
        monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None, q=queue: q.pop(0))
        (yl, yh, xl, xh), want_lam = timm_mixup.cutmix_bbox_and_lam((C, H, W), lam, correct_lam=True)
        with jax.enable_x64(True):
            box = [int(v) for v in mixup.cutmix_box(np.float64(lam), cy, cx, H, W)]
        assert box == [yl, yh, xl, xh]
        assert 1.0 - (yh - yl) * (xh - xl) / (H * W) == want_lam


class _Linear(nn.Module):
    """A tiny model with BatchNorm statistics, as the train step expects."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(K)(x.reshape(len(x), -1))


def test_train_step_loss_is_timms_soft_target_loss_on_timms_mixed_batch(monkeypatch):
    """The step normalises, mixes with the draws of (seed, state.step), and takes timm's
    SoftTargetCrossEntropy of timm's mixed batch given those draws."""
    config = ml_collections.ConfigDict(
        dict(
            mixup_alpha=0.4,
            cutmix_alpha=1.0,
            mixup_prob=0.8,
            mixup_switch_prob=0.5,
            mixup_mode="elem",
            correct_lam=True,
            label_smoothing=0.1,
            seed=3,
            batch_size=B,
            cutmix_minmax=(),
        )
    )
    options = mixup.MixupOptions.from_config(config, K)
    stats = ((120.0, 110.0, 100.0), (60.0, 64.0, 70.0))
    model = _Linear()
    state = steps.create_train_state(jax.random.key(0), model, optax.sgd(0.0), (1, H, W, C))
    # The first step from 5 whose draws mix some rows and leave others, as this test needs both
    # (which step that is depends on the generator's values, not on anything checked here).
    lam_of = lambda n: np.asarray(mixup.draw(mixup.step_key(3, n), options, B, H, W)[0])  # noqa: E731
    at = next(n for n in range(5, 100) if 0 < np.sum(lam_of(n) != 1) < B)
    state = state.replace(step=jnp.asarray(at, jnp.int32))
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (B, H, W, C)).astype(np.uint8), "label": rng.integers(0, K, B)}
    step = steps.make_train_step(model, optax.sgd(0.0), input_stats=stats, mixup=options)
    _, metrics = jax.jit(step)(state, batch)

    draws = mixup.draw(mixup.step_key(3, at), options, B, H, W)
    lam, cut, cy, cx = (np.asarray(d) for d in draws[:4])
    assert 0 < np.sum(lam != 1) < B  # some rows mixed, some not
    m = timm_mixup.Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, mode="elem", label_smoothing=0.1, num_classes=K)
    m._params_per_elem = lambda n: (lam.copy(), cut.copy())
    queue = [v for i in range(B) if lam[i] != 1 and cut[i] for v in (cy[i], cx[i])]
    monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None: queue.pop(0))
    normalised = (batch["image"].astype(np.float32) - np.float32(stats[0])) / np.float32(stats[1])
    x, target = m(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy()), torch.from_numpy(batch["label"]))
    logits, _ = model.apply(
        state.variables, x.numpy().transpose(0, 2, 3, 1), train=True, mutable=["batch_stats"]
    )
    want = SoftTargetCrossEntropy()(torch.from_numpy(np.array(logits)), target)
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-6)


_PMAP = """
import jax, numpy as np
from train import mixup
opts = mixup.MixupOptions(0.4, 1.0, 0.7, 0.5, "{mode}", True, 0.1, 5, 0)
x = np.random.default_rng(0).normal(size=(8, 8, 16, 3)).astype(np.float32)
y = np.arange(8) % 5
step = np.int32(7)
want = jax.jit(lambda x, y: mixup.mix_in_step(opts, step, x, y, None))(x, y)
got = jax.pmap(lambda x, y: mixup.mix_in_step(opts, step, x, y, "d"), axis_name="d")(
    x.reshape(4, 2, 8, 16, 3), y.reshape(4, 2))
np.testing.assert_array_equal(np.asarray(got[0]).reshape(x.shape), np.asarray(want[0]))
# The targets within an ulp: XLA fuses the two programs' arithmetic differently.
np.testing.assert_allclose(np.asarray(got[1]).reshape(8, 5), np.asarray(want[1]), rtol=0, atol=1e-7)
assert not np.array_equal(np.asarray(want[0]), x)
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
xs, ys = (jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))
with jax.set_mesh(mesh):  # explicit axes: the draws follow the batch's sharding
    got = jax.jit(lambda x, y: mixup.mix_in_step(opts, step, x, y, None))(xs, ys)
np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=0, atol=1e-7)
print("ok")
"""


def test_mixing_under_pmap_and_on_an_explicit_mesh_equals_jit_over_the_global_batch():
    """Under pmap, each device mixes its rows with the mirrored device's, as jit flips the batch;
    on a mesh with explicit axes the draws are resharded as the batch's rows."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = "\n".join(_PMAP.format(mode=mode) for mode in mixup.MIXUP_MODES)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok"] * 3


def test_draws_follow_timms_distributions():
    """lam ~ Beta(alpha, alpha) of the chosen kind (KS test); mixed with mixup_prob; cutmix chosen
    with mixup_switch_prob; the box centre uniform over the image."""
    from scipy import stats

    options = mixup.MixupOptions(0.4, 1.0, 0.8, 0.3, "elem", True, 0.0, K, 0)
    n = 8000
    d = [
        np.asarray(v)
        for v in jax.jit(mixup.draw, static_argnums=(1, 2, 3, 4))(mixup.step_key(0, 1), options, n, H, W)
    ]
    lam, cut, cy, cx = d[:4]
    mixed = lam != 1.0
    assert stats.binomtest(int(mixed.sum()), n, 0.8).pvalue > 1e-3
    assert stats.binomtest(int(cut.sum()), n, 0.3).pvalue > 1e-3
    assert stats.kstest(lam[mixed & ~cut], stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    assert stats.kstest(lam[mixed & cut], stats.beta(1.0, 1.0).cdf).pvalue > 1e-3
    assert stats.chisquare(np.bincount(cy, minlength=H)).pvalue > 1e-3
    assert stats.chisquare(np.bincount(cx, minlength=W)).pvalue > 1e-3
    # cutmix_minmax: sides uniform in [int(H * min), int(H * max)), the box inside the image.
    minmax = mixup.MixupOptions(0.0, 1.0, 1.0, 0.5, "elem", True, 0.0, K, 0, (0.25, 0.75))
    d = [
        np.asarray(v)
        for v in jax.jit(mixup.draw, static_argnums=(1, 2, 3, 4))(mixup.step_key(0, 1), minmax, n, H, W)
    ]
    _, cut, top, left, cut_h, cut_w = d
    assert cut.all() and (top + cut_h <= H).all() and (left + cut_w <= W).all()
    assert sorted(set(cut_h)) == [2, 3, 4, 5] and sorted(set(cut_w)) == list(range(4, 12))
    assert stats.chisquare(np.bincount(cut_h)[2:]).pvalue > 1e-3


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(mixup_alpha=0.2, mixup_mode="row"), "config.mixup_mode must be one of"),
        (dict(cutmix_alpha=1.0, batch_size=63), "config.batch_size must be even; got 63"),
        (dict(mixup_alpha=0.2, mixup_switch_prob=1.5), "config.mixup_switch_prob must be in [0, 1]"),
        (dict(cutmix_minmax=(0.8, 0.2)), "config.cutmix_minmax must be (min, max), 0 <= min < max"),
    ],
)
def test_bad_mixing_fields_are_one_line_naming_the_field(fields, message):
    from train.config import ConfigError, default_config, validate_config

    config = default_config()
    config.update(fields)
    with pytest.raises(ConfigError, match="".join("\\" + c if c in "[]()" else c for c in message)):
        validate_config(config)
