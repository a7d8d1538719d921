"""Two-way weight conversion between PyTorch state_dicts, Linen variables and NNX models.

Linen module names mirror PyTorch's with ``.N`` written ``_N``, and NNX state paths are PyTorch's
(``layer1``, 0, ``conv1``), so every conversion is a walk over keys plus per-leaf rules: conv
``OIHW -> HWIO``, linear transposed, BatchNorm ``weight/bias -> scale/bias`` and
``running_mean/var -> batch_stats mean/var`` (NNX: ``nnx.BatchStat`` ``mean/var``), and
``num_batches_tracked`` dropped (it only matters for ``momentum=None`` in PyTorch). Linen <-> NNX
is exact: the same arrays, keyed ``('params'|'batch_stats', *linen_path)`` on one side and by
NNX path and variable type on the other.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from resnet_jax.models import PRESETS, ResNet, ResNetBase, get_model

Variables = dict[str, Any]

_INDEX = re.compile(r"^(.*)_(\d+)$")
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


class StateDictMismatchError(ValueError):
    """A state_dict (or Linen variables) does not fit the target model; the message lists every
    offending key."""


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        # Copy: .numpy() shares memory, and a later in-place update of the torch model (an
        # optimizer step) must not change converted weights.
        return value.numpy().copy()
    return np.asarray(value)


def _flax_module_path(torch_prefix: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for part in torch_prefix:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _torch_module_path(flax_path: tuple[str, ...]) -> str:
    parts = []
    for name in flax_path:
        m = _INDEX.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
    return ".".join(parts)


def _strip_wrappers(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    if state_dict and all(k.startswith("module.") for k in state_dict):  # DataParallel / DDP
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _convert_leaves(state_dict: Mapping[str, Any]) -> tuple[dict, dict[tuple, str]]:
    """Flat {(collection, *path): array} plus the torch key each leaf came from."""
    flat, origin = {}, {}
    for key, value in state_dict.items():
        *prefix, leaf = key.split(".")
        if leaf == "num_batches_tracked":
            continue
        arr = _to_numpy(value)
        path = _flax_module_path(prefix)
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


def _torch_key(flax_key: tuple[str, ...], ndim: int) -> str:
    collection, *path, leaf = flax_key
    module = _torch_module_path(tuple(path))
    if collection == "batch_stats":
        name = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return f"{module}.{name}"


def infer_model(state_dict: Mapping[str, Any]) -> Union[ResNet, ResNetBase]:
    """Build the Flax model a state_dict belongs to (torchvision layout, or the seed's layout).

    For the seed's ResNetBase, strides do not show in weights: stages are taken to start at each
    block with a projection shortcut, and the default strides apply. Pass your own model to
    ``torch_to_flax`` when that guess is not yours.
    """
    sd = _strip_wrappers(state_dict)
    shapes = {k: tuple(_to_numpy(v).shape) for k, v in sd.items()}
    if "conv1.weight" in shapes and any(k.startswith("layer1.") for k in shapes):
        stage_sizes = []
        while any(k.startswith(f"layer{len(stage_sizes) + 1}.") for k in shapes):
            i = len(stage_sizes) + 1
            idx = {int(k.split(".")[1]) for k in shapes if k.startswith(f"layer{i}.")}
            stage_sizes.append(max(idx) + 1)
        bottleneck = "layer1.0.conv3.weight" in shapes
        fields: dict[str, Any] = dict(stage_sizes=tuple(stage_sizes))
        fields["block"] = "bottleneck" if bottleneck else "basic"
        if bottleneck:
            width, in_per_group = shapes["layer1.0.conv2.weight"][:2]
            groups = width // in_per_group
            fields.update(groups=groups, width_per_group=width // groups)
        fields["img_channels"] = shapes["conv1.weight"][1]
        fields["small_stem"] = shapes["conv1.weight"][2] == 3
        fields["num_classes"] = shapes["fc.weight"][0] if "fc.weight" in shapes else None
        return ResNet(**fields)
    if "conv.weight" in shapes and "blocks.0.conv1.weight" in shapes:
        n = max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")) + 1
        bottleneck = "blocks.0.conv3.weight" in shapes
        n_blocks, n_channels, widths = [], [], []
        for b in range(n):
            last = f"blocks.{b}.conv3.weight" if bottleneck else f"blocks.{b}.conv2.weight"
            if b == 0 or f"blocks.{b}.shortcut.conv.weight" in shapes:
                n_blocks.append(0)
                n_channels.append(shapes.get(last, (0,))[0])
                widths.append(shapes.get(f"blocks.{b}.conv1.weight", (0,))[0])
            n_blocks[-1] += 1
        conv = shapes["conv.weight"]
        return ResNetBase(
            n_blocks=tuple(n_blocks),
            n_channels=tuple(n_channels),
            bottlenecks=tuple(widths) if bottleneck else None,
            img_channels=conv[1],
            first_kernel_size=conv[2],
            conv_bias="conv.bias" in shapes,
        )
    raise StateDictMismatchError(
        "not a ResNet state_dict: expected torchvision keys (conv1.*, layer1.*, ...) or the seed's "
        f"ResNetBase keys (conv.*, bn.*, blocks.N.*); first keys are {list(sd)[:5]}."
    )


def _expected_shapes(model: Any) -> dict[tuple, tuple]:
    if not isinstance(model, nn.Module):
        return {k: tuple(v.get_value().shape) for k, v in _nnx_variables(model).items()}
    img = getattr(model, "img_channels", 3)
    # Shapes only: abstract evaluation allocates nothing, even for the largest presets.
    x = jax.ShapeDtypeStruct((1, 256, 256, img), np.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables).items()}


def torch_to_flax(
    state_dict: Mapping[str, Any], model: Optional[Union[nn.Module, str, Any]] = None
) -> Variables:
    """Convert a PyTorch state_dict to ``{'params': ..., 'batch_stats': ...}`` of numpy arrays.

    ``model`` is the Flax module to check against (Linen, or an NNX model, concrete or from
    ``nnx.eval_shape``), or a preset name; by default it is inferred from the keys
    (:func:`infer_model`). Raises :class:`StateDictMismatchError` listing every
    missing key, unexpected key and wrong shape. Accepts torch tensors or numpy arrays, and
    unwraps ``{'state_dict': ...}`` checkpoints and DataParallel ``module.`` prefixes.
    """
    state_dict = _strip_wrappers(state_dict)
    if model is None:
        model = infer_model(state_dict)
    elif isinstance(model, str):
        nc = _to_numpy(state_dict["fc.weight"]).shape[0] if "fc.weight" in state_dict else None
        model = get_model(model, num_classes=nc)
    flat, origin = _convert_leaves(state_dict)
    expected = _expected_shapes(model)
    missing = sorted(_torch_key(k, len(s)) for k, s in expected.items() if k not in flat)
    unexpected = sorted(origin[k] for k in flat if k not in expected)
    wrong = sorted(
        f"{origin[k]}: got {flat[k].shape} (as Flax), expected {expected[k]}"
        for k in flat
        if k in expected and flat[k].shape != expected[k]
    )
    if missing or unexpected or wrong:
        name = type(model).__name__
        lines = [f"state_dict does not match {name}{_describe(model)}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong),
        ):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): "
                    + ", ".join(items[:20])
                    + (" ..." if len(items) > 20 else "")
                )
        try:
            found = infer_model(state_dict)
            hint = f" The state_dict looks like {type(found).__name__}{_describe(found)}."
        except StateDictMismatchError:
            hint = ""
        lines.append(f"  Build the model that matches the state_dict.{hint}")
        raise StateDictMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def _describe(model: Any) -> str:
    if not isinstance(model, nn.Module):  # an NNX model: describe its Linen twin
        from resnet_jax import nnx as rnnx

        try:
            model = rnnx.to_linen(model)
        except TypeError:
            return ""
    if isinstance(model, ResNet):
        for name, fields in PRESETS.items():
            if all(
                getattr(model, k) == (tuple(v) if isinstance(v, tuple) else v) for k, v in fields.items()
            ) and all(
                getattr(model, k) == ResNet.__dataclass_fields__[k].default
                for k in ("groups", "width_per_group", "block")
                if k not in fields
            ):
                return f" ({name})"
        return f" (stage_sizes={tuple(model.stage_sizes)}, block={model.block})"
    return ""


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
        out[_torch_key(key, arr.ndim)] = np.ascontiguousarray(arr)
        if key[0] == "batch_stats" and key[-1] == "mean":
            out[_torch_key(key, 1).rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, np.int64)
    return out


def load_torch_checkpoint(path: str) -> dict[str, Any]:
    """Read a ``.pth`` state_dict safely: ``torch.load(..., weights_only=True)``, never a pickle."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds more than tensors (a pickled object), and resnet_jax never unpickles "
            "arbitrary code. Re-save it from PyTorch with torch.save(model.state_dict(), path)."
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict (found {type(obj).__name__}).")
    return dict(_strip_wrappers(obj))


# ---------------------------------------------------------------------------------------------
# NNX


def _nnx_variables(model: Any) -> dict[tuple, Any]:
    """``{('params'|'batch_stats', *linen_path, leaf): nnx.Variable}`` of an NNX model or State."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        model = nnx.state(model)
    if not isinstance(model, nnx.State):
        raise TypeError(f"expected an NNX module or nnx.State; got {type(model).__name__}.")
    out = {}
    for path, var in nnx.to_flat_state(model):
        parts = [str(p) for p in path]
        if isinstance(var, nnx.BatchStat):
            collection = "batch_stats"
        elif isinstance(var, nnx.Param):
            collection = "params"
        else:
            raise TypeError(
                f"{'.'.join(parts)} is an nnx.{type(var).__name__}; only Param and BatchStat convert."
            )
        out[(collection, *_flax_module_path(parts[:-1]), parts[-1])] = var
    return out


def nnx_to_linen(model: Any) -> Variables:
    """The Linen ``{'params', 'batch_stats'}`` of an NNX model: the same arrays, Linen paths
    (``layer1[0].conv1`` -> ``layer1_0/conv1``). Apply them with ``resnet_jax.nnx.to_linen(model)``.
    Also takes an ``nnx.State`` (e.g. the gradients from ``nnx.grad``: ``{'params': ...}``). On a
    model from ``nnx.eval_shape`` the leaves are ``jax.ShapeDtypeStruct``."""
    return traverse_util.unflatten_dict({k: v.get_value() for k, v in _nnx_variables(model).items()})


def linen_to_nnx(variables: Mapping[str, Any], model: Any) -> Any:
    """Load Linen ``{'params', 'batch_stats'}`` into the NNX ``model`` in place (and return it).

    Exact: values are stored as given (no dtype cast). Raises :class:`StateDictMismatchError`
    listing every missing, unexpected and misshapen key; nothing is written then. ``model`` may
    come from ``nnx.eval_shape`` (then every variable becomes a real array).
    """
    import jax.numpy as jnp

    targets = _nnx_variables(model)
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats") if k in variables})
    shape = lambda v: tuple(np.shape(v))  # noqa: E731
    problems = {
        "missing keys": sorted("/".join(k) for k in targets if k not in flat),
        "unexpected keys": sorted("/".join(k) for k in flat if k not in targets),
        "wrong shapes": sorted(
            f"{'/'.join(k)}: got {shape(v)}, expected {tuple(targets[k].get_value().shape)}"
            for k, v in flat.items()
            if k in targets and shape(v) != tuple(targets[k].get_value().shape)
        ),
    }
    if any(problems.values()):
        lines = [f"Linen variables do not match NNX {type(model).__name__}{_describe(model)}:"]
        for title, items in problems.items():
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise StateDictMismatchError("\n".join(lines))
    for key, var in targets.items():
        var.set_value(jnp.asarray(flat[key]))
    return model


def _nnx_model_for(state_dict: Mapping[str, Any], model: Any) -> Any:
    """The NNX model ``torch_to_nnx`` fills: ``model`` itself, or built without allocating."""
    from flax import nnx

    from resnet_jax import nnx as rnnx

    if isinstance(model, nnx.Module):
        return model
    if isinstance(model, str):
        nc = _to_numpy(state_dict["fc.weight"]).shape[0] if "fc.weight" in state_dict else None
        return nnx.eval_shape(lambda: rnnx.get_model(model, num_classes=nc, rngs=nnx.Rngs(0)))
    if model is None:
        linen_model = infer_model(state_dict)
        return nnx.eval_shape(lambda: rnnx.from_linen(linen_model, rngs=nnx.Rngs(0)))
    raise TypeError(f"model must be an NNX module, a preset name or None; got {type(model).__name__}.")


def torch_to_nnx(state_dict: Mapping[str, Any], model: Any = None) -> Any:
    """Load a PyTorch state_dict into an NNX model and return it.

    ``model`` is an NNX ``resnet_jax.nnx`` model (filled in place), a preset name, or None (the
    architecture is inferred from the keys, :func:`infer_model`); for the last two the model is
    built with ``nnx.eval_shape``, so no random initialisation is ever allocated. Errors as
    :func:`torch_to_flax`.
    """
    state_dict = _strip_wrappers(state_dict)
    model = _nnx_model_for(state_dict, model)
    return linen_to_nnx(torch_to_flax(state_dict, model), model)


def nnx_to_torch(model: Any) -> dict[str, np.ndarray]:
    """A PyTorch state_dict (numpy arrays, ``num_batches_tracked = 0``) from an NNX model (or
    ``nnx.State``)."""
    return flax_to_torch(nnx_to_linen(model))
