"""Two-way weight conversion between PyTorch state_dicts, Linen variables and NNX models.

``torch_to_flax`` (Linen variables), ``torch_to_nnx`` (fills an NNX model directly) and
``flax_to_torch``/``nnx_to_torch`` apply the key and leaf rules of ``layout.py`` and check every
key and shape against the model, raising one :class:`StateDictMismatchError` with structured
fields. The other jobs live next door and are re-exported here: the architecture from the keys
(``infer.py``), ``.pth``/``.safetensors`` files (``torch_io.py``), Linen <-> NNX
(``bridge.py``, imported on first use).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from resnet_jax import presets
from resnet_jax.infer import infer_fields, infer_model
from resnet_jax.layout import flax_to_torch, nnx_to_linen, nnx_variables, shape, strip_wrappers, torch_key
from resnet_jax.layout import torch_leaves as _torch_leaves
from resnet_jax.mismatch import StateDictMismatchError, compare, describe
from resnet_jax.models import classifier_head, get_model
from resnet_jax.torch_io import load_torch_checkpoint, write_state_dict

Variables = dict[str, Any]

__all__ = [
    "StateDictMismatchError",
    "flax_to_torch",
    "infer_fields",
    "infer_model",
    "load_torch_checkpoint",
    "nnx_to_linen",
    "nnx_to_torch",
    "save_torch_checkpoint",
    "torch_to_flax",
    "torch_to_nnx",
]


def torch_to_flax(
    state_dict: Mapping[str, Any],
    model: Optional[Union[nn.Module, str, Any]] = None,
    *,
    num_classes: Optional[int] = None,
    new_head: bool = False,
    rng: Union[int, jax.Array] = 0,
) -> Variables:
    """Convert a PyTorch state_dict to ``{'params': ..., 'batch_stats': ...}`` of numpy arrays.

    Every tensor is converted exactly; only a fresh ``fc`` (see ``num_classes``, ``new_head``) is
    new. Accepts torch tensors or numpy arrays, and unwraps ``{'state_dict': ...}`` checkpoints
    and DataParallel ``module.`` prefixes.

    Args:
        state_dict: torchvision's (or timm's, or labml.ai's annotated ResNet's) keys and tensors.
        model: The Flax module to check against: Linen, or an NNX model (concrete or from
            ``nnx.eval_shape``), or a preset name. None infers it from the keys
            (:func:`infer_model`).
        num_classes: Build the classifier with this many classes; when the checkpoint has
            another count, ``fc`` is freshly initialised (as ``torch.nn.Linear``, from ``rng``).
            None keeps the model's (or the checkpoint's) count.
        new_head: Always ignore the checkpoint's ``fc``: the model's ``fc``, if it has one, is
            freshly initialised.
        rng: Seed or PRNG key for a fresh ``fc``; unused otherwise.

    Returns:
        The variables, in the Linen layout (also for an NNX ``model``).

    Raises:
        StateDictMismatchError: Listing every missing key, unexpected key and wrong shape.
    """
    state_dict = strip_wrappers(state_dict)
    new_head = new_head or (num_classes is not None and num_classes != _classes(state_dict))
    if model is None or isinstance(model, str):
        model = infer_model(state_dict) if model is None else get_model(model, _classes(state_dict))
    elif not isinstance(model, nn.Module):  # an NNX model: fill its variables, in Linen layout
        if num_classes is None:
            return traverse_util.unflatten_dict(
                _convert(state_dict, model, _nnx_shapes(model), new_head, rng)
            )
        from resnet_jax import bridge

        model = bridge.to_linen(model)
    if num_classes is not None:
        if not hasattr(model, "num_classes"):
            raise ValueError(f"num_classes applies to classifiers; {type(model).__name__} has no fc.")
        model = model.clone(num_classes=num_classes)
    return traverse_util.unflatten_dict(_convert(state_dict, model, _linen_shapes(model), new_head, rng))


def torch_to_nnx(
    state_dict: Mapping[str, Any],
    model: Any = None,
    *,
    num_classes: Optional[int] = None,
    new_head: bool = False,
    rng: Union[int, jax.Array] = 0,
) -> Any:
    """Load a PyTorch state_dict into an NNX model and return it.

    Nothing is written when the state_dict does not fit.

    Args:
        state_dict: As for :func:`torch_to_flax`.
        model: A ``resnet_jax.nnx`` model, filled in place; a preset name; or None, which infers
            the architecture from the keys (:func:`infer_model`). For a name or None the model
            is built with ``nnx.eval_shape``, so no random initialisation is ever allocated.
        num_classes: The classifier's size; a fresh ``fc`` as in :func:`torch_to_flax`. With a
            given model it must equal the model's.
        new_head: Always initialise a fresh ``fc``, ignoring the checkpoint's.
        rng: Seed or PRNG key for a fresh ``fc``; unused otherwise.

    Returns:
        The filled model (``model`` itself when one was given).

    Raises:
        StateDictMismatchError: As :func:`torch_to_flax`.
    """
    from flax import nnx

    from resnet_jax import nnx as rnnx

    state_dict = strip_wrappers(state_dict)
    new_head = new_head or (num_classes is not None and num_classes != _classes(state_dict))
    if isinstance(model, str) or model is None:
        if model is None:
            kind, fields = infer_fields(state_dict)
        else:
            kind, fields = (
                presets.family(model),
                {**presets.preset_fields(model, {}, ()), "num_classes": _classes(state_dict)},
            )
        if num_classes is not None and kind != "ResNetBase":
            fields["num_classes"] = num_classes
        model = nnx.eval_shape(lambda: getattr(rnnx, kind)(**fields, rngs=nnx.Rngs(0)))
    elif not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an NNX module, a preset name or None; got {type(model).__name__}.")
    elif num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        raise ValueError(f"num_classes={num_classes}, but the given model has {model.num_classes} classes.")
    targets = nnx_variables(model)
    flat = _convert(
        state_dict, model, {k: tuple(v.get_value().shape) for k, v in targets.items()}, new_head, rng
    )
    for key, var in targets.items():
        var.set_value(jnp.asarray(flat[key]))
    return model


def nnx_to_torch(model: Any) -> dict[str, np.ndarray]:
    """A PyTorch state_dict (numpy arrays, ``num_batches_tracked = 0``) from an NNX model (or
    ``nnx.State``)."""
    return flax_to_torch(nnx_to_linen(model))


def __getattr__(name: str) -> Callable:
    if name == "linen_to_nnx":  # Linen <-> NNX lives in bridge.py
        from resnet_jax import bridge

        return bridge.linen_to_nnx
    raise AttributeError(f"module 'resnet_jax.convert' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------


# The classifier of each layout: ResNet's ``fc`` (linear) and ResNetV2's ``head.fc`` (1x1 conv).
_HEADS = ("fc", "head.fc")


def _classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    return next((shape(state_dict[f"{h}.weight"])[0] for h in _HEADS if f"{h}.weight" in state_dict), None)


def _linen_shapes(model: nn.Module) -> dict[tuple, tuple]:
    img = getattr(model, "img_channels", 3)
    # Shapes only: abstract evaluation allocates nothing, even for the largest presets.
    x = jax.ShapeDtypeStruct((1, 256, 256, img), np.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables).items()}


def _nnx_shapes(model: Any) -> dict[tuple, tuple]:
    return {k: tuple(v.get_value().shape) for k, v in nnx_variables(model).items()}


def _convert(
    state_dict: Mapping[str, Any], model: Any, expected: dict[tuple, tuple], new_head: bool, rng: Any
) -> dict:
    """The state_dict's flat leaves for ``model`` (whose variables have the ``expected`` shapes), with
    a fresh ``fc`` (the model's, if it has one) for ``new_head``."""
    ckpt_classes = _classes(state_dict)
    head_path = next(
        (tuple(h.split(".")) for h in _HEADS if ("params", *h.split("."), "kernel") in expected), None
    )
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_HEADS)}
    flat, origin = _torch_leaves(state_dict)
    if new_head and head_path is not None:
        # A fresh classifier, initialised as torch.nn.Linear (a 1x1 conv head as PyTorch's Conv2d,
        # which is the same distribution), from rng.
        kernel_shape = expected[("params", *head_path, "kernel")]
        fan_in, classes = kernel_shape[-2:]
        dtype = getattr(model, "dtype", jnp.float32)
        head = classifier_head(classes, fan_in, dtype, getattr(model, "param_dtype", jnp.float32))
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        fresh = head.init(key, jnp.zeros((1, fan_in), dtype))["params"]
        for leaf in ("kernel", "bias"):
            target = ("params", *head_path, leaf)
            flat[target] = np.asarray(fresh[leaf]).reshape(expected[target])
            origin[target] = f"{'.'.join(head_path)}.{leaf} (fresh)"
    got = {k: tuple(v.shape) for k, v in flat.items()}
    missing, unexpected, wrong = compare(got, expected, lambda k: origin.get(k) or torch_key(k))
    if missing or unexpected or wrong:
        raise _mismatch(state_dict, model, missing, unexpected, wrong, ckpt_classes)
    return flat


def _mismatch(state_dict, model, missing, unexpected, wrong, ckpt_classes) -> StateDictMismatchError:
    """The error for a state_dict that does not fit ``model``, with what it looks like and hints."""
    try:
        looks_like = describe(infer_model(state_dict))
    except StateDictMismatchError:
        looks_like = None
    hints = []
    if any(w.key.startswith(_HEADS) for w in wrong) and hasattr(model, "num_classes"):
        hints.append(
            f"The state_dict's fc has {ckpt_classes} classes and the model's {model.num_classes}: "
            "pass new_head=True (or num_classes=...) to initialise a fresh fc."
        )
    if hasattr(model, "n_blocks") and any(".shortcut." in k for k in missing + unexpected):
        hints.append(
            "Strides show in these weights only where a block projects its shortcut without "
            "changing channels (that block is strided); where the channel count changes they cannot "
            "be known from the weights. Build the ResNetBase with the strides it was trained with "
            "and pass it: torch_to_flax(state_dict, ResNetBase(..., strides=...))."
        )
    target = describe(model)
    return StateDictMismatchError(
        f"state_dict does not match {target}:",
        target=target,
        missing=missing,
        unexpected=unexpected,
        wrong_shapes=wrong,
        looks_like=looks_like,
        hints=hints,
    )


def save_torch_checkpoint(
    variables: Mapping[str, Any],
    path: Union[str, "os.PathLike"],
    arch: Optional[Any] = None,
) -> dict[str, np.ndarray]:
    """Write Flax variables as a PyTorch state_dict: ``.safetensors`` (no PyTorch needed) or
    ``.pth``/``.pt`` (``torch.save`` of tensors).

    Keys are torchvision's (timm's for the -D/-T presets), with ``num_batches_tracked`` added, so
    ``load_state_dict(strict=True)`` of the same architecture accepts the file. With ``arch`` (a
    preset name or Flax module) the variables are checked against it first, and nothing is written
    when they do not match. The file is written under a temporary name and renamed, so a crash
    never leaves a half-written file under ``path``.

    Args:
        variables: Linen-layout ``{'params': ..., 'batch_stats': ...}``.
        path: The file to write; must end with ``.safetensors``, ``.pth`` or ``.pt``.
        arch: A preset name or Flax module to check the variables against; None skips the check.

    Returns:
        The state_dict written, as numpy arrays.
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1] not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"{path}: the file name must end with .safetensors, .pth or .pt.")
    state_dict = flax_to_torch(variables)
    if arch is not None:
        torch_to_flax(state_dict, arch)  # raises StateDictMismatchError, listing the keys
    write_state_dict(state_dict, path)
    return state_dict
