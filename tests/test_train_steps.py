"""train.steps: the pure train/eval steps against independent computations (one CPU device)."""

import functools
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import optim, parallel, steps
from train.config import default_config
from train.model import build_model

TINY = {
    "arch": "resnet_base",
    "overrides": {"n_blocks": (1,), "n_channels": (8,), "first_kernel_size": 3},
}
KEY = functools.partial(jax.random.key, impl="rbg")  # fast to compile on CPU


def _batch(n=16, classes=7, seed=0, size=8, channels=3):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, size, size, channels)).astype(np.float32),
        "label": rng.integers(0, classes, n).astype(np.int32),
    }


@pytest.fixture(scope="module")
def tiny():
    model = build_model(TINY, 7, 3)
    state = steps.create_train_state(KEY(0), model, optax.sgd(0.1), (1, 8, 8, 3))
    return model, state


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_matches_numpy_with_label_smoothing():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    for eps in (0.0, 0.1):
        target = np.full((6, 5), eps / 5)
        target[np.arange(6), labels] += 1 - eps
        want = -(target * _np_log_softmax(logits.astype(np.float64))).sum(-1)
        got = steps.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_topk_correct_matches_sorting():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 50)
    ranks = np.argsort(-logits, axis=1)
    for k in (1, 5):
        want = np.array([labels[i] in ranks[i, :k] for i in range(50)], np.float32)
        got = steps.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
        chex.assert_trees_all_equal(np.asarray(got), want)
    # k larger than the number of classes: every label is in the "top k".
    assert float(jnp.mean(steps.topk_correct(jnp.asarray(logits[:, :3]), jnp.zeros(50, int), 5))) == 1


def test_train_step_equals_manual_sgd_update(tiny):
    model, state = tiny
    batch = _batch()
    tx = optax.sgd(0.05)
    state = state.replace(opt_state=tx.init(state.params))
    new_state, metrics = jax.jit(steps.make_train_step(model, tx, label_smoothing=0.1))(state, batch)

    # Independent reference: loss written with numpy-style log-softmax, gradient by jax.grad.
    def loss(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        target = jax.nn.one_hot(batch["label"], 7) * 0.9 + 0.1 / 7
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), -1)), (logits, upd)

    (ref_loss, (logits, upd)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    want = jax.tree.map(lambda p, g: p - 0.05 * g, state.params, grads)
    chex.assert_trees_all_close(new_state.params, want, atol=1e-6)
    chex.assert_trees_all_close(new_state.batch_stats, upd["batch_stats"], atol=1e-6)
    assert int(new_state.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    pred = np.argmax(np.asarray(logits), -1)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(pred == batch["label"]))
    # The running statistics moved away from their initial values.
    assert not np.allclose(jax.tree.leaves(new_state.batch_stats)[0], jax.tree.leaves(state.batch_stats)[0])


def test_uint8_batches_are_normalised_on_device_like_host_normalised_floats(tiny):
    model, state = tiny
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8)
    labels = rng.integers(0, 7, 16).astype(np.int32)
    mean, std = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)
    host = ((pixels.astype(np.float64) - mean) / std).astype(np.float32)  # numpy reference
    tx = optax.sgd(0.05)
    state = state.replace(opt_state=tx.init(state.params))
    stats = (mean, std)
    got, m_got = jax.jit(steps.make_train_step(model, tx, input_stats=stats))(
        state, {"image": pixels, "label": labels}
    )
    want, m_want = jax.jit(steps.make_train_step(model, tx))(state, {"image": host, "label": labels})
    chex.assert_trees_all_close(got.params, want.params, atol=1e-6)
    chex.assert_trees_all_close(got.batch_stats, want.batch_stats, atol=1e-5)
    np.testing.assert_allclose(float(m_got["loss"]), float(m_want["loss"]), rtol=1e-6)
    mask = np.ones(16, np.float32)
    e_got = jax.jit(steps.make_eval_step(model, input_stats=stats))(
        state, {"image": pixels, "label": labels, "mask": mask}
    )
    e_want = jax.jit(steps.make_eval_step(model))(state, {"image": host, "label": labels, "mask": mask})
    np.testing.assert_allclose(float(e_got["loss_sum"]), float(e_want["loss_sum"]), rtol=1e-6)
    # Pixels without statistics would silently train on 0..255 inputs: refused instead.
    with pytest.raises(ValueError, match="input_stats"):
        steps.make_train_step(model, tx)(state, {"image": jnp.asarray(pixels), "label": labels})


def test_nesterov_with_masked_weight_decay_matches_formula(tiny):
    model, state = tiny
    cfg = default_config()  # every field train/ reads, then this test's optimizer
    cfg.update(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.01)
    tx = optim.create_optimizer(cfg, optax.constant_schedule(0.1))
    state = state.replace(opt_state=tx.init(state.params))
    train_step = jax.jit(steps.make_train_step(model, tx))
    b1, b2 = _batch(seed=3), _batch(seed=4)
    s1, _ = train_step(state, b1)
    s2, _ = train_step(s1, b2)

    def grad(params, stats, batch):
        def f(p):
            logits, _ = model.apply(
                {"params": p, "batch_stats": stats}, batch["image"], train=True, mutable=True
            )
            return jnp.mean(steps.cross_entropy(logits, batch["label"]))

        return jax.grad(f)(params)

    # Reference: g += wd * w on kernels only; v = mu v + g; w -= lr (g + mu v).
    def update(w, v, g, is_kernel):
        g = g + 0.01 * w * is_kernel
        v = 0.9 * v + g
        return w - 0.1 * (g + 0.9 * v), v

    mask = optim.decay_mask(state.params)
    g1 = grad(state.params, state.batch_stats, b1)
    w1v1 = jax.tree.map(lambda w, g, m: update(w, 0 * w, g, m), state.params, g1, mask)
    w1 = jax.tree.map(lambda t: t[0], w1v1, is_leaf=lambda t: isinstance(t, tuple))
    v1 = jax.tree.map(lambda t: t[1], w1v1, is_leaf=lambda t: isinstance(t, tuple))
    chex.assert_trees_all_close(s1.params, w1, atol=1e-6)
    g2 = grad(w1, s1.batch_stats, b2)
    w2v2 = jax.tree.map(lambda w, v, g, m: update(w, v, g, m), w1, v1, g2, mask)
    w2 = jax.tree.map(lambda t: t[0], w2v2, is_leaf=lambda t: isinstance(t, tuple))
    chex.assert_trees_all_close(s2.params, w2, atol=1e-5)
    # BatchNorm scales and biases are excluded from decay.
    assert not mask["backbone"]["bn"]["scale"] and mask["backbone"]["conv"]["kernel"]


def test_eval_step_sums_only_unmasked_examples(tiny):
    model, state = tiny
    batch = _batch(n=12)
    mask = np.array([1] * 9 + [0] * 3, np.float32)
    sums = jax.jit(steps.make_eval_step(model))(state, {**batch, "mask": mask})
    logits = np.asarray(model.apply(state.variables, batch["image"], train=False), np.float64)
    real = slice(0, 9)
    nll = -_np_log_softmax(logits)[np.arange(12), batch["label"]]
    np.testing.assert_allclose(float(sums["loss_sum"]), nll[real].sum(), rtol=1e-5)
    top1 = logits.argmax(-1) == batch["label"]
    top5 = (np.argsort(-logits, 1)[:, :5] == batch["label"][:, None]).any(1)
    assert float(sums["correct"]) == top1[real].sum()
    assert float(sums["correct_top5"]) == top5[real].sum()
    assert float(sums["count"]) == 9
    summary = steps.summarize_eval(jax.device_get(sums))
    np.testing.assert_allclose(summary["accuracy"], top1[real].mean())
    assert summary["num_examples"] == 9


def test_jit_driver_on_one_device_equals_plain_step(tiny):
    model, state = tiny
    tx = optax.sgd(0.1, momentum=0.9)
    state = state.replace(opt_state=tx.init(state.params))
    step_fn = steps.make_train_step(model, tx)
    batch = _batch(seed=5)
    want, _ = jax.jit(step_fn)(state, batch)
    driver = parallel.JitDriver()
    placed = driver.place_state(jax.device_get(state))
    got, metrics = driver.train_step(step_fn)(placed, driver.place_batch(batch))
    chex.assert_trees_all_close(driver.to_host(got.params), jax.device_get(want.params), atol=1e-6)
    assert set(metrics) >= {"loss", "accuracy", "top5_accuracy"}


def test_bfloat16_compute_keeps_float32_params_and_trains():
    model = build_model(TINY, 7, 3, dtype=jnp.bfloat16)
    tx = optax.sgd(0.1)
    state = steps.create_train_state(KEY(1), model, tx, (1, 8, 8, 3))
    step_fn = jax.jit(steps.make_train_step(model, tx))
    batch = _batch(seed=6)
    losses = []
    for _ in range(5):
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_float16_dynamic_loss_scale_skips_overflowing_step():
    model = build_model(TINY, 7, 3, dtype=jnp.float16)
    tx = optax.sgd(0.1)
    state = steps.create_train_state(KEY(2), model, tx, (1, 8, 8, 3), dynamic_scale=True)
    step_fn = jax.jit(steps.make_train_step(model, tx))
    good = _batch(seed=7)
    s1, m1 = step_fn(state, good)
    assert np.isfinite(float(m1["loss"]))
    assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(state.params)[0])
    bad = {**good, "image": good["image"].copy()}
    bad["image"][0, 0, 0, 0] = np.inf
    s2, m2 = step_fn(s1, bad)
    # Non-finite gradients: parameters untouched, scale halved.
    chex.assert_trees_all_equal(s2.params, s1.params)
    np.testing.assert_allclose(float(m2["loss_scale"]), float(m1["loss_scale"]) / 2)


def test_float64_twin_starts_from_the_float32_initial_values_and_keeps_float64():
    """``config.dtype='float64'``: a float64 model initialised through its float32 twin starts
    from the float32 run's exact values (cast), and its cross-entropy stays in float64."""
    with jax.enable_x64(True):
        model32 = build_model(TINY, 7, 3)
        model64 = build_model(TINY, 7, 3, dtype=jnp.float64)
        tx = optax.sgd(0.1)
        s32 = steps.create_train_state(KEY(3), model32, tx, (1, 8, 8, 3))
        s64 = steps.create_train_state(KEY(3), model64, tx, (1, 8, 8, 3), init_model=model32)
        drawn64 = steps.create_train_state(KEY(3), model64, tx, (1, 8, 8, 3))
        assert {x.dtype for x in jax.tree.leaves(s64.variables)} == {jnp.dtype(jnp.float64)}
        widened = jax.tree.map(lambda x: x.astype(jnp.float64), s32.variables)
        chex.assert_trees_all_equal(widened, s64.variables)
        # Without the twin, float64 initialisers draw other values: no common start to compare.
        assert not np.allclose(drawn64.params["fc"]["kernel"], s64.params["fc"]["kernel"])
        batch = _batch(classes=7)
        logits = model64.apply(s64.variables, jnp.asarray(batch["image"], jnp.float64), train=False)
        assert logits.dtype == jnp.float64
        loss = steps.cross_entropy(logits, jnp.asarray(batch["label"]), 0.1)
        assert loss.dtype == jnp.float64
