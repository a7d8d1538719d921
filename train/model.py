"""Builds the classifier a config asks for from the resnet_jax library.

``config.model.arch`` is a preset name (``resnet_jax.PRESETS``: ``resnet18``, ``resnet50``, ...)
with ``config.model.overrides`` setting any other ``ResNet`` field, or ``'resnet_base'``: the
library's ``ResNetBase`` backbone (``config.model.overrides`` are its fields) under a linear head,
which allows the very narrow networks used for tiny images and tests.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import resnet_jax
from resnet_jax import presets
from resnet_jax.networks import NETWORKS

BASE_ARCH = "resnet_base"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


class BaseClassifier(nn.Module):
    """``ResNetBase`` features followed by a dense layer; logits in float32 (float64 when the
    model computes in float64)."""

    backbone: resnet_jax.ResNetBase
    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        features = self.backbone(x, train)
        dense = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")
        logits = dense(features)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def architectures() -> list[str]:
    return [BASE_ARCH, *resnet_jax.ALL_PRESETS]


# Set by the program (from the dataset, config.dtype and the driver), never by config.model.overrides.
_SET_BY_THE_PROGRAM = ("num_classes", "img_channels", "dtype", "axis_name", "parent", "name")


def _model_class_name(arch: str) -> str:
    """``'ResNetBase'`` for ``'resnet_base'``; else the preset's model class (``'ResNet'``,
    ``'ResNetV2'``), or ``'ResNet'`` for a name that is no preset (refused elsewhere)."""
    if arch == BASE_ARCH:
        return "ResNetBase"
    return presets.family(arch) if arch in resnet_jax.ALL_PRESETS else "ResNet"


def model_fields(arch: str) -> list[str]:
    """The fields ``config.model.overrides`` may set for ``arch``: those of its model's
    definition (``resnet_jax.networks.NETWORKS``) but the ones the program sets."""
    definition = NETWORKS[_model_class_name(arch)]
    return [f.name for f in dataclasses.fields(definition) if f.name not in _SET_BY_THE_PROGRAM]


def check_overrides(model_config: Mapping[str, Any]) -> None:
    """``ValueError`` naming the first key of ``model_config['overrides']`` that is no field of
    the model (with the nearest field's name), or one the program sets itself."""
    arch = model_config["arch"]
    allowed = model_fields(arch)
    cls = _model_class_name(arch)
    for key in dict(model_config["overrides"] or {}):
        if key in _SET_BY_THE_PROGRAM:
            raise ValueError(
                f"config.model.overrides.{key} cannot be set: the training program sets {key} itself "
                f"(from the dataset, config.dtype and the devices)."
            )
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ValueError(
                f"config.model.overrides.{key} is not a field of {arch} (resnet_jax.{cls}); {hint}"
                f"its fields: {', '.join(allowed)}."
            )


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    # ml_collections/JSON give lists; Flax module fields must be hashable.
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}


def resolve_dtype(name: str, platform: str | None = None) -> Any:
    """``'auto'`` -> bfloat16 on TPU/GPU and float32 on CPU; else the named dtype.

    ``'float64'`` (parameters too) is a numerics reference: the float64 twin of a run, which
    bounds how far float32 runs may differ by rounding alone. It needs 64-bit JAX."""
    if name == "auto":
        platform = platform or jax.default_backend()
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    if name not in DTYPES:
        raise ValueError(f"config.dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}.")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "config.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
            "jax.config.update('jax_enable_x64', True)) before the run."
        )
    return DTYPES[name]


def create_model(
    config: Any, info: Any, axis_name: str | None = None, *, platform: str | None = None
) -> tuple[nn.Module, Any]:
    """The model for a training config and its dataset (``DatasetInfo``), and its compute dtype.

    ``platform`` (``'tpu'``, ``'gpu'``, ``'cpu'``) resolves ``dtype='auto'`` for a machine other
    than this one (``train.aot`` compiles for a TPU on a CPU); default: JAX's backend."""
    dtype = resolve_dtype(config.dtype, platform)
    model = build_model(
        config.model, info.num_classes, info.image_shape[-1], dtype=dtype, axis_name=axis_name
    )
    return model, dtype


def build_model(
    model_config: Mapping[str, Any],
    num_classes: int,
    img_channels: int,
    *,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
) -> nn.Module:
    """The classifier for ``model_config`` (``arch``, ``overrides``); parameters stay float32
    (float64 when ``dtype`` is float64)."""
    arch = model_config["arch"]  # config.model, or a dict with its fields
    overrides = _tuples(dict(model_config["overrides"] or {}))
    for field in ("drop_rate", "drop_path_rate"):  # timm's regularisers; 0 leaves them unset
        if field in model_config and model_config[field]:
            overrides[field] = model_config[field]
    common = {"img_channels": img_channels, "dtype": dtype, "axis_name": axis_name}
    if dtype == jnp.float64:
        common["param_dtype"] = jnp.float64
    if arch == BASE_ARCH:
        backbone = resnet_jax.ResNetBase(**{**overrides, **common})
        return BaseClassifier(
            backbone=backbone, num_classes=num_classes, dtype=dtype, param_dtype=backbone.param_dtype
        )
    if arch not in resnet_jax.ALL_PRESETS:
        raise ValueError(f"unknown config.model.arch {arch!r}; choose one of: {', '.join(architectures())}.")
    return resnet_jax.get_model(arch, num_classes=num_classes, **{**overrides, **common})
