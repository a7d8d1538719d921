"""The pure train and eval steps, and the two data-parallel drivers that wrap them.

The step functions know nothing about devices: ``train_step(state, batch) -> (state, metrics)``
is plain JAX. Parallelism is added from outside by one of two drivers, which wrap the *same*
function:

* ``jit_train_step(train_step, mesh)``: ``jax.jit`` over a 1-D ``Mesh`` whose axis is ``'data'``.
  The batch is sharded along ``'data'``, the state is replicated and donated. XLA inserts the
  gradient all-reduce and makes BatchNorm statistics global, so the model is built with
  ``axis_name=None``. Runs unchanged on one host or many (multi-controller JAX). The mesh comes
  from ``resnet_jax.sharding.make_data_mesh(..., process_ordered=True)``; its axis is ``Auto``
  (the compiler propagates shardings) or ``Explicit`` (shardings are part of the array types,
  JAX 0.10+'s default for ``jax.make_mesh``; parameters replicated, gradients reduced over
  ``'data'`` as JAX's "Autodiff and sharding" guide has it).
* ``pmap_train_step(train_step)``: ``jax.pmap`` over the local devices with axis ``'batch'``
  (``PMAP_AXIS``). Build the step with ``make_train_step(..., axis_name=PMAP_AXIS)`` and the model
  with ``axis_name=PMAP_AXIS`` so gradients, metrics and BatchNorm statistics are averaged.

Public API (stable; also used by benchmark scripts)::

    state = create_train_state(rng, model, tx, input_shape, dynamic_scale=False)
    train_step = make_train_step(model, tx, label_smoothing=0.1, axis_name=None, lr_schedule=f,
                                 input_stats=(mean, std))
    eval_step = make_eval_step(model, axis_name=None, input_stats=(mean, std))
    mesh = make_data_mesh(explicit=False, process_ordered=True)  # all devices, axis 'data'
    step = jit_train_step(train_step, mesh)             # or pmap_train_step(train_step)
    driver = JitDriver(mesh) / PmapDriver()             # placement of state and batches
    state = driver.place_state(state); batch = driver.place_batch(host_batch)
    state, metrics = step(state, batch)

Batches are dicts ``{'image': [B, H, W, C], 'label': [B] int}``: float images are taken as
normalised, ``uint8`` images as pixels that the step normalises with ``input_stats=(mean, std)``
(per channel, 0..255 units) on the device; eval batches may add
``'mask'`` ([B], 1 for real examples, 0 for padding). Train metrics are batch means
(``loss``, ``accuracy``, ``top5_accuracy``, ``learning_rate``, ``grad_norm``, and with float16
loss scaling ``loss_scale`` and ``skipped_step``); eval metrics are sums
(``loss_sum``, ``correct``, ``correct_top5``, ``count``) so that padded, uneven last batches
average correctly; ``summarize_eval`` turns accumulated sums into means.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.sharding import DATA_AXIS, is_explicit, make_data_mesh

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]

PMAP_AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays only (easy to checkpoint).

    The model and optimizer are not stored here: the step functions close over them, so the
    state can be donated, sharded and saved without static fields getting in the way.
    ``dynamic_scale`` is ``None`` unless float16 loss scaling is on.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    dynamic_scale: DynamicScale | None = None

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: Sequence[int],
    *,
    dynamic_scale: bool = False,
    init_model: nn.Module | None = None,
) -> TrainState:
    """Initialise parameters, BatchNorm statistics and optimizer state.

    ``input_shape`` is one example batch's shape ``[B, H, W, C]`` (B can be 1). Pure and
    jittable: the drivers call it under ``jax.jit`` to create the state directly on device.
    ``init_model`` (same variables, other dtypes) draws the initial values instead, cast to
    ``model``'s dtypes: a float64 twin starts from its float32 run's exact initial values.

    Args:
        rng: PRNG key of the initialisation.
        model: The Linen model to train.
        tx: The optimizer; its state is initialised from the parameters.
        input_shape: One example batch's shape ``[B, H, W, C]``.
        dynamic_scale: Add a ``DynamicScale`` (loss scaling, for float16).
        init_model: A model with the same variables in other dtypes that draws the initial
            values; None: ``model`` draws them.
    """
    x = jnp.zeros(tuple(input_shape), jnp.float32)
    variables = (init_model or model).init(rng, x, train=False)
    if init_model is not None:
        like = jax.eval_shape(functools.partial(model.init, train=False), rng, x)
        variables = jax.tree.map(lambda v, s: v.astype(s.dtype), variables, like)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        dynamic_scale=DynamicScale() if dynamic_scale else None,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
    num_classes = logits.shape[-1]
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 for a float64 run
    targets = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(dtype), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 where ``labels`` is among the ``k`` largest logits, else 0.0."""
    k = min(k, logits.shape[-1])
    if k == 1:
        return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


InputStats = tuple[Sequence[float], Sequence[float]]


def model_input(images: jax.Array, input_stats: InputStats | None) -> jax.Array:
    """The model's input: ``uint8`` pixels normalised as ``(x - mean) / std``; floats unchanged."""
    if images.dtype != jnp.uint8:
        return images
    if input_stats is None:
        raise ValueError(
            "this batch holds uint8 pixels but the step has no normalisation statistics; build it "
            "with input_stats=(mean, std) (the dataset's info.mean and info.std) or feed "
            "normalised float images."
        )
    mean, std = (jnp.asarray(v, jnp.float32) for v in input_stats)
    return (images.astype(jnp.float32) - mean) / std


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    axis_name: str | None = None,
    lr_schedule: optax.Schedule | None = None,
    input_stats: InputStats | None = None,
) -> StepFn:
    """Return the pure ``train_step(state, batch) -> (state, metrics)``.

    One step: forward in train mode (BatchNorm batch statistics, running averages updated),
    loss, gradients, optax update. ``axis_name`` is the pmap axis to average gradients and metrics
    over (None under jit, where the batch is one global array). ``input_stats`` normalises
    ``uint8`` batches (``model_input``). With ``state.dynamic_scale`` set
    the loss is scaled for float16, and a step with non-finite gradients is skipped while the
    scale shrinks.

    Args:
        model: The Linen model, called with ``train=True``.
        tx: The optimizer.
        label_smoothing: Label smoothing of the cross-entropy loss (0: none).
        axis_name: The pmap axis; None under jit.
        lr_schedule: Adds the step's learning rate to the metrics; None leaves it out.
        input_stats: ``(mean, std)`` per channel on the 0-255 pixel scale (the dataset's
            ``info.mean``, ``info.std``), normalising ``uint8`` batches on the device; None:
            batches must hold normalised floats.
    """

    def loss_fn(params, batch_stats, batch):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            model_input(batch["image"], input_stats),
            train=True,
            mutable=["batch_stats"],
        )
        loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, updates["batch_stats"])

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if state.dynamic_scale is not None:
            # DynamicScale pmeans the gradients itself when given the axis.
            grad_fn = state.dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name=axis_name)
            dynamic_scale, is_finite, (loss, (logits, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, batch
            )
        else:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch)
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            dynamic_scale, is_finite = None, None

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            dynamic_scale=dynamic_scale,
        )
        if is_finite is not None:
            # Keep the old parameters and optimizer state when the scaled gradients overflowed.
            keep = lambda new, old: jnp.where(is_finite, new, old)
            new_state = new_state.replace(
                params=jax.tree.map(keep, params, state.params),
                opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                batch_stats=jax.tree.map(keep, batch_stats, state.batch_stats),
            )

        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(topk_correct(logits, batch["label"], 1)),
            "top5_accuracy": jnp.mean(topk_correct(logits, batch["label"], 5)),
        }
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        # Gradients are already averaged over devices here; the loop checks this for NaN/Inf.
        metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
        if is_finite is not None:
            # 1.0 for a float16 step skipped (and the loss scale lowered) on overflow.
            metrics["skipped_step"] = 1.0 - is_finite.astype(jnp.float32)
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        if dynamic_scale is not None:
            metrics["loss_scale"] = dynamic_scale.scale
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module, *, axis_name: str | None = None, input_stats: InputStats | None = None
) -> Callable[[TrainState, Batch], Metrics]:
    """Return the pure ``eval_step(state, batch) -> sums`` (running BatchNorm statistics).

    Returns sums over the real examples (``batch['mask']`` weights, default all ones) of the
    unsmoothed loss and of top-1/top-5 hits, plus their ``count``: sums, so that batches and
    hosts of any size combine, padding excluded, before the one division.

    Args:
        model: The Linen model, called with ``train=False``.
        axis_name: The pmap axis to sum over; None under jit.
        input_stats: ``(mean, std)`` normalising ``uint8`` batches, as for
            :func:`make_train_step`.
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        logits = model.apply(state.variables, model_input(batch["image"], input_stats), train=False)
        labels = batch["label"]
        mask = batch.get("mask")
        mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        sums = {
            "loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
            "correct": jnp.sum(topk_correct(logits, labels, 1) * mask),
            "correct_top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
            "count": jnp.sum(mask),
        }
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def summarize_eval(sums: Mapping[str, float]) -> dict[str, float]:
    """Turn accumulated eval sums into ``loss``, ``accuracy``, ``top5_accuracy``."""
    count = max(float(sums["count"]), 1.0)
    return {
        "loss": float(sums["loss_sum"]) / count,
        "accuracy": float(sums["correct"]) / count,
        "top5_accuracy": float(sums["correct_top5"]) / count,
        "num_examples": round(float(sums["count"])),
    }


# ----------------------------------------------------------------------------------------------
# Driver 1: jax.jit over a device mesh.


MESH_AXIS_TYPES = ("auto", "explicit")


def check_mesh_axis_types(mesh_axis_types: str, parallelism: str) -> None:
    """Raise ``ValueError`` (one sentence naming the fix) unless ``config.mesh_axis_types`` is
    ``'auto'`` or ``'explicit'``, and ``'explicit'`` only with ``parallelism='jit'``."""
    if mesh_axis_types not in MESH_AXIS_TYPES:
        raise ValueError(
            f"config.mesh_axis_types={mesh_axis_types!r} is not valid; "
            f"choose one of: {', '.join(MESH_AXIS_TYPES)}."
        )
    if mesh_axis_types == "explicit" and parallelism != "jit":
        raise ValueError(
            "config.mesh_axis_types='explicit' needs config.parallelism='jit': pmap has no mesh. "
            "Set --config.parallelism=jit, or leave mesh_axis_types at 'auto'."
        )


class _UnderMesh:
    """A jitted step traced and lowered with ``mesh`` as JAX's current mesh (``jax.set_mesh``),
    so arrays the step creates (``jnp.zeros``, random keys) live on its explicit axes too."""

    def __init__(self, jitted: Any, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def _under_mesh(jitted: Any, mesh: Mesh) -> Any:
    """``jitted`` itself on an auto-axes mesh; wrapped in :class:`_UnderMesh` on an explicit one."""
    if not is_explicit(mesh):
        return jitted
    return _UnderMesh(jitted, mesh)


def jit_train_step(train_step: StepFn, mesh: Mesh) -> StepFn:
    """``jax.jit`` of ``train_step``: batch sharded along ``'data'``, state replicated, donated."""
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA_AXIS))
    step = jax.jit(
        train_step,
        in_shardings=(replicated, data),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    return _under_mesh(step, mesh)


def jit_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
    """``jax.jit`` of ``eval_step`` with the batch sharded along ``'data'``."""
    replicated = NamedSharding(mesh, P())
    step = jax.jit(
        eval_step,
        in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
        out_shardings=replicated,
    )
    return _under_mesh(step, mesh)


# ----------------------------------------------------------------------------------------------
# Driver 2: jax.pmap over the local devices.


def pmap_train_step(train_step: StepFn, axis_name: str = PMAP_AXIS) -> StepFn:
    """``jax.pmap`` of ``train_step`` (built with the same ``axis_name``); state donated.

    Inputs carry a leading local-device axis: state replicated, batch ``[n_dev, B/n_dev, ...]``.
    """
    return jax.pmap(train_step, axis_name=axis_name, donate_argnums=(0,))


def pmap_eval_step(eval_step: Callable, axis_name: str = PMAP_AXIS) -> Callable:
    """``jax.pmap`` of ``eval_step`` (built with the same ``axis_name``)."""
    return jax.pmap(eval_step, axis_name=axis_name)


# ----------------------------------------------------------------------------------------------
# Placement helpers: what each driver needs on the way in and out.


class JitDriver:
    """Places state and host batches for ``jit_train_step`` on ``mesh`` (one host or many)."""

    parallelism = "jit"

    def __init__(self, mesh: Mesh | None = None):
        self.mesh = make_data_mesh(explicit=False, process_ordered=True) if mesh is None else mesh
        self.replicated = NamedSharding(self.mesh, P())
        self.data = NamedSharding(self.mesh, P(DATA_AXIS))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def axis_types(self) -> str:
        """``'explicit axes'`` or ``'auto axes'``: the kind of mesh the steps run over."""
        return "explicit axes" if is_explicit(self.mesh) else "auto axes"

    def train_step(self, train_step: StepFn) -> StepFn:
        return jit_train_step(train_step, self.mesh)

    def eval_step(self, eval_step: Callable) -> Callable:
        return jit_eval_step(eval_step, self.mesh)

    def init_state(self, create_fn: Callable[[], TrainState]) -> TrainState:
        """Run ``create_fn`` (e.g. a partial of ``create_train_state``), replicate on the mesh.

        It runs on one device and is then copied: random number generators other than
        threefry (e.g. ``rbg``) give values that depend on how a computation is partitioned,
        and the initial parameters must not depend on the device or host count.
        """
        return self.place_state(jax.device_get(jax.jit(create_fn)()))

    def place_state(self, host_state: PyTree) -> PyTree:
        """Numpy (or single-device) state -> replicated global arrays."""
        return jax.tree.map(lambda x: _replicate_global(np.asarray(x), self.replicated), host_state)

    def place_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows of the global batch -> one global array sharded along ``'data'``."""
        return {
            k: jax.make_array_from_process_local_data(self.data, np.asarray(v)) for k, v in host_batch.items()
        }

    def to_host(self, tree: PyTree) -> PyTree:
        """Replicated device arrays -> numpy (this host's copy; no cross-host traffic)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class PmapDriver:
    """Places state and host batches for ``pmap_train_step`` on this host's devices."""

    parallelism = "pmap"

    def __init__(self, axis_name: str = PMAP_AXIS):
        self.axis_name = axis_name
        self.devices = jax.local_devices()
        mesh = Mesh(np.array(self.devices), (axis_name,))
        self.stacked = NamedSharding(mesh, P(axis_name))

    axis_types = "pmap"

    @property
    def num_devices(self) -> int:
        return jax.device_count()

    def train_step(self, train_step: StepFn) -> StepFn:
        return pmap_train_step(train_step, self.axis_name)

    def eval_step(self, eval_step: Callable) -> Callable:
        return pmap_eval_step(eval_step, self.axis_name)

    def init_state(self, create_fn: Callable[[], TrainState]) -> TrainState:
        return self.place_state(self.to_host(jax.jit(create_fn)(), replicated=False))

    def place_state(self, host_state: PyTree) -> PyTree:
        """Numpy state -> one copy per local device (leading device axis)."""
        n = len(self.devices)

        def put(x):
            x = np.asarray(x)
            return jax.device_put(np.broadcast_to(x, (n,) + x.shape), self.stacked)

        return jax.tree.map(put, host_state)

    def place_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """``[B_host, ...]`` -> ``[n_local_devices, B_host / n, ...]`` on the local devices."""
        n = len(self.devices)

        def put(x):
            x = np.asarray(x)
            return jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]), self.stacked)

        return {k: put(v) for k, v in host_batch.items()}

    def to_host(self, tree: PyTree, replicated: bool = True) -> PyTree:
        """Per-device copies -> numpy (the first device's copy)."""
        if replicated:
            return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
        return jax.tree.map(np.asarray, tree)


def _replicate_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every host passes the same value; each puts it on its own devices only, so this also works
    # when the mesh spans several processes.
    shards = [jax.device_put(x, d) for d in sharding.addressable_devices]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def make_driver(
    parallelism: str, mesh: Mesh | None = None, mesh_axis_types: str = "auto"
) -> JitDriver | PmapDriver:
    """The driver that places state and batches and runs the steps for ``parallelism``.

    Args:
        parallelism: ``'jit'`` (a :class:`JitDriver`) or ``'pmap'`` (a :class:`PmapDriver`).
        mesh: The jit driver's mesh; None: a data mesh over all devices, ordered by process (so
            each host feeds its own slice of the batch). Unused by pmap.
        mesh_axis_types: ``'auto'`` or ``'explicit'`` axis types for a mesh built here;
            ``'explicit'`` needs ``'jit'``.
    """
    check_mesh_axis_types(mesh_axis_types, parallelism)
    if parallelism == "jit":
        if mesh is None:
            mesh = make_data_mesh(explicit=mesh_axis_types == "explicit", process_ordered=True)
        return JitDriver(mesh)
    if parallelism == "pmap":
        return PmapDriver()
    raise ValueError(f"parallelism must be 'jit' or 'pmap'; got {parallelism!r}.")
