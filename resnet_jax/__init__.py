"""resnet_jax: Flax Linen ResNets that match PyTorch (torchvision and the seed's ResNetBase)."""

from resnet_jax.blocks import (
    BatchNorm,
    BottleneckResidualBlock,
    ResidualBlock,
    ShortcutProjection,
)
from resnet_jax.models import (
    PRESETS,
    ResNet,
    ResNetBase,
    get_model,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnet200,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BottleneckResidualBlock",
    "PRESETS",
    "ResNet",
    "ResNetBase",
    "ResidualBlock",
    "ShortcutProjection",
    "get_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
