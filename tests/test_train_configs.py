"""configs/*.py: every config validates; the ImageNet and LARS recipes give the documented
schedules and updates; config errors are clear; cifar10 (mocked TFDS) and synthetic run."""

import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import loop, optim  # noqa: E402
from train.config import ConfigError, validate_config  # noqa: E402
from train.metrics import read_metrics  # noqa: E402
from train.model import resolve_dtype  # noqa: E402

CONFIGS = [
    "default",
    "cifar10",
    "imagenet_resnet50",
    "imagenet_resnet50_lars",
    "synthetic_benchmark",
    "finetune_folder",
]
TINY_BASE = {"n_blocks": (1,), "n_channels": (8,), "first_kernel_size": 3}


def load(name):
    # Loaded by path, as --config=configs/NAME.py does: configs/ is not a package.
    return runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"]()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_with_required_fields(name):
    c = load(name)
    for field in ("num_train_steps", "parallelism", "checkpoint_every_steps", "seed"):
        assert field in c
    assert c.parallelism in ("jit", "pmap")
    validate_config(c, device_count=8, process_count=1)


def test_imagenet_recipe_schedule():
    c = load("imagenet_resnet50")
    assert c.optimizer == "sgd" and c.nesterov and c.momentum == 0.9
    assert c.weight_decay == 1e-4 and c.label_smoothing == 0.1 and c.warmup_epochs == 5
    assert c.train_augment == "inception_crop" and c.random_flip and c.image_size == 224
    assert c.eval_crop_fraction == 224 / 256
    peak = 0.1 * c.batch_size / 256
    assert optim.peak_learning_rate(c) == pytest.approx(peak)
    spe = 1_281_167 // c.batch_size
    total = c.num_epochs * spe
    schedule = optim.create_lr_schedule(c, spe, total)
    warm = 5 * spe
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(warm // 2)), peak * (warm // 2) / warm, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(warm)), peak, rtol=1e-5)
    mid = warm + (total - warm) // 2
    want = peak * 0.5 * (1 + np.cos(np.pi * (mid - warm) / (total - warm)))
    np.testing.assert_allclose(float(schedule(mid)), want, rtol=1e-4)
    assert float(schedule(total)) < 1e-6
    # bfloat16 compute on accelerators, float32 on CPU.
    assert c.dtype == "auto"
    assert resolve_dtype("auto", "tpu") == jnp.bfloat16 == resolve_dtype("auto", "gpu")
    assert resolve_dtype("auto", "cpu") == jnp.float32


def test_lars_recipe_schedule_and_update():
    c = load("imagenet_resnet50_lars")
    assert c.batch_size >= 3200 and 35 <= c.num_epochs <= 40
    assert c.optimizer == "lars" and c.lr_schedule == "polynomial" and c.lr_decay_power == 2
    spe = 1_281_167 // c.batch_size
    total = c.num_epochs * spe
    warm = round(c.warmup_epochs * spe)
    schedule = optim.create_lr_schedule(c, spe, total)
    np.testing.assert_allclose(float(schedule(warm)), c.learning_rate, rtol=1e-5)
    t = warm + (total - warm) // 3
    frac = 1 - (t - warm) / (total - warm)
    want = (c.learning_rate - c.end_learning_rate) * frac**2 + c.end_learning_rate
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-4)

    # First LARS step against the formula: kernels get a trust ratio and weight decay,
    # BatchNorm/bias parameters neither.
    tx = optim.create_optimizer(c, optax.constant_schedule(2.0))
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
        "bn": {"scale": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    w, g = params["conv"]["kernel"], grads["conv"]["kernel"]
    g_wd = g + c.weight_decay * w
    ratio = c.lars_trust_coefficient * jnp.linalg.norm(w) / jnp.linalg.norm(g_wd)
    np.testing.assert_allclose(updates["conv"]["kernel"], -2.0 * ratio * g_wd, rtol=1e-5)
    np.testing.assert_allclose(updates["bn"]["scale"], -2.0 * grads["bn"]["scale"], rtol=1e-6)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("batch_size", 100, "batch_size=100 is not divisible by the 8 devices"),
        ("parallelism", "pjit", "config.parallelism='pjit' is not valid"),
        ("num_train_steps", -3, "num_train_steps must be > 0"),
        ("checkpoint_every_steps", -1, "checkpoint_every_steps must be >= 0"),
        ("dtype", "float128", "config.dtype='float128' is not valid"),
        ("mesh_axis_types", "manual", "config.mesh_axis_types='manual' is not valid"),
    ],
)
def test_config_errors_are_clear(field, value, message):
    c = load("default")
    setattr(c, field, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(c, device_count=8, process_count=1)


def test_explicit_mesh_needs_the_jit_driver():
    c = load("default")
    c.mesh_axis_types, c.parallelism = "explicit", "pmap"
    with pytest.raises(ConfigError, match="mesh_axis_types='explicit' needs config.parallelism='jit'"):
        validate_config(c, device_count=8, process_count=1)
    c.parallelism = "jit"
    validate_config(c, device_count=8, process_count=1)


def test_float64_needs_64_bit_jax():
    c = load("default")
    c.dtype = "float64"
    with pytest.raises(ConfigError, match="float64.*JAX_ENABLE_X64=1"):
        validate_config(c, device_count=8, process_count=1)
    with jax.enable_x64(True):
        validate_config(c, device_count=8, process_count=1)


def test_unknown_arch_is_a_config_error():
    c = load("default")
    c.model.arch = "resnet19"
    with pytest.raises(ConfigError, match="resnet19.*resnet18"):
        validate_config(c)


def _tiny(c, **kw):
    c.model.arch = "resnet_base"
    c.model.overrides = TINY_BASE
    c.rng_impl = "rbg"
    c.progress_bar = False
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_cifar10_config_runs_on_mocked_tfds(tmp_path):
    c = _tiny(
        load("cifar10"),
        download=True,
        batch_size=8,
        eval_batch_size=16,
        num_train_steps=4,
        log_every_steps=2,
        checkpoint_every_steps=0,
        shuffle_buffer_size=16,
        # mock_data swaps in a fake file system while it serves data, which would also catch
        # orbax's background writes; checkpoints are covered by test_train_loop.py.
        save_checkpoints=False,
    )
    with tfds.testing.mock_data(num_examples=20):
        out = loop.train_and_evaluate(c, str(tmp_path))
    assert out["final_step"] == 4 and out["steps_per_epoch"] == 2
    assert out["eval"]["num_examples"] == 20
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]  # every epoch + end


def test_synthetic_benchmark_reports_throughput(tmp_path):
    c = _tiny(
        load("synthetic_benchmark"),
        image_size=16,
        batch_size=8,
        num_train_steps=5,
        log_every_steps=2,
        synthetic_num_classes=10,
    )
    out = loop.train_and_evaluate(c, str(tmp_path))
    assert out["images_per_sec"] > 0 and out["compile_time_s"] > 0
    assert out["eval"] is None
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
