"""Two-way weight conversion between PyTorch state_dicts, Linen variables and NNX models.

Linen module names mirror PyTorch's with ``.N`` written ``_N``, and NNX state paths are PyTorch's
(``layer1``, 0, ``conv1``), so every conversion is a walk over keys plus per-leaf rules: conv
``OIHW -> HWIO``, linear transposed, BatchNorm ``weight/bias -> scale/bias`` and
``running_mean/var -> batch_stats mean/var`` (NNX: ``nnx.BatchStat`` ``mean/var``), and
``num_batches_tracked`` dropped (it only matters for ``momentum=None`` in PyTorch). Linen <-> NNX
is exact: the same arrays, keyed ``('params'|'batch_stats', *linen_path)`` on one side and by
NNX path and variable type on the other.

Checkpoints are read and written as ``.pth`` (through PyTorch, tensors only) or ``.safetensors``
(through ``safetensors.numpy``, no PyTorch needed), with torchvision's and timm's key names.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from resnet_jax.models import PRESETS, ResNet, ResNetBase, classifier_head, get_model

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
    arr = np.asarray(value)
    if arr.dtype.name in ("bfloat16", "float16"):  # half-precision files: widen, as for torch
        arr = arr.astype(np.float32)
    return arr


def _shape(value: Any) -> tuple[int, ...]:
    # Shapes without a copy (torch tensors, numpy arrays, even PyTorch's meta tensors).
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


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
    """Build the Flax model a state_dict belongs to: torchvision's or timm's ResNet layout, or the
    seed's ResNetBase.

    timm's deep and tiered stems (``conv1.0``...), average-pool shortcuts (``downsample.1``
    being a conv) and squeeze-and-excitation (``layer1.0.se.fc1``) are recognised from the keys.
    For the seed's ResNetBase, stages start at block 0 and at each block with a projection
    shortcut. Strides show in its weights only in one place:
    a block that projects its shortcut although its channel count does not change must be
    strided (the annotated labml ResNet strides its very first block, so block 0 has a
    projection). Where the channel count changes the stride cannot be known from the weights;
    those stages follow the convention block 0 reveals: stride 1 after a strided block 0
    (labml's), else stride 2 (the default ``(1, 2, 2, ...)``). Pass your own model to
    :func:`torch_to_flax` when that guess is not yours.
    """
    sd = _strip_wrappers(state_dict)
    shapes = {k: _shape(v) for k, v in sd.items()}
    deep_stem = "conv1.0.weight" in shapes
    if ("conv1.weight" in shapes or deep_stem) and any(k.startswith("layer1.") for k in shapes):
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
        if deep_stem:
            first, stem_width = shapes["conv1.0.weight"][0], shapes.get("conv1.3.weight", (0,))[0]
            if first == stem_width:
                fields["stem_type"] = "deep"
            elif first == 3 * (stem_width // 4):
                fields["stem_type"] = "deep_tiered"
            else:
                raise StateDictMismatchError(
                    f"the stem conv1.0/conv1.3 has {first}/{stem_width} channels: neither timm's deep "
                    "stem (equal widths) nor its tiered stem (3/4 of the width first)."
                )
            fields["stem_width"] = stem_width
            fields["img_channels"] = shapes["conv1.0.weight"][1]
        else:
            fields["img_channels"] = shapes["conv1.weight"][1]
            fields["small_stem"] = shapes["conv1.weight"][2] == 3
        # timm's average-pool shortcut is (pool, conv, bn): its downsample.1 is a 4-d conv weight.
        avg_shortcut = re.compile(r"layer\d+\.\d+\.downsample\.1\.weight")
        fields["avg_down"] = any(avg_shortcut.fullmatch(k) and len(s) == 4 for k, s in shapes.items())
        fields["attn_layer"] = "se" if "layer1.0.se.fc1.weight" in shapes else ""
        fields["num_classes"] = shapes["fc.weight"][0] if "fc.weight" in shapes else None
        return ResNet(**fields)
    if "conv.weight" in shapes and "blocks.0.conv1.weight" in shapes:
        n = max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")) + 1
        bottleneck = "blocks.0.conv3.weight" in shapes
        n_blocks, n_channels, widths, strides = [], [], [], []
        prev = shapes["conv.weight"][0]
        for b in range(n):
            last = f"blocks.{b}.conv3.weight" if bottleneck else f"blocks.{b}.conv2.weight"
            out = shapes.get(last, (0,))[0]
            projection = f"blocks.{b}.shortcut.conv.weight" in shapes
            if b == 0 or projection:
                n_blocks.append(0)
                n_channels.append(out)
                widths.append(shapes.get(f"blocks.{b}.conv1.weight", (0,))[0])
                # Known: no projection => stride 1; projection without a channel change => strided.
                strides.append(1 if not projection else 2 if out == prev else None)
            n_blocks[-1] += 1
            prev = out
        unknown = 1 if strides[0] == 2 else 2
        strides = tuple(unknown if s is None else s for s in strides)
        conv = shapes["conv.weight"]
        return ResNetBase(
            n_blocks=tuple(n_blocks),
            n_channels=tuple(n_channels),
            bottlenecks=tuple(widths) if bottleneck else None,
            img_channels=conv[1],
            first_kernel_size=conv[2],
            strides=None if strides == (1,) + (2,) * (len(strides) - 1) else strides,
            conv_bias="conv.bias" in shapes,
        )
    raise StateDictMismatchError(
        "not a ResNet state_dict: expected torchvision keys (conv1.*, layer1.*, ...), timm keys "
        "(conv1.0.*, layer1.*, ...) or the seed's ResNetBase keys (conv.*, bn.*, blocks.N.*); first "
        f"keys are {list(sd)[:5]}."
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
    state_dict: Mapping[str, Any],
    model: Optional[Union[nn.Module, str, Any]] = None,
    *,
    num_classes: Optional[int] = None,
    new_head: bool = False,
    rng: Union[int, jax.Array] = 0,
) -> Variables:
    """Convert a PyTorch state_dict to ``{'params': ..., 'batch_stats': ...}`` of numpy arrays.

    ``model`` is the Flax module to check against (Linen, or an NNX model, concrete or from
    ``nnx.eval_shape``), or a preset name; by default it is inferred from the keys
    (:func:`infer_model`). Raises :class:`StateDictMismatchError` listing every
    missing key, unexpected key and wrong shape. Accepts torch tensors or numpy arrays, and
    unwraps ``{'state_dict': ...}`` checkpoints and DataParallel ``module.`` prefixes.

    Fine-tuning on other classes: ``num_classes=N`` builds the classifier with ``N`` classes and,
    when the checkpoint has another count, initialises a fresh ``fc`` (as ``torch.nn.Linear``,
    from ``rng``). ``new_head=True`` always ignores the checkpoint's ``fc``: the model's ``fc``, if
    it has one (``num_classes=None`` has none), is freshly initialised. Every other tensor is
    converted exactly.
    """
    state_dict = _strip_wrappers(state_dict)
    ckpt_classes = _checkpoint_classes(state_dict)
    if model is None or isinstance(model, str):
        model = _linen_model_for(state_dict, model)
    elif not isinstance(model, nn.Module):
        # An NNX model: its Linen twin has the same variables under the same (Linen-spelt) paths.
        from resnet_jax import nnx as rnnx

        model = rnnx.to_linen(model)
    if num_classes is not None:
        if not isinstance(model, ResNet):
            raise ValueError(f"num_classes applies to ResNet classifiers; {type(model).__name__} has no fc.")
        model = model.clone(num_classes=num_classes)
        new_head = new_head or num_classes != ckpt_classes
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    flat, origin = _convert_leaves(state_dict)
    expected = _expected_shapes(model)
    if new_head and ("params", "fc", "kernel") in expected:
        fan_in = expected[("params", "fc", "kernel")][0]
        head = classifier_head(model.num_classes, fan_in, model.dtype, model.param_dtype)
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        fresh = head.init(key, jnp.zeros((1, fan_in), model.dtype))["params"]
        for leaf in ("kernel", "bias"):
            flat[("params", "fc", leaf)] = np.asarray(fresh[leaf])
            origin[("params", "fc", leaf)] = f"fc.{leaf} (fresh)"
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
            found, hint = None, ""
        if any(w.startswith("fc.") for w in wrong) and isinstance(model, ResNet):
            lines.append(
                f"  The state_dict's fc has {ckpt_classes} classes and the model's {model.num_classes}: "
                "pass new_head=True (or num_classes=...) to initialise a fresh fc."
            )
        if isinstance(model, ResNetBase) and any(".shortcut." in k for k in missing + unexpected):
            lines.append(
                "  Strides show in these weights only where a block projects its shortcut without "
                "changing channels (that block is strided); where the channel count changes they cannot "
                "be known from the weights. Build the ResNetBase with the strides it was trained with "
                "and pass it: torch_to_flax(state_dict, ResNetBase(..., strides=...))."
            )
        lines.append(f"  Build the model that matches the state_dict.{hint}")
        raise StateDictMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


# The fields that define a ResNet's weights (not its numerics or head).
_ARCH_FIELDS = (
    "stage_sizes",
    "block",
    "groups",
    "width_per_group",
    "stem_type",
    "stem_width",
    "avg_down",
    "attn_layer",
)


def _describe(model: Any) -> str:
    if not isinstance(model, nn.Module):  # an NNX model: describe its Linen twin
        from resnet_jax import nnx as rnnx

        try:
            model = rnnx.to_linen(model)
        except TypeError:
            return ""
    if isinstance(model, ResNet):
        defaults = {k: ResNet.__dataclass_fields__[k].default for k in _ARCH_FIELDS if k != "stage_sizes"}

        def arch(fields: Mapping[str, Any]) -> tuple:
            values = (fields[k] for k in _ARCH_FIELDS)
            return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in values)

        mine = arch({k: getattr(model, k) for k in _ARCH_FIELDS})
        for name, fields in PRESETS.items():
            if arch({**defaults, **fields}) == mine:
                return f" ({name})"
        extra = "".join(
            f", {k}={getattr(model, k)!r}" for k in _ARCH_FIELDS[2:] if getattr(model, k) != defaults[k]
        )
        return f" (stage_sizes={tuple(model.stage_sizes)}, block={model.block}{extra})"
    if isinstance(model, ResNetBase):
        parts = [f"n_blocks={tuple(model.n_blocks)}", f"n_channels={tuple(model.n_channels)}"]
        if model.bottlenecks is not None:
            parts.append(f"bottlenecks={tuple(model.bottlenecks)}")
        for k, default in (("img_channels", 3), ("first_kernel_size", 7)):
            if getattr(model, k) != default:
                parts.append(f"{k}={getattr(model, k)}")
        strides = model.strides if model.strides is not None else (1,) + (2,) * (len(model.n_channels) - 1)
        parts.append(f"strides={tuple(strides)}")
        if model.conv_bias:
            parts.append("conv_bias=True")
        return "(" + ", ".join(parts) + ")"
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
        # A writable copy: torch.from_numpy warns on (and must not share) read-only JAX buffers.
        out[_torch_key(key, arr.ndim)] = np.array(arr, order="C")
        if key[0] == "batch_stats" and key[-1] == "mean":
            out[_torch_key(key, 1).rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, np.int64)
    return out


def load_torch_checkpoint(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """Read a state_dict from ``.safetensors`` or ``.pth`` as numpy arrays, never running pickled code.

    ``.safetensors`` is read with ``safetensors.numpy`` (no PyTorch needed); anything else with
    ``torch.load(..., weights_only=True)``. Unwraps ``{'state_dict': ...}``/``{'model': ...}`` and
    DataParallel ``module.`` prefixes; half-precision tensors are widened to float32.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from e
        return {k: _to_numpy(v) for k, v in _strip_wrappers(load_file(path)).items()}

    import pickle

    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch); .safetensors files need only safetensors."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds more than tensors (a pickled object), and resnet_jax never unpickles "
            "arbitrary code. Re-save it from PyTorch with torch.save(model.state_dict(), path)."
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict (found {type(obj).__name__}).")
    return {k: _to_numpy(v) if hasattr(v, "detach") else v for k, v in _strip_wrappers(obj).items()}


def save_torch_checkpoint(
    variables: Mapping[str, Any],
    path: Union[str, os.PathLike],
    arch: Optional[Union[nn.Module, str]] = None,
) -> dict[str, np.ndarray]:
    """Write Flax variables as a PyTorch state_dict: ``.safetensors`` (no PyTorch needed) or
    ``.pth``/``.pt`` (``torch.save`` of tensors).

    Keys are torchvision's (timm's for the -D/-T presets), with ``num_batches_tracked`` added, so
    ``load_state_dict(strict=True)`` of the same architecture accepts the file. With ``arch`` (a
    preset name or Flax module) the variables are checked against it first, and nothing is written
    when they do not match. Returns the state_dict written, as numpy arrays.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1]
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"{path}: the file name must end with .safetensors, .pth or .pt.")
    state_dict = flax_to_torch(variables)
    if arch is not None:
        torch_to_flax(state_dict, arch)  # raises StateDictMismatchError, listing the keys
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if suffix == ".safetensors":
            try:
                from safetensors.numpy import save_file
            except ImportError as e:
                raise ImportError(f"writing {path} needs safetensors: pip install safetensors") from e
            save_file(state_dict, tmp, metadata={"format": "pt"})
        else:
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"writing {path} needs PyTorch; write .safetensors without it.") from e
            torch.save({k: _to_torch(torch, v) for k, v in state_dict.items()}, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return state_dict


def _to_torch(torch: Any, arr: np.ndarray) -> Any:
    if arr.dtype.name == "bfloat16":  # numpy has no bfloat16 torch.from_numpy understands
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, order="C"))  # a writable copy


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


def _nnx_model_for(state_dict: Mapping[str, Any], model: Any, num_classes: Optional[int]) -> Any:
    """The NNX model ``torch_to_nnx`` fills: ``model`` itself, or built without allocating."""
    from flax import nnx

    from resnet_jax import nnx as rnnx

    if isinstance(model, nnx.Module):
        return model
    if isinstance(model, str) or model is None:
        linen_model = _linen_model_for(state_dict, model)
        if num_classes is not None and isinstance(linen_model, ResNet):
            linen_model = linen_model.clone(num_classes=num_classes)
        return nnx.eval_shape(lambda: rnnx.from_linen(linen_model, rngs=nnx.Rngs(0)))
    raise TypeError(f"model must be an NNX module, a preset name or None; got {type(model).__name__}.")


def _checkpoint_classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    return _shape(state_dict["fc.weight"])[0] if "fc.weight" in state_dict else None


def _linen_model_for(state_dict: Mapping[str, Any], model: Optional[str]) -> nn.Module:
    """The Linen model of an (unwrapped) state_dict: the preset ``model`` with the checkpoint's
    class count, or, for ``None``, the architecture inferred from the keys."""
    if model is None:
        return infer_model(state_dict)
    return get_model(model, num_classes=_checkpoint_classes(state_dict))


def torch_to_nnx(
    state_dict: Mapping[str, Any],
    model: Any = None,
    *,
    num_classes: Optional[int] = None,
    new_head: bool = False,
    rng: Union[int, jax.Array] = 0,
) -> Any:
    """Load a PyTorch state_dict into an NNX model and return it.

    ``model`` is an NNX ``resnet_jax.nnx`` model (filled in place), a preset name, or None (the
    architecture is inferred from the keys, :func:`infer_model`); for the last two the model is
    built with ``nnx.eval_shape``, so no random initialisation is ever allocated. ``num_classes``,
    ``new_head`` and ``rng`` give a fresh classifier as in :func:`torch_to_flax`, whose errors
    this raises too.
    """
    state_dict = _strip_wrappers(state_dict)
    model = _nnx_model_for(state_dict, model, num_classes)
    variables = torch_to_flax(state_dict, model, num_classes=num_classes, new_head=new_head, rng=rng)
    return linen_to_nnx(variables, model)


def nnx_to_torch(model: Any) -> dict[str, np.ndarray]:
    """A PyTorch state_dict (numpy arrays, ``num_batches_tracked = 0``) from an NNX model (or
    ``nnx.State``)."""
    return flax_to_torch(nnx_to_linen(model))
