"""The JAX contenders of ``python -m benchmarks.train_step``: the training program's step for a
Linen model (the library's, or the minimal one), and the ``resnet_jax.nnx`` model trained with
``nnx.Optimizer``; all on the same synthetic batch, generated on the devices.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.step_common import (
    LABEL_SMOOTHING,
    LEARNING_RATE,
    MOMENTUM,
    RECIPE_EMA_DECAY,
    STARTED,
    WEIGHT_DECAY,
    Contender,
)
from benchmarks.step_flops import forward_macs_per_image, xla_flops
from resnet_jax.sharding import DATA_AXIS, make_data_mesh
from train import compile_cache, ema, optim, parallel, steps


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first device so far (None where the backend keeps no stats)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled executable (argument, output, alias and temp bytes)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
    )
    return {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f)) for f in fields if hasattr(m, f)}


def make_optimizer() -> optax.GradientTransformation:
    """The ImageNet recipe's optimizer at a constant learning rate (the schedule costs nothing)."""
    sgd = optax.sgd(LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY, mask=optim.decay_mask), sgd)


def synthetic_batch(args: argparse.Namespace, sharding: NamedSharding) -> dict[str, jax.Array]:
    """The timed batch, generated on the devices of ``sharding`` (the same for every JAX contender)."""

    @functools.partial(jax.jit, out_shardings=sharding)
    def make(key):
        k1, k2 = jax.random.split(key)
        size = args.image_size
        return {
            "image": jax.random.normal(k1, (args.batch, size, size, 3), jnp.float32),
            "label": jax.random.randint(k2, (args.batch,), 0, args.num_classes, jnp.int32),
        }

    return jax.block_until_ready(make(jax.random.key(args.seed + 1)))


class JaxContender(Contender):
    """The training program's step for ``model``, jitted over a mesh of all devices."""

    compiler_options: dict[str, str] | None = None  # XLA options for this contender's compile

    def __init__(self, name: str, model: Any, args: argparse.Namespace):
        self.name = name
        self.model = model
        self.args = args

    def prepare(self) -> dict[str, Any]:
        args = self.args
        mesh = make_data_mesh(explicit=False, process_ordered=True)
        if args.batch % mesh.size:
            raise SystemExit(f"--batch {args.batch} must divide by the {mesh.size} devices.")
        tx = make_optimizer()
        init_s = self._init_state(mesh, tx)
        data = NamedSharding(mesh, P(DATA_AXIS))
        self.batch = synthetic_batch(args, data)
        compile_times, cache = self._compile(mesh, data, tx)

        first = time.perf_counter()
        self._run_one()
        first_step_s = time.perf_counter() - first
        self.first_step_done_s = time.perf_counter() - STARTED
        for _ in range(max(args.warmup - 1, 0)):
            self._run_one()

        info = {
            "init_time_s": init_s,
            **compile_times,
            "first_step_time_s": first_step_s,
            "process_time_to_first_step_s": self.first_step_done_s,
            "donate_state": not args.no_donate,
            "forward_macs_per_image": forward_macs_per_image(self.model, args.image_size),
            "xla_flops_per_step": xla_flops(self.step),
            "compiled_memory": compiled_memory(self.step),
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(self.state.params))),
        }
        if cache is not None:
            info["compilation_cache"] = cache
        return info

    def _init_state(self, mesh: Mesh, tx: optax.GradientTransformation) -> float:
        """Create the replicated train state in ``self.state``; the seconds it took."""
        size = self.args.image_size
        driver = parallel.JitDriver(mesh)
        # rbg keys: the initial values do not matter here and threefry init compiles ~2x slower.
        create_fn = functools.partial(
            steps.create_train_state,
            jax.random.key(self.args.seed, impl="rbg"),
            self.model,
            tx,
            (1, size, size, 3),
            dynamic_scale=self.args.dtype == "float16",
        )
        t = time.perf_counter()
        self.state = driver.init_state(self.create_state(create_fn))
        jax.block_until_ready(self.state)
        return time.perf_counter() - t

    def create_state(self, create_fn: Callable[[], Any]) -> Callable[[], Any]:
        """The state factory the timed step needs (the plain train state here)."""
        return create_fn

    def train_step(self, tx: optax.GradientTransformation) -> Callable[..., Any]:
        """The pure step timed: the training program's, with the benchmark's loss."""
        return steps.make_train_step(self.model, tx, label_smoothing=LABEL_SMOOTHING)

    def _compile(
        self, mesh: Mesh, data: NamedSharding, tx: optax.GradientTransformation
    ) -> tuple[dict[str, float], dict[str, Any] | None]:
        """Lower and compile the step into ``self.step``: its times, and what the cache gained."""
        train_step = self.train_step(tx)
        if self.args.no_donate:
            replicated = NamedSharding(mesh, P())
            jitted = jax.jit(
                train_step, in_shardings=(replicated, data), out_shardings=(replicated, replicated)
            )
        else:
            jitted = parallel.jit_train_step(train_step, mesh)

        cache_dir = jax.config.jax_compilation_cache_dir
        entries_before = compile_cache.cache_entries(cache_dir) if cache_dir else None
        t = time.perf_counter()
        lowered = jitted.lower(self.state, self.batch)
        t_lower = time.perf_counter()
        self.step = lowered.compile(compiler_options=self.compiler_options)
        t_compile = time.perf_counter()
        entries_after = compile_cache.cache_entries(cache_dir) if cache_dir else None

        times = {
            "lower_time_s": t_lower - t,
            "xla_compile_time_s": t_compile - t_lower,
            "compile_time_s": t_compile - t,
        }
        if not cache_dir:
            return times, None
        return times, {
            "dir": cache_dir,
            "entries_before_compile": entries_before,
            "entries_after_compile": entries_after,
            # New entries mean the step was compiled and written, i.e. a cache miss.
            "step_was_cached": entries_before is not None and entries_after == entries_before,
        }

    def _run_one(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t

    def timed_steps(self, n: int) -> list[float]:
        return [self._run_one() for _ in range(n)]

    def pipelined(self, n: int) -> float:
        """Mean step time of ``n`` steps dispatched back to back with one sync at the end."""
        jax.block_until_ready(self.state)
        t = time.perf_counter()
        for _ in range(n):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - t) / n


class RecipeContender(JaxContender):
    """The training program's step with a recipe's extras on, beside the plain one on the same
    batch and optimizer: ``recipe=True`` adds timm's BCE loss, drop path (the model must have a
    ``drop_path_rate``) and an EMA of the weights and statistics updated every step;
    ``grad_accum_steps=k`` takes the batch as k micro-batches (``train/accum.py``)."""

    def __init__(
        self, name: str, model: Any, args: argparse.Namespace, *, recipe: bool, grad_accum_steps: int = 1
    ):
        super().__init__(name, model, args)
        self.recipe, self.grad_accum_steps = recipe, grad_accum_steps

    def create_state(self, create_fn: Callable[[], Any]) -> Callable[[], Any]:
        return ema.with_ema(create_fn) if self.recipe else create_fn

    def train_step(self, tx: optax.GradientTransformation) -> Callable[..., Any]:
        kwargs: dict[str, Any] = {
            "label_smoothing": LABEL_SMOOTHING,
            "grad_accum_steps": self.grad_accum_steps,
            "grad_accum_unroll": jax.default_backend() == "cpu",  # as train.build does
        }
        if self.recipe:
            kwargs.update(loss="bce", dropout_rng=jax.random.key(self.args.seed + 2, impl="rbg"))
        step = steps.make_train_step(self.model, tx, **kwargs)
        return ema.wrap_train_step(step, ema.EmaSchedule(decay=RECIPE_EMA_DECAY)) if self.recipe else step


def nnx_train_step(model: Any, optimizer: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One NNX step with the training program's loss and metrics; updates ``model`` in place."""
    from flax import nnx

    def loss_fn(model):
        logits = model(batch["image"])
        loss = jnp.mean(steps.cross_entropy(logits, batch["label"], LABEL_SMOOTHING))
        return loss, logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return {
        "loss": loss,
        "accuracy": jnp.mean(steps.topk_correct(logits, batch["label"], 1)),
        "top5_accuracy": jnp.mean(steps.topk_correct(logits, batch["label"], 5)),
        "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
    }


class ElementwiseMaxPoolContender(JaxContender):
    """The library's step with the stem's max-pool swapped for another (``pool``, an attribute
    of ``resnet_jax.ops``): by default ``max_pool_3x3_elementwise`` (its backward made of
    elementwise ops, a custom VJP), or ``_max_pool_3x3_xla`` (XLA's ``select_and_scatter``, what
    GPUs and TPUs run). Swapped only while this contender traces and compiles."""

    def __init__(
        self, name: str, model: Any, args: argparse.Namespace, pool: str = "max_pool_3x3_elementwise"
    ):
        super().__init__(name, model, args)
        self.pool = pool

    def prepare(self) -> dict[str, Any]:
        from resnet_jax import ops

        library_pool = ops.max_pool_3x3
        ops.max_pool_3x3 = getattr(ops, self.pool)
        try:
            return super().prepare()
        finally:
            ops.max_pool_3x3 = library_pool


@contextlib.contextmanager
def _conv_grad_mode(value: str | None) -> Iterator[None]:
    """``$RESNET_JAX_CPU_CONV_GRAD`` set to ``value`` while a contender traces (None: as it is),
    then put back as it was. ``resnet_jax.conv_grad`` reads it while tracing."""
    from resnet_jax import conv_grad

    before = os.environ.get(conv_grad.ENV_VAR)
    if value is not None:
        os.environ[conv_grad.ENV_VAR] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(conv_grad.ENV_VAR, None)
        else:
            os.environ[conv_grad.ENV_VAR] = before


class XlaConvGradContender(JaxContender):
    """The library's step with XLA's own convolution weight gradient, as on a GPU or TPU
    (``RESNET_JAX_CPU_CONV_GRAD=0`` while this contender traces; ``resnet_jax.conv_grad``)."""

    def prepare(self) -> dict[str, Any]:
        with _conv_grad_mode("0"):
            return super().prepare()


class YnnContender(JaxContender):
    """The library's step compiled with XLA:CPU's YNNPACK on for the given fusion types (XLA's
    ``xla_cpu_experimental_ynn_fusion_type`` as a per-compile option, so it runs in the same
    process as the default, which ``import resnet_jax`` leaves without YNNPACK). With YNNPACK's
    convolutions it traces the step with the per-tap weight gradient, as ``resnet_jax.conv_grad``
    would choose in a process where YNNPACK runs them."""

    def __init__(self, name: str, model: Any, args: argparse.Namespace, types: list[str]):
        super().__init__(name, model, args)
        names = ",".join(f"LIBRARY_FUSION_TYPE_{t.strip().upper()}" for t in types)
        self.compiler_options = {"xla_cpu_experimental_ynn_fusion_type": names}
        self.taps = any(t.strip().upper() == "INDIVIDUAL_CONVOLUTION" for t in types)

    def prepare(self) -> dict[str, Any]:
        with _conv_grad_mode("taps" if self.taps else None):
            return {**super().prepare(), "compiler_options": self.compiler_options}


class NNXContender(Contender):
    """The same model from ``resnet_jax.nnx``, trained as NNX users write it: ``nnx.Optimizer``
    and a step with the same loss, optimizer and metrics as the training program's, state
    replicated over the same mesh. Two ways to compile it:

    * ``functional=False``: ``nnx.jit`` on ``(model, optimizer)`` (donated), the NNX tutorials'
      way. Every call flattens and unflattens the module graph in Python.
    * ``functional=True``: ``nnx.split`` once, then ``jax.jit`` of a pure function of the state
      that merges, steps and splits inside (Flax's advice for a hot loop): per call, a pytree.
    """

    def __init__(self, name: str, linen_model: Any, args: argparse.Namespace, functional: bool):
        self.name = name
        self.linen_model = linen_model
        self.args = args
        self.functional = functional

    def prepare(self) -> dict[str, Any]:
        from flax import nnx

        from resnet_jax import nnx as rnnx
        from resnet_jax import sharding

        args = self.args
        mesh = make_data_mesh(explicit=False, process_ordered=True)
        t = time.perf_counter()
        model = rnnx.from_linen(self.linen_model, rngs=nnx.Rngs(jax.random.key(args.seed, impl="rbg")))
        optimizer = nnx.Optimizer(model, make_optimizer(), wrt=nnx.Param)
        nnx.update((model, optimizer), sharding.replicate(nnx.state((model, optimizer)), mesh))
        model.train()
        jax.block_until_ready(nnx.state(model))
        init_s = time.perf_counter() - t
        self.batch = synthetic_batch(args, NamedSharding(mesh, P(DATA_AXIS)))

        self.call, desc = self._compiled_call(model, optimizer)
        t = time.perf_counter()
        self._run_one()  # both compile on the first call
        compile_and_first_step_s = time.perf_counter() - t
        for _ in range(max(args.warmup - 1, 0)):
            self._run_one()
        return {
            "init_time_s": init_s,
            "compile_and_first_step_time_s": compile_and_first_step_s,
            "step": "resnet_jax.nnx model, nnx.Optimizer(wrt=nnx.Param), " + desc,
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        }

    def _compiled_call(self, model: Any, optimizer: Any) -> tuple[Callable[[], Any], str]:
        """A function of no arguments that runs one step on ``self.batch``, and how it compiles."""
        from flax import nnx

        if self.functional:
            graphdef, self.state = nnx.split((model, optimizer))

            @functools.partial(jax.jit, donate_argnums=(0,))
            def pure_step(state, batch):
                model, optimizer = nnx.merge(graphdef, state)
                metrics = nnx_train_step(model, optimizer, batch)
                return nnx.state((model, optimizer)), metrics

            def call():
                self.state, metrics = pure_step(self.state, self.batch)
                return metrics

            return call, "nnx.split once; jax.jit(donate) of merge -> step -> split"

        jitted = nnx.jit(nnx_train_step, donate_argnums=(0, 1))

        def call():
            return jitted(model, optimizer, self.batch)

        return call, "nnx.jit(donate_argnums=(0, 1)) on (model, optimizer)"

    def _run_one(self) -> float:
        t = time.perf_counter()
        jax.block_until_ready(self.call())
        return time.perf_counter() - t

    def timed_steps(self, n: int) -> list[float]:
        return [self._run_one() for _ in range(n)]

    def pipelined(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            metrics = self.call()
        jax.block_until_ready(metrics)
        return (time.perf_counter() - t) / n
