"""Subprocess helper for the multi-device and multi-host training tests (not a test module).

The device count must be fixed before JAX initialises, so each scenario runs in its own
process: ``python tests/train_worker.py MODE OUT [options]``.

* ``parallel OUT``: on 8 CPU devices, run the same 5 steps with the jit-over-mesh driver (auto
  axes), the pmap driver, a 1-device mesh, the jit driver over an explicit-axes mesh and over
  2 slices of 4 devices (``num_slices=2``), and the 1-device run in float64; save the six
  parameter trees to ``OUT`` (npz). Each step
  accumulates 2 micro-batches (``grad_accum_steps``), so the drivers also agree on which rows
  form each micro-batch and on BatchNorm's statistics per micro-batch.
* ``train OUT --devices N [--process-id I --num-processes P --port PORT]``: run
  ``train.loop.train_and_evaluate`` on a tiny digits config with workdir ``OUT``, optionally as
  process I of P (jax.distributed over 127.0.0.1:PORT, gloo CPU collectives).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    sys.path.insert(0, REPO)
    import runpy

    c = runpy.run_path(os.path.join(REPO, "configs", "default.py"))["get_config"]()
    c.model.arch = "resnet_base"
    c.model.overrides = {"n_blocks": (1, 1), "n_channels": (8, 16), "first_kernel_size": 3}
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_train_steps = 12
    # Small steps: runs that differ only in summation order must not diverge chaotically
    # (a ReLU or top-k flipping on a 1e-7 difference), so they stay comparable at 1e-5.
    c.learning_rate = 0.02
    c.log_every_steps = 4
    c.eval_every_steps = 6
    c.checkpoint_every_steps = 6
    c.progress_bar = False
    c.rng_impl = "rbg"  # threefry init takes ~10 s to compile on CPU; rbg well under 2 s
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def digits_eval_arrays(config):
    """The digits held-out images (float, unnormalised), labels, and the normalisation mean/std."""
    import numpy as np

    from train.data import registry

    src = registry.create_dataset(config).source
    return src.x_eval, src.y_eval, np.array(src.mean), np.array(src.std)


def eval_logits(config, variables, x, *, float64=False):
    """Eval-mode logits of ``config``'s model with ``variables`` on ``x``: float32, or with
    ``float64`` the float64 twin of that evaluation (tests/float_bounds)."""
    import numpy as np
    from float_bounds import float64_apply

    from train.data import registry
    from train.model import create_model

    info = registry.create_dataset(config).info
    if not float64:
        return np.asarray(create_model(config, info)[0].apply(variables, x, train=False))
    twin = config.copy_and_resolve_references()
    twin.dtype = "float64"
    return float64_apply(lambda: create_model(twin, info)[0], variables, x)


def run_parallel(out: str, steps_n: int = 5) -> None:
    import functools

    import jax
    import numpy as np
    import optax

    from resnet_jax.sharding import make_data_mesh
    from train import parallel, steps
    from train.model import build_model

    assert jax.device_count() == 8, jax.devices()
    # The training mesh (resnet_jax.sharding's factory): devices in (process, id) order whatever
    # order they come in, auto axes by default; 'explicit' only when asked for.
    shuffled = [jax.devices()[i] for i in (3, 0, 7, 1, 6, 2, 5, 4)]
    mesh = parallel.JitDriver(make_data_mesh(devices=shuffled, explicit=False, process_ordered=True)).mesh
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices()), mesh.devices
    assert parallel.JitDriver().mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert parallel.make_driver("jit", mesh_axis_types="explicit").mesh.axis_types == (
        jax.sharding.AxisType.Explicit,
    )
    model_cfg = {
        "arch": "resnet_base",
        "overrides": {"n_blocks": (1, 1), "n_channels": (8, 16), "first_kernel_size": 3},
    }
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.normal(size=(32, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 32).astype(np.int32),
        }
        for _ in range(steps_n)
    ]
    results = {}
    for name, driver, axis in (
        ("jit", parallel.JitDriver(), None),
        ("pmap", parallel.PmapDriver(), parallel.PMAP_AXIS),
        (
            "single",
            parallel.JitDriver(
                make_data_mesh(devices=jax.devices()[:1], explicit=False, process_ordered=True)
            ),
            None,
        ),
        ("explicit", parallel.make_driver("jit", mesh_axis_types="explicit"), None),
        # config.num_slices=2: the 8 devices as 2 slices of 4 (slice-major), as a Multislice run.
        ("two_slices", parallel.make_driver("jit", num_slices=2), None),
    ):
        model = build_model(model_cfg, 10, 3, axis_name=axis)
        tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.02, momentum=0.9, nesterov=True))
        create = functools.partial(
            steps.create_train_state, jax.random.key(0, impl="rbg"), model, tx, (1, 8, 8, 3)
        )
        state = driver.init_state(create)
        if name == "single":
            initial = driver.to_host(state)
        train_step = driver.train_step(
            steps.make_train_step(model, tx, label_smoothing=0.1, axis_name=axis, grad_accum_steps=2)
        )
        for b in batches:
            state, metrics = train_step(state, driver.place_batch(b))
        host = driver.to_host(state)
        flat = _flat(host, driver.to_host(metrics)["loss"])
        leaf = jax.tree.leaves(state.params)[0]
        # The state's array types carry the mesh: explicit axes for the explicit driver only.
        flat["explicit_types"] = np.asarray(jax.sharding.AxisType.Explicit in leaf.sharding.mesh.axis_types)
        results[name] = flat
    results["float64"] = _float64_reference(model_cfg, initial, batches)
    np.savez(out, **{f"{n}|{k}": v for n, d in results.items() for k, v in d.items()})


def _float64_reference(model_cfg, initial, batches):
    """The 1-device run again in float64 from the same initial values: the float32 runs may
    differ from each other by rounding only, so their differences are bounded by float32's own
    error against this reference (as the parity command does)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from train import steps
    from train.model import build_model

    jax.config.update("jax_enable_x64", True)
    try:
        cfg = {**model_cfg, "overrides": {**model_cfg["overrides"], "param_dtype": jnp.float64}}
        model = build_model(cfg, 10, 3, dtype=jnp.float64)
        tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.02, momentum=0.9, nesterov=True))
        wide = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)  # noqa: E731
        params = wide(initial.params)
        state = steps.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=wide(initial.batch_stats),
            opt_state=tx.init(params),
        )
        train_step = jax.jit(steps.make_train_step(model, tx, label_smoothing=0.1, grad_accum_steps=2))
        for b in batches:
            state, metrics = train_step(state, {"image": b["image"].astype(np.float64), "label": b["label"]})
        return _flat(jax.device_get(state), metrics["loss"])
    finally:
        jax.config.update("jax_enable_x64", False)


def _flat(host_state, loss):
    """``{'params[...]': array, 'batch_stats[...]': array, 'loss', 'step'}`` of a host state."""
    import jax
    import numpy as np

    flat = {}
    for kind in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(host_state, kind))[0]:
            flat[kind + jax.tree_util.keystr(path)] = np.asarray(leaf)
    flat["loss"] = np.asarray(loss)
    flat["step"] = np.asarray(host_state.step)
    return flat


def run_train(out: str, process_id: int, num_processes: int, port: int, overrides=()) -> None:
    import ast

    config = tiny_config(**{k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in overrides)})
    if num_processes > 1:
        config.distributed.enabled = True
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.num_processes = num_processes
        config.distributed.process_id = process_id
        config.distributed.cpu_collectives = "gloo"
    from train import loop
    from train.distributed import maybe_initialize_distributed

    maybe_initialize_distributed(config)
    import jax

    summary = loop.train_and_evaluate(config, out)
    print(
        "WORKER_DONE",
        summary["mesh_axis_types"].split()[0],
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        summary.get("eval"),
        summary["final_step"],
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("parallel", "train"))
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config FIELD=PYTHON_LITERAL")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    if args.mode == "parallel":
        run_parallel(args.out)
    else:
        run_train(args.out, args.process_id, args.num_processes, args.port, args.set)


if __name__ == "__main__":
    main()
