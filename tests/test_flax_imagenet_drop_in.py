"""The Linen models used as Flax's ``examples/imagenet`` trainer uses its own ResNet.

That trainer builds ``model_cls(num_classes=..., dtype=...)``, initialises with
``init({'params': key}, ones)`` and no ``train``, runs a ``pmap`` step that averages the gradients
and then the updated ``batch_stats`` across devices, and evaluates with ``train=False,
mutable=False``. So ``train`` must default to True, and a forgotten ``mutable`` must fail loudly.

The ``pmap`` runs happen in a subprocess (this file run as a script, 2 fake CPU devices, float64)
because the device count must be set before JAX initialises. They are checked against references
that use no collectives: the same steps computed shard by shard on one device and averaged, and,
with synchronised BatchNorm, one step on the concatenated batch.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors, traverse_util

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, this file must still import this checkout

import resnet_jax  # noqa: E402
from resnet_jax.parity import rel  # noqa: E402

# One xdist worker: the pmap fixture's subprocess then runs once.
pytestmark = pytest.mark.xdist_group("flax_imagenet")
DEVICES, PER_DEVICE, SIZE, CLASSES, STEPS = 2, 2, 16, 5, 2
# As Flax's ``models.ResNet18`` is a partial of its ResNet, with the trainer adding the rest.
TINY = functools.partial(resnet_jax.ResNet, stage_sizes=(1,), block="basic")
TOL64 = 1e-12  # float64: the runs differ only in summation order


# ----------------------------------------------------------------------------------------------
# In this process: init without `train`, the default, and the loud failure.


@pytest.fixture(scope="module")
def tiny():
    model = TINY(num_classes=CLASSES, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, jnp.ones((1, SIZE, SIZE, 3), model.dtype))
    return model, variables, x


def test_init_without_train_gives_the_variables_of_init_in_eval_mode(tiny):
    model, variables, _ = tiny
    ones = jnp.ones((1, SIZE, SIZE, 3))
    explicit = jax.jit(functools.partial(model.init, train=False))({"params": jax.random.key(0)}, ones)
    assert jax.tree.structure(variables) == jax.tree.structure(explicit)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(a, b)


def test_train_defaults_to_true(tiny):
    model, variables, x = tiny
    default, stats = model.apply(variables, x, mutable=["batch_stats"])
    train, stats_train = model.apply(variables, x, train=True, mutable=["batch_stats"])
    evaluated = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(default, train)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_train)):
        np.testing.assert_array_equal(a, b)
    # Batch statistics, not the running ones: fresh running stats (0, 1) give other logits.
    assert rel(default, evaluated) > 1e-3
    feats = model.apply(variables, x, method="features", mutable=["batch_stats"])[0]
    feats_train = model.apply(variables, x, train=True, method="features", mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(feats["layer1"], feats_train["layer1"])


@pytest.mark.parametrize("method", [None, "features"])
def test_apply_without_mutable_raises_batch_stats_is_immutable(tiny, method):
    model, variables, x = tiny
    with pytest.raises(errors.ModifyScopeVariableError, match='collection "batch_stats" is immutable'):
        model.apply(variables, x, method=method)


def test_resnet_base_without_train_or_mutable_raises_batch_stats_is_immutable():
    model = resnet_jax.ResNetBase(n_blocks=(1,), n_channels=(4,), first_kernel_size=3)
    x = jnp.ones((1, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert jax.jit(functools.partial(model.apply, mutable=["batch_stats"]))(variables, x)[0].shape == (1, 4)
    with pytest.raises(errors.ModifyScopeVariableError, match='collection "batch_stats" is immutable'):
        model.apply(variables, x)


def test_resnet50_preset_builds_as_the_trainer_builds_models_resnet50():
    model = resnet_jax.resnet50(num_classes=1000, dtype=jnp.bfloat16)
    ones = jnp.ones((1, 224, 224, 3), model.dtype)
    variables = jax.eval_shape(model.init, {"params": jax.random.key(0)}, ones)
    assert set(variables) == {"params", "batch_stats"}
    assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=False), variables, ones)
    assert (logits.shape, logits.dtype) == ((1, 1000), jnp.float32)


# ----------------------------------------------------------------------------------------------
# In a subprocess: the trainer's pmap step and eval against references without collectives.


@pytest.fixture(scope="module")
def pmap_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("flax_imagenet") / "runs.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = np.load(out)
    runs: dict = {}
    for key in data.files:
        name, leaf = key.split("|", 1)
        runs.setdefault(name, {})[leaf] = data[key]
    return runs


def _assert_replicas_equal_reference(stacked: dict, reference: dict) -> None:
    assert stacked.keys() == reference.keys()
    for k, v in stacked.items():
        assert v.shape == (DEVICES, *reference[k].shape), k
        for d in range(1, DEVICES):  # every device holds the same replica, bit for bit
            np.testing.assert_array_equal(v[d], v[0], err_msg=k)
        assert rel(v[0], reference[k]) <= TOL64, (k, rel(v[0], reference[k]))


def test_pmap_step_equals_the_average_of_per_shard_steps(pmap_runs):
    """The trainer's step (BatchNorm per device, then pmean of the updated batch_stats)."""
    pmap, ref, init = pmap_runs["pmap"], pmap_runs["reference"], pmap_runs["init"]
    _assert_replicas_equal_reference(pmap, ref)
    for k in ref:  # the step really moved every parameter and statistic
        assert rel(ref[k], init[k]) > 1e-6, k
    # The averaged statistics are not any one device's: the pmean happened.
    stem_mean = "batch_stats/bn1/mean"
    assert rel(ref[stem_mean], pmap_runs["shard0"][stem_mean]) > 1e-3
    np.testing.assert_allclose(pmap_runs["losses"]["pmap"], pmap_runs["losses"]["reference"], rtol=TOL64)


def test_pmap_step_with_synchronised_batchnorm_equals_one_step_on_the_whole_batch(pmap_runs):
    sync, per_device = pmap_runs["sync"], pmap_runs["pmap"]
    _assert_replicas_equal_reference(sync, pmap_runs["whole_batch"])
    # Not the per-device normalisation of the test above: axis_name changed the step.
    assert max(rel(sync[k][0], per_device[k][0]) for k in sync) > 1e-3


def test_pmap_eval_with_mutable_false_equals_apply_in_eval_mode(pmap_runs):
    logits, ref = pmap_runs["eval"]["pmap"], pmap_runs["eval"]["reference"]
    assert logits.shape == (DEVICES * PER_DEVICE, CLASSES)
    assert rel(logits, ref) <= TOL64


# ----------------------------------------------------------------------------------------------
# The subprocess.


def _worker(out: str) -> None:
    import optax
    from jax import lax

    assert jax.device_count() == DEVICES, jax.devices()
    assert jax.config.jax_enable_x64
    dtype = jnp.float64
    model_cls = functools.partial(TINY, param_dtype=dtype)  # float64 parameters too, for exactness
    model = model_cls(num_classes=CLASSES, dtype=dtype)
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, jnp.ones((1, SIZE, SIZE, 3), model.dtype))
    tx = optax.sgd(0.1, momentum=0.9)
    n = DEVICES * PER_DEVICE
    keys = jax.random.split(jax.random.key(2), STEPS + 1)
    batches = [
        (
            jax.random.normal(k, (n, SIZE, SIZE, 3), dtype),
            jax.random.randint(jax.random.fold_in(k, 1), (n,), 0, CLASSES),
        )
        for k in keys
    ]

    def loss_and_grads(model, params, batch_stats, images, labels):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": batch_stats}, images, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_stats

    def pmap_step(model):
        def step(state, images, labels):
            params, batch_stats, opt_state = state
            loss, grads, new_stats = loss_and_grads(model, params, batch_stats, images, labels)
            grads = lax.pmean(grads, "batch")
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            batch_stats = lax.pmean(new_stats, "batch")  # after the update, as the trainer syncs
            return (params, batch_stats, opt_state), lax.pmean(loss, "batch")

        return jax.pmap(step, axis_name="batch")

    def shard(a):
        return a.reshape(DEVICES, PER_DEVICE, *a.shape[1:])

    def replicate(tree):
        return jax.tree.map(lambda a: jnp.stack([a] * DEVICES), tree)  # pmap shards axis 0

    def run_pmap(model):
        step = pmap_step(model)
        state = replicate((variables["params"], variables["batch_stats"], tx.init(variables["params"])))
        losses = []
        for images, labels in batches[:STEPS]:
            state, loss = step(state, shard(images), shard(labels))
            losses.append(loss[0])
        return state, np.array(losses)

    def reference_step(model, per_shard: bool):
        """One step on one device, without collectives: each shard's gradients and statistics
        averaged (``per_shard``), or those of the whole batch."""

        def step(state, images, labels):
            params, batch_stats, opt_state = state
            if per_shard:
                grads_of = jax.vmap(functools.partial(loss_and_grads, model), in_axes=(None, None, 0, 0))
                losses, grads, shard_stats = grads_of(params, batch_stats, shard(images), shard(labels))
                loss, grads, new_stats = jax.tree.map(lambda a: a.mean(0), (losses, grads, shard_stats))
            else:
                loss, grads, new_stats = loss_and_grads(model, params, batch_stats, images, labels)
                shard_stats = new_stats
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), new_stats, opt_state), loss, shard_stats

        return jax.jit(step)

    def run_reference(model, per_shard: bool):
        step = reference_step(model, per_shard)
        state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
        losses, first_stats = [], None
        for images, labels in batches[:STEPS]:
            state, loss, shard_stats = step(state, images, labels)
            losses.append(loss)
            first_stats = shard_stats if first_stats is None else first_stats
        return state, np.array(losses), first_stats

    (p, s, _), ref_losses, shard_stats = run_reference(model, per_shard=True)
    reference = {"params": p, "batch_stats": s}
    (p, s, _), pmap_losses = run_pmap(model)
    runs = {
        "init": variables,
        "pmap": {"params": p, "batch_stats": s},
        "reference": reference,
        "shard0": {"batch_stats": jax.tree.map(lambda a: a[0], shard_stats)},
        "losses": {"pmap": pmap_losses, "reference": ref_losses},
    }

    # Synchronised BatchNorm: the pmap step equals one step on the concatenated batch.
    (p, s, _), _ = run_pmap(model_cls(num_classes=CLASSES, dtype=dtype, axis_name="batch"))
    runs["sync"] = {"params": p, "batch_stats": s}
    (p, s, _), _, _ = run_reference(model, per_shard=False)
    runs["whole_batch"] = {"params": p, "batch_stats": s}

    # The trainer's eval step, on the trained replicas, against a plain eval-mode apply.
    trained = {"params": runs["pmap"]["params"], "batch_stats": runs["pmap"]["batch_stats"]}
    evaluate = jax.pmap(lambda v, x: model.apply(v, x, train=False, mutable=False), axis_name="batch")
    images = batches[STEPS][0]
    logits = evaluate(trained, shard(images)).reshape(n, CLASSES)
    unreplicated = jax.tree.map(lambda a: a[0], trained)
    reference = jax.jit(lambda v, x: model.apply(v, x, train=False))(unreplicated, images)
    runs["eval"] = {"pmap": logits, "reference": reference}

    flat = {}
    for name, tree in runs.items():
        for path, leaf in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items():
            flat[f"{name}|{path}"] = np.asarray(leaf)
    np.savez(out, **flat)


if __name__ == "__main__":
    _worker(sys.argv[1])
