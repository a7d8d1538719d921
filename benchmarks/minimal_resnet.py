"""A minimal hand-written Flax ResNet, the baseline for "no abstraction overhead" benchmarks.

Same architecture as ``resnet_jax.get_model(arch)`` for the basic/bottleneck presets without
groups (ResNet-18/34/50/101/152/200): torchvision's v1.5 layout, explicit symmetric padding,
stride on the 3x3 conv, projection shortcuts only where the shape changes. It uses
``flax.linen.BatchNorm`` directly and nothing from ``resnet_jax`` except the stage sizes, so
``benchmarks.train_step --compare-minimal`` measures what the library's structure costs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k // 2, k // 2), (k // 2, k // 2))


class MinimalResNet(nn.Module):
    """ResNet with basic (``bottleneck=False``) or bottleneck blocks; float32 logits."""

    stage_sizes: Sequence[int]
    bottleneck: bool = True
    num_classes: int = 1000
    small_stem: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
        )
        x = x.astype(self.dtype)
        if self.small_stem:
            x = nn.relu(norm()(conv(64, (3, 3), padding=_pad(3))(x)))
        else:
            x = nn.relu(norm()(conv(64, (7, 7), strides=2, padding=_pad(7))(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        for i, n in enumerate(self.stage_sizes):
            planes = 64 * 2**i
            out = planes * 4 if self.bottleneck else planes
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                shortcut = x
                if stride != 1 or x.shape[-1] != out:
                    shortcut = norm()(conv(out, (1, 1), strides=stride, padding="VALID")(x))
                if self.bottleneck:
                    y = nn.relu(norm()(conv(planes, (1, 1), padding="VALID")(x)))
                    y = nn.relu(norm()(conv(planes, (3, 3), strides=stride, padding=_pad(3))(y)))
                    y = norm()(conv(out, (1, 1), padding="VALID")(y))
                else:
                    y = nn.relu(norm()(conv(planes, (3, 3), strides=stride, padding=_pad(3))(x)))
                    y = norm()(conv(planes, (3, 3), padding=_pad(3))(y))
                x = nn.relu(y + shortcut)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def minimal_resnet(
    arch: str,
    num_classes: int = 1000,
    *,
    small_stem: bool = False,
    dtype: Any = jnp.float32,
    stage_sizes: Sequence[int] | None = None,
) -> MinimalResNet:
    """The minimal twin of ``resnet_jax.get_model(arch, ...)`` (no ResNeXt / wide presets).

    ``stage_sizes`` replaces the preset's blocks per stage, as the same ``get_model`` override.
    """
    from resnet_jax import PRESETS

    preset = PRESETS.get(arch)
    if preset is None or set(preset) - {"stage_sizes", "block"}:
        supported = [a for a, p in PRESETS.items() if not set(p) - {"stage_sizes", "block"}]
        raise ValueError(f"the minimal ResNet has no {arch!r}; it supports {', '.join(supported)}.")
    return MinimalResNet(
        stage_sizes=tuple(stage_sizes or preset["stage_sizes"]),
        bottleneck=preset.get("block", "bottleneck") == "bottleneck",
        num_classes=num_classes,
        small_stem=small_stem,
        dtype=dtype,
    )
