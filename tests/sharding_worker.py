"""Subprocess helper for the multi-device NNX and explicit-sharding tests (not a test module).

The CPU device count must be fixed before JAX initialises, so each scenario runs in its own
process: ``python tests/sharding_worker.py MODE OUT --devices N`` (which the tests start with
``run_in_subprocess``). It records results in ``OUT`` (npz); the tests make the assertions.

* ``nnx_user``: what an NNX user writes: a bfloat16 ResNet, ``nnx.Optimizer(model,
  optax.sgd(...), wrt=nnx.Param)``, an ``nnx.jit`` train step on a batch sharded over ``'data'``,
  then eval mode.
* ``mesh_modes``: Linen and NNX ``ResNetBase([1, 1], [16, 32])``, 5 SGD steps under an
  explicit-axes mesh (parameters left where ``init`` put them, and replicated on the mesh) and
  under an auto-axes ``jax.sharding.Mesh``, and the auto run's float64 twin; plus what plain
  ``flax.linen.Conv`` does there.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def _spec(x) -> str:
    import jax

    return str(jax.typeof(x).sharding.spec)


def run_nnx_user(out: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from resnet_jax import nnx as rnnx
    from resnet_jax import sharding

    n = jax.device_count()
    mesh = sharding.make_data_mesh()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2 * n, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(np.arange(2 * n) % 4)
    x, y = sharding.shard_batch((x, y), mesh)

    model = rnnx.ResNet(
        stage_sizes=(1, 1),
        block="basic",
        num_classes=4,
        small_stem=True,
        dtype=jnp.bfloat16,
        rngs=nnx.Rngs(0),
    )
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    nnx.update((model, optimizer), sharding.replicate(nnx.state((model, optimizer)), mesh))
    stats0 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, logits, grads

    model.train()
    conv1_init = np.asarray(model.conv1.kernel[...])
    losses, grad_specs = [], set()
    for i in range(8):
        loss, logits, grads = train_step(model, optimizer, x, y)
        losses.append(float(loss))
        grad_specs |= {_spec(g) for g in jax.tree.leaves(grads)}
        if i == 0:
            bn1_step1 = {k: np.asarray(getattr(model.bn1, k)[...]) for k in ("mean", "var")}
    stats1 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

    model.eval()
    graphdef, state = nnx.split(model)
    # Eval as a pure function: the state goes in, only logits come out (nothing mutable).
    pure_eval = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    eval_logits = pure_eval(state, x)
    eval_again = nnx.jit(lambda model, x: model(x))(model, x)
    stats2 = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    features = model.features(x)

    def flat(prefix, tree):
        return {f"{prefix}|{'/'.join(map(str, p))}": np.asarray(v) for p, v in nnx.to_flat_state(tree)}

    params = nnx.state(model, nnx.Param)
    opt_leaves = jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
    np.savez(
        out,
        losses=np.asarray(losses),
        x=np.asarray(x),
        conv1_init=conv1_init,
        bn1_mean_step1=bn1_step1["mean"],
        bn1_var_step1=bn1_step1["var"],
        train_logits_dtype=str(logits.dtype),
        eval_logits=np.asarray(eval_logits),
        eval_again=np.asarray(eval_again),
        eval_logits_dtype=str(eval_logits.dtype),
        eval_logits_spec=_spec(eval_logits),
        feature_dtype=str(features["layer2"].dtype),
        param_dtypes=np.asarray(sorted({str(v.dtype) for v in jax.tree.leaves(params)})),
        opt_dtypes=np.asarray(sorted({str(v.dtype) for v in opt_leaves if v.ndim > 0})),
        param_specs=np.asarray(sorted({_spec(v) for v in jax.tree.leaves(params)})),
        grad_specs=np.asarray(sorted(grad_specs)),
        devices=n,
        **flat("stats0", stats0),
        **flat("stats1", stats1),
        **flat("stats2", stats2),
    )


def run_mesh_modes(out: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn
    from flax import nnx, traverse_util
    from jax.sharding import PartitionSpec as P

    import resnet_jax
    from resnet_jax import convert, sharding
    from resnet_jax import nnx as rnnx

    n = jax.device_count()
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(STEPS, 2 * n, 16, 16, 3)).astype(np.float32)
    ys = rng.integers(0, 32, size=(STEPS, 2 * n))
    linen_model = resnet_jax.ResNetBase([1, 1], [16, 32])
    init = linen_model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    tx = optax.sgd(0.02, momentum=0.9)
    results = {}

    def loss_of(features, labels):
        # The 32 pooled features serve as logits: the loss only has to exercise every layer.
        return optax.softmax_cross_entropy_with_integer_labels(features, labels).mean()

    def linen_run(mesh, place, model=linen_model, dtype=np.float32):
        params, stats = jax.tree.map(lambda v: jnp.asarray(v, dtype), (init["params"], init["batch_stats"]))
        opt_state = tx.init(params)
        if place:
            params, stats, opt_state = sharding.replicate((params, stats, opt_state), mesh)

        def loss_fn(params, stats, x, y):
            feats, upd = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return loss_of(feats, y), upd["batch_stats"]

        @jax.jit
        def step(params, stats, opt_state, x, y):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state, loss, grads

        specs = set()
        for i in range(STEPS):
            x, y = sharding.shard_batch((xs[i].astype(dtype), ys[i]), mesh)
            params, stats, opt_state, loss, grads = step(params, stats, opt_state, x, y)
            specs |= {_spec(g) for g in jax.tree.leaves(grads)}
        eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
            {"params": params, "batch_stats": stats}, sharding.shard_batch(xs[0].astype(dtype), mesh)
        )
        return {"params": params, "batch_stats": stats}, specs, eval_out

    def nnx_run(mesh, place):
        model = rnnx.from_linen(linen_model, rngs=nnx.Rngs(0))
        convert.linen_to_nnx(init, model)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        if place:
            nnx.update((model, optimizer), sharding.replicate(nnx.state((model, optimizer)), mesh))

        @nnx.jit
        def step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(lambda m: loss_of(m(x), y))(model)
            optimizer.update(model, grads)
            return loss, grads

        model.train()
        specs = set()
        for i in range(STEPS):
            loss, grads = step(model, optimizer, *sharding.shard_batch((xs[i], ys[i]), mesh))
            specs |= {_spec(g) for g in jax.tree.leaves(grads)}
        model.eval()
        eval_out = nnx.jit(lambda m, x: m(x))(model, sharding.shard_batch(xs[0], mesh))
        return convert.nnx_to_linen(model), specs, eval_out

    meshes = {
        "explicit": sharding.make_data_mesh(explicit=True),
        "auto": sharding.make_data_mesh(explicit=False),
    }
    runs = {"linen": linen_run, "nnx": nnx_run}
    # Unplaced parameters (left where init put them) are the case that needs resnet_jax's conv;
    # the auto-axes mesh with replicated parameters is the reference.
    for api, mode, place in [(a, "explicit", p) for a in runs for p in (False, True)] + [
        (a, "auto", True) for a in runs
    ]:
        variables, specs, eval_out = runs[api](meshes[mode], place)
        name = f"{api}-{mode}-{'replicated' if place else 'unplaced'}"
        for k, v in traverse_util.flatten_dict(variables).items():
            results[f"{name}|{'/'.join(k)}"] = np.asarray(v)
        results[f"{name}|grad_specs"] = np.asarray(sorted(specs))
        results[f"{name}|eval"] = np.asarray(eval_out)
    results["mesh_axis_types"] = np.asarray([str(m.axis_types) for m in meshes.values()])
    # The auto-axes Linen run's float64 twin (same initial values): float32's own error bounds
    # how far the float32 runs may differ by summation order alone.
    jax.config.update("jax_enable_x64", True)
    try:
        twin = resnet_jax.ResNetBase([1, 1], [16, 32], dtype=jnp.float64, param_dtype=jnp.float64)
        variables, _, eval_out = linen_run(meshes["auto"], True, twin, np.float64)
        for k, v in traverse_util.flatten_dict(variables).items():
            results[f"float64|{'/'.join(k)}"] = np.asarray(v)
        results["float64|eval"] = np.asarray(eval_out)
    finally:
        jax.config.update("jax_enable_x64", False)

    # The same step with plain flax.linen.Conv (no resnet_jax conv), parameters left unplaced.
    class PlainConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x))
            return nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x).mean(axis=(1, 2))

    plain = PlainConv()
    params = plain.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    mesh = meshes["explicit"]
    x = jax.device_put(xs[0], jax.sharding.NamedSharding(mesh, P("data")))
    grad = jax.jit(jax.grad(lambda p, x: plain.apply(p, x).sum()))
    for place in (False, True):
        try:
            grad(sharding.replicate(params, mesh) if place else params, x)
            results[f"plain_conv_{'replicated' if place else 'unplaced'}"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded for the test to inspect
            results[f"plain_conv_{'replicated' if place else 'unplaced'}"] = f"{type(e).__name__}: {e}"
    results["jax_version"] = jax.__version__
    np.savez(out, devices=n, **results)


def run_in_subprocess(mode: str, out: str, devices: int) -> None:
    """What the tests call: ``mode`` in a fresh process with ``devices`` CPU devices, results in
    ``out``; fails with the worker's output when it does."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.abspath(__file__), mode, out, "--devices", str(devices)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["nnx_user", "mesh_modes"])
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    import jax

    assert jax.device_count() == args.devices, jax.devices()
    {"nnx_user": run_nnx_user, "mesh_modes": run_mesh_modes}[args.mode](args.out)
    print("WORKER_DONE", args.mode)


if __name__ == "__main__":
    main()
