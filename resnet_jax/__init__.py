"""resnet_jax: Flax ResNets that match PyTorch (torchvision's; timm's ResNet-D/-T and
SE-ResNets; labml.ai's annotated ResNet as ``ResNetBase``).

Linen modules here; the same models for Flax NNX in ``resnet_jax.nnx`` (imported on first use,
so Linen users do not pay for importing ``flax.nnx``); meshes in ``resnet_jax.sharding``.
"""

import importlib

from resnet_jax import sharding
from resnet_jax.blocks import (
    BatchNorm,
    BottleneckResidualBlock,
    ResidualBlock,
    ShortcutProjection,
    SqueezeExcite,
)

# The presets are imported by name, so that IDEs and grep see them, and exported through
# __all__ as PRESETS lists them (which ruff cannot see, hence the noqa).
from resnet_jax.models import (  # noqa: F401
    PRESETS,
    TORCHVISION_ARCHS,
    ResNet,
    ResNetBase,
    get_model,
    resnet18,
    resnet18d,
    resnet26d,
    resnet26t,
    resnet34,
    resnet34d,
    resnet50,
    resnet50d,
    resnet50t,
    resnet101,
    resnet101d,
    resnet152,
    resnet152d,
    resnet200,
    resnet200d,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    seresnet50,
    seresnext26d_32x4d,
    seresnext50_32x4d,
    seresnext101_32x8d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "nnx":
        return importlib.import_module("resnet_jax.nnx")
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")


__all__ = [
    "BatchNorm",
    "BottleneckResidualBlock",
    "PRESETS",
    "TORCHVISION_ARCHS",
    "ResNet",
    "ResNetBase",
    "ResidualBlock",
    "ShortcutProjection",
    "SqueezeExcite",
    "get_model",
    "nnx",
    "sharding",
    *PRESETS,
]
