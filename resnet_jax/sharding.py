"""Data-parallel meshes, and the conv/matmul that let the models train under explicit axes.

:func:`conv_general_dilated` and :func:`dot_general`, which every conv and dense layer of
``resnet_jax`` uses, cast the kernel to replicated on the mesh of its input
(:func:`replicated_like`), so that a parameter never placed on an explicit mesh still has a
typed gradient; outside explicit meshes the cast is a no-op. docs/sharding.md says which mesh
to use, and why.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import conv_grad

DATA_AXIS = "data"


def make_data_mesh(
    n_devices: Optional[int] = None,
    *,
    explicit: bool = True,
    devices: Optional[Sequence[jax.Device]] = None,
    axis_name: str = DATA_AXIS,
    process_ordered: bool = False,
    num_slices: int = 0,
) -> Mesh:
    """A 1-D mesh ``(axis_name,)`` over ``devices`` (default: the first ``n_devices``, or all).

    ``explicit=True`` gives ``AxisType.Explicit`` (shardings in types; JAX 0.10+'s default for
    ``jax.make_mesh``), ``False`` gives ``AxisType.Auto`` (the compiler propagates shardings, as a
    plain ``jax.sharding.Mesh``). The axis type is always passed, so the result is the same on
    every JAX version that has explicit sharding.

    ``process_ordered=True`` orders the devices by (process, id) and keeps that order (no
    topology reordering by ``jax.make_mesh``), so each host's devices hold one contiguous slice of
    the global batch: what ``jax.make_array_from_process_local_data`` fills from each host's
    local batch in multi-host training.

    Args:
        n_devices: Use the first ``n_devices`` of ``jax.devices()``; None uses all. With
            ``devices`` it must equal their number.
        explicit: Explicit axis type (True) or Auto (False).
        devices: The devices to use; None means ``jax.devices()``.
        axis_name: The mesh axis's name; batch shardings (:func:`shard_batch`) name it.
        process_ordered: Keep one contiguous slice of devices per process (multi-host input).
        num_slices: With ``process_ordered``, the number of TPU slices (Multislice) the devices
            must form; 0 takes it from the devices' ``slice_index``. See :func:`slice_major_order`.
    """
    if devices is None:
        devices = jax.devices()
        if n_devices is not None:
            if not 0 < n_devices <= len(devices):
                raise ValueError(f"n_devices must be between 1 and {len(devices)}; got {n_devices}.")
            devices = devices[:n_devices]
    elif n_devices is not None and n_devices != len(devices):
        raise ValueError(f"n_devices={n_devices} but {len(devices)} devices were given.")
    kind = AxisType.Explicit if explicit else AxisType.Auto
    if process_ordered:
        ordered = slice_major_order(devices, num_slices)
        return Mesh(np.array(ordered), (axis_name,), axis_types=(kind,))
    return jax.make_mesh((len(devices),), (axis_name,), axis_types=(kind,), devices=devices)


def slice_major_order(devices: Sequence[Any], num_slices: int = 0) -> list[Any]:
    """``devices`` ordered by (``slice_index``, ``process_index``, ``id``): the hybrid data mesh.

    Data parallel within a slice over ICI and across slices over DCN, as MaxText's
    ``dcn_data_parallelism`` lays it out (``mesh_utils.create_hybrid_device_mesh``): the slice is
    the outer (DCN) part of the one ``'data'`` axis, so each slice holds one contiguous block of
    the batch, and within it each host one contiguous block (what
    ``jax.make_array_from_process_local_data`` fills). The TPU compiler then reduces the
    gradient within each slice over ICI and across slices over DCN (the Megascale transfers of
    the compiled program). Devices without ``slice_index`` (CPU, GPU, one slice) are one slice.

    Args:
        devices: The devices of the mesh.
        num_slices: The slices they must form; 0: as many as their ``slice_index`` values. On
            devices of one slice, N > 1 is accepted when N divides their number (a test of a
            multi-slice config on one machine); the order is then the one-slice order.

    Raises:
        ValueError: ``num_slices`` disagrees with the devices' slices, or the slices differ in size.
    """
    slices: dict[int, int] = {}
    for d in devices:
        index = int(getattr(d, "slice_index", 0) or 0)
        slices[index] = slices.get(index, 0) + 1
    if num_slices < 0:
        raise ValueError(f"num_slices must be >= 0 (0: from the devices); got {num_slices}.")
    if len(slices) > 1 and num_slices and num_slices != len(slices):
        raise ValueError(f"num_slices={num_slices} but the devices form {len(slices)} slices.")
    if len(set(slices.values())) > 1:
        raise ValueError(f"the slices have different device counts: {dict(sorted(slices.items()))}.")
    if len(slices) == 1 and num_slices > 1 and len(devices) % num_slices:
        raise ValueError(f"num_slices={num_slices} does not divide the {len(devices)} devices.")
    return sorted(devices, key=lambda d: (int(getattr(d, "slice_index", 0) or 0), d.process_index, d.id))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` (parameters, BatchNorm statistics, optimizer state) on ``mesh``,
    replicated: ``jax.device_put(tree, NamedSharding(mesh, P()))``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Every array of ``tree`` split along its leading (batch) axis over ``axis_name``.

    Args:
        tree: Arrays whose leading axis is the global batch, divisible by the axis's size.
        mesh: The mesh to place them on, e.g. from :func:`make_data_mesh`.
        axis_name: The mesh axis to split the batch over.
    """
    return jax.device_put(tree, NamedSharding(mesh, P(axis_name)))


def is_explicit(mesh: Any) -> bool:
    """Whether ``mesh`` (concrete or abstract) has at least one explicit axis."""
    return not mesh.empty and AxisType.Explicit in tuple(mesh.axis_types)


def replicated_like(kernel: jax.Array, x: jax.Array) -> jax.Array:
    """``kernel`` replicated over the mesh of ``x`` when that mesh has explicit axes, else as is."""
    mesh = jax.typeof(x).sharding.mesh
    if not is_explicit(mesh):
        return kernel
    current = jax.typeof(kernel).sharding
    # Already a full copy on every device of the mesh (replicated, or `reduced` by a caller who
    # wants unreduced gradients): use as is.
    partitions = getattr(current.spec, "partitions", current.spec)
    if current.mesh == mesh and all(p is None for p in partitions):
        return kernel
    return jax.sharding.reshard(kernel, NamedSharding(mesh, P()))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """``lax.conv_general_dilated`` with the kernel replicated over the input's explicit mesh,
    and its weight gradient as matmuls where the program runs on XLA:CPU (``conv_grad``)."""
    rhs = replicated_like(rhs, lhs)
    out = None if is_explicit(jax.typeof(lhs).sharding.mesh) else conv_grad.conv(lhs, rhs, *args, **kwargs)
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs) if out is None else out


def dot_general(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """``lax.dot_general`` with the kernel replicated over the input's explicit mesh."""
    return jax.lax.dot_general(lhs, replicated_like(rhs, lhs), *args, **kwargs)
