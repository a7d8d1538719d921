"""resnet_jax: Flax ResNets that match PyTorch (torchvision's; timm's ResNet-D/-T and
SE-ResNets and pre-activation ResNetV2/BiT; labml.ai's annotated ResNet as ``ResNetBase``).

Linen modules here; the same models for Flax NNX in ``resnet_jax.nnx`` (imported on first use,
so Linen users do not pay for importing ``flax.nnx``); meshes in ``resnet_jax.sharding``; the
architectures themselves, for both APIs, in ``resnet_jax.blocks`` and ``resnet_jax.networks``.
"""

import importlib

from resnet_jax import blocks, models, platform, sharding
from resnet_jax.models import (
    ALL_PRESETS,
    PRESETS,
    TORCHVISION_ARCHS,
    BatchNorm,
    Block,
    BottleneckResidualBlock,
    ResidualBlock,
    ResNet,
    ResNetBase,
    ResNetV2,
    ShortcutProjection,
    SqueezeExcite,
    get_model,
)

__version__ = "0.1.0"

# libtpu installed (the tpu and test extras) on a machine without a TPU: use the CPU rather than
# print TPU start-up errors; nothing changes with a TPU or GPU, or with JAX_PLATFORMS set.
platform.skip_absent_tpu_on_import()
# XLA:CPU without YNNPACK, whose convolutions and dots are slower here (before JAX starts only).
platform.xla_cpu_without_ynnpack_on_import()

# One function per preset (``resnet_jax.resnet50``), from the table in ``presets.py``.
globals().update({arch: getattr(models, arch) for arch in ALL_PRESETS})


def __getattr__(name: str):
    if name == "nnx":
        return importlib.import_module("resnet_jax.nnx")
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")


__all__ = [
    "BatchNorm",
    "Block",
    "BottleneckResidualBlock",
    "ALL_PRESETS",
    "PRESETS",
    "TORCHVISION_ARCHS",
    "ResNet",
    "ResNetBase",
    "ResNetV2",
    "ResidualBlock",
    "ShortcutProjection",
    "SqueezeExcite",
    "blocks",
    "get_model",
    "nnx",
    "sharding",
    *ALL_PRESETS,
]
