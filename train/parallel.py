"""The data-parallel drivers that wrap the pure steps of ``train/steps.py``, and placement.

Two drivers wrap the *same* step function:

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

    mesh = make_data_mesh(explicit=False, process_ordered=True)  # all devices, axis 'data'
    step = jit_train_step(train_step, mesh)             # or pmap_train_step(train_step)
    driver = JitDriver(mesh) / PmapDriver()             # placement of state and batches
    state = driver.place_state(state); batch = driver.place_batch(host_batch)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.sharding import DATA_AXIS, is_explicit, make_data_mesh
from train.steps import PyTree, StepFn, TrainState

PMAP_AXIS = "batch"


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
        # This host's devices in id order (jax.local_devices()' order), with Auto axes.
        mesh = make_data_mesh(devices=self.devices, explicit=False, axis_name=axis_name, process_ordered=True)
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
    parallelism: str, mesh: Mesh | None = None, mesh_axis_types: str = "auto", num_slices: int = 0
) -> JitDriver | PmapDriver:
    """The driver that places state and batches and runs the steps for ``parallelism``.

    Args:
        parallelism: ``'jit'`` (a :class:`JitDriver`) or ``'pmap'`` (a :class:`PmapDriver`).
        mesh: The jit driver's mesh; None: a data mesh over all devices, ordered by process (so
            each host feeds its own slice of the batch). Unused by pmap.
        mesh_axis_types: ``'auto'`` or ``'explicit'`` axis types for a mesh built here;
            ``'explicit'`` needs ``'jit'``.
        num_slices: TPU slices (Multislice) of a mesh built here; 0: from the devices'
            ``slice_index`` (``resnet_jax.sharding.slice_major_order``, as ``train.aot`` compiles).
    """
    check_mesh_axis_types(mesh_axis_types, parallelism)
    if parallelism == "jit":
        if mesh is None:
            mesh = make_data_mesh(
                explicit=mesh_axis_types == "explicit", process_ordered=True, num_slices=num_slices
            )
        return JitDriver(mesh)
    if parallelism == "pmap":
        if num_slices > 1:
            raise ValueError("config.num_slices > 1 needs config.parallelism='jit': pmap has no mesh.")
        return PmapDriver()
    raise ValueError(f"parallelism must be 'jit' or 'pmap'; got {parallelism!r}.")
