"""The key and leaf rules between PyTorch state_dicts and Flax variables.

A PyTorch key ``layer1.0.downsample.1.running_var`` is the Flax key
``('batch_stats', 'layer1_0', 'downsample_1', 'var')`` (module paths: ``names.linen_path``), and
each leaf has one rule: conv ``OIHW -> HWIO``, linear transposed, BatchNorm ``weight/bias ->
scale/bias`` and ``running_mean/var -> batch_stats mean/var``, ``num_batches_tracked`` dropped
(it only matters for ``momentum=None`` in PyTorch). NNX state paths are PyTorch's, so an NNX
model's variables take the same Flax keys (:func:`nnx_variables`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from resnet_jax import names
from resnet_jax.mismatch import StateDictMismatchError

_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array as a numpy array of its own (half precision widened to float32)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        # Copy: .numpy() shares memory, and a later in-place update of the torch model (an
        # optimizer step) must not change converted weights.
        return value.numpy().copy()
    arr = np.asarray(value)
    if arr.dtype.name in ("bfloat16", "float16"):  # half-precision files: widen, as for torch
        arr = arr.astype(np.float32)
    return arr


def shape(value: Any) -> tuple[int, ...]:
    """Shapes without a copy (torch tensors, numpy arrays, even PyTorch's meta tensors)."""
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def strip_wrappers(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Unwrap ``{'state_dict': ...}``/``{'model': ...}`` and DataParallel ``module.`` prefixes."""
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    if state_dict and all(k.startswith("module.") for k in state_dict):  # DataParallel / DDP
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def torch_leaves(state_dict: Mapping[str, Any]) -> tuple[dict, dict[tuple, str]]:
    """Flat ``{(collection, *path, leaf): array}`` plus the torch key each leaf came from."""
    flat, origin = {}, {}
    for key, value in state_dict.items():
        *prefix, leaf = key.split(".")
        if leaf == "num_batches_tracked":
            continue
        arr = to_numpy(value)
        path = names.linen_path(prefix)
        if leaf in _BN_STATS:
            target = ("batch_stats", *path, _BN_STATS[leaf])
        elif leaf == "bias":
            target = ("params", *path, "bias")
        elif leaf == "weight" and arr.ndim == 4:
            target, arr = ("params", *path, "kernel"), arr.transpose(2, 3, 1, 0)
        elif leaf == "weight" and arr.ndim == 2:
            target, arr = ("params", *path, "kernel"), arr.T
        elif leaf == "weight" and arr.ndim == 1:
            target = ("params", *path, "scale")
        else:
            raise StateDictMismatchError(
                f"cannot convert {key!r} with shape {arr.shape}: not a conv, linear or BatchNorm "
                "tensor of a ResNet."
            )
        flat[target] = np.array(arr, order="C")  # a copy, never a view of the caller's array
        origin[target] = key
    return flat, origin


def torch_key(flax_key: tuple[str, ...]) -> str:
    """The PyTorch key of a Flax key: ``('params', 'layer1_0', 'conv1', 'kernel')`` ->
    ``layer1.0.conv1.weight``."""
    collection, *path, leaf = flax_key
    if collection == "batch_stats":
        name = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return f"{names.torch_path(path)}.{name}"


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Convert Flax ``{'params', 'batch_stats'}`` to a PyTorch state_dict of numpy arrays.

    Adds ``num_batches_tracked = 0`` for every BatchNorm so that ``load_state_dict(strict=True)``
    accepts the result (wrap values with ``torch.from_numpy``).
    """
    out: dict[str, np.ndarray] = {}
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats") if k in variables})
    for key, value in flat.items():
        arr = np.asarray(jax.device_get(value))
        if key[0] == "params" and key[-1] == "kernel":
            arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
        # A writable copy: torch.from_numpy warns on (and must not share) read-only JAX buffers.
        out[torch_key(key)] = np.array(arr, order="C")
        if key[0] == "batch_stats" and key[-1] == "mean":
            out[torch_key(key).rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, np.int64)
    return out


def nnx_variables(model: Any) -> dict[tuple, Any]:
    """``{('params'|'batch_stats', *linen_path, leaf): nnx.Variable}`` of an NNX model or State."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        model = nnx.state(model)
    if not isinstance(model, nnx.State):
        raise TypeError(f"expected an NNX module or nnx.State; got {type(model).__name__}.")
    out = {}
    for path, var in nnx.to_flat_state(model):
        parts = [str(p) for p in path]
        if isinstance(var, nnx.RngState):  # a dropout's RNG stream: no weights, no PyTorch key
            continue
        if isinstance(var, nnx.BatchStat):
            collection = "batch_stats"
        elif isinstance(var, nnx.Param):
            collection = "params"
        else:
            raise TypeError(
                f"{'.'.join(parts)} is an nnx.{type(var).__name__}; only Param and BatchStat convert."
            )
        out[(collection, *names.linen_path(parts[:-1]), parts[-1])] = var
    return out


def nnx_to_linen(model: Any) -> dict[str, Any]:
    """The Linen ``{'params', 'batch_stats'}`` of an NNX model: the same arrays, Linen paths
    (``layer1[0].conv1`` -> ``layer1_0/conv1``). Apply them with ``resnet_jax.bridge.to_linen(model)``.
    Also takes an ``nnx.State`` (e.g. the gradients from ``nnx.grad``: ``{'params': ...}``). On a
    model from ``nnx.eval_shape`` the leaves are ``jax.ShapeDtypeStruct``."""
    return traverse_util.unflatten_dict({k: v.get_value() for k, v in nnx_variables(model).items()})
