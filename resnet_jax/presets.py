"""The presets of both APIs, in one table: name -> the network definition's fields.

Architectures as torchvision.models; resnet200 as in He et al. 2016 ("Identity Mappings in Deep
Residual Networks"), which torchvision does not ship; the -D, -T and SE (squeeze-and-excitation)
variants as timm.models.resnet, which names them the same. ``models.py`` and ``nnx.py`` generate
their preset functions and ``__all__`` from this table.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

_D = dict(stem_type="deep", stem_width=32, avg_down=True)
_T = dict(stem_type="deep_tiered", stem_width=32, avg_down=True)
_SE = dict(attn_layer="se")

PRESETS: Mapping[str, Mapping[str, Any]] = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3)),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3)),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3)),
    "resnet200": dict(stage_sizes=(3, 24, 36, 3)),
    "wide_resnet50_2": dict(stage_sizes=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": dict(stage_sizes=(3, 4, 23, 3), width_per_group=128),
    "resnext50_32x4d": dict(stage_sizes=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": dict(stage_sizes=(3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": dict(stage_sizes=(3, 4, 23, 3), groups=64, width_per_group=4),
    "resnet18d": dict(stage_sizes=(2, 2, 2, 2), block="basic", **_D),
    "resnet34d": dict(stage_sizes=(3, 4, 6, 3), block="basic", **_D),
    "resnet26d": dict(stage_sizes=(2, 2, 2, 2), **_D),
    "resnet50d": dict(stage_sizes=(3, 4, 6, 3), **_D),
    "resnet101d": dict(stage_sizes=(3, 4, 23, 3), **_D),
    "resnet152d": dict(stage_sizes=(3, 8, 36, 3), **_D),
    "resnet200d": dict(stage_sizes=(3, 24, 36, 3), **_D),
    "resnet26t": dict(stage_sizes=(2, 2, 2, 2), **_T),
    "resnet50t": dict(stage_sizes=(3, 4, 6, 3), **_T),
    "seresnet50": dict(stage_sizes=(3, 4, 6, 3), **_SE),
    "seresnext50_32x4d": dict(stage_sizes=(3, 4, 6, 3), groups=32, width_per_group=4, **_SE),
    "seresnext101_32x8d": dict(stage_sizes=(3, 4, 23, 3), groups=32, width_per_group=8, **_SE),
    "seresnext26d_32x4d": dict(stage_sizes=(2, 2, 2, 2), groups=32, width_per_group=4, **_SE, **_D),
}
# timm's pre-activation ResNets (``ResNetV2``): BatchNorm ones, and BiT's GroupNorm and
# weight-standardised convolutions with its zero-padded stem pool.
_BIT = dict(stem_type="fixed", norm_layer="group", std_conv_eps=1e-8)
RESNETV2_PRESETS: Mapping[str, Mapping[str, Any]] = {
    "resnetv2_50": dict(stage_sizes=(3, 4, 6, 3)),
    "resnetv2_50d": dict(stage_sizes=(3, 4, 6, 3), stem_type="deep", avg_down=True),
    "resnetv2_101": dict(stage_sizes=(3, 4, 23, 3)),
    "resnetv2_50x1_bit": dict(stage_sizes=(3, 4, 6, 3), **_BIT),
    "resnetv2_101x1_bit": dict(stage_sizes=(3, 4, 23, 3), **_BIT),
}
# Every preset's model class (a key of ``networks.NETWORKS``), and all presets by name.
FAMILIES: Mapping[str, Mapping[str, Mapping[str, Any]]] = {"ResNet": PRESETS, "ResNetV2": RESNETV2_PRESETS}
ALL_PRESETS: Mapping[str, Mapping[str, Any]] = {a: f for table in FAMILIES.values() for a, f in table.items()}


def family(arch: str) -> str:
    """The model class of the preset ``arch``: ``'ResNet'`` or ``'ResNetV2'``."""
    check_arch(arch)
    return next(name for name, table in FAMILIES.items() if arch in table)


def check_arch(arch: str) -> None:
    if arch not in ALL_PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ALL_PRESETS)}.")


# The presets whose architecture torchvision ships (the others come from timm).
TORCHVISION_ARCHS = tuple(a for a, f in PRESETS.items() if "stem_type" not in f and "attn_layer" not in f)


def preset_source(arch: str) -> str:
    """``'torchvision'`` or ``'timm'``: where the preset ``arch`` comes from."""
    return "torchvision" if arch in TORCHVISION_ARCHS else "timm"


def preset_fields(arch: str, overrides: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    """The fields of the preset ``arch`` with ``overrides``, each checked: ``arch`` is a preset and
    every override one of the ``known`` fields."""
    check_arch(arch)
    unknown = set(overrides) - set(known)
    if unknown:
        raise TypeError(f"unknown {family(arch)} field(s) {sorted(unknown)} for {arch}.")
    return {**ALL_PRESETS[arch], **overrides}
