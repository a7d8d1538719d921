"""Which architecture a PyTorch state_dict belongs to, from its keys and shapes alone.

torchvision's ResNet layout, timm's (deep and tiered stems, average-pool shortcuts,
squeeze-and-excitation) and labml.ai's annotated ResNet (``ResNetBase``) are recognised;
:func:`infer_fields` returns the class name and fields, which build the model in either API.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from resnet_jax.layout import shape, strip_wrappers
from resnet_jax.mismatch import StateDictMismatchError

Shapes = Mapping[str, tuple[int, ...]]
_AVG_SHORTCUT = re.compile(r"layer\d+\.\d+\.downsample\.1\.weight")


def infer_fields(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``('ResNet' | 'ResNetBase' | 'ResNetV2', fields)`` of the model a state_dict belongs to."""
    shapes = {k: shape(v) for k, v in strip_wrappers(state_dict).items()}
    if ("conv1.weight" in shapes or "conv1.0.weight" in shapes) and any(
        k.startswith("layer1.") for k in shapes
    ):
        return "ResNet", _resnet_fields(shapes)
    if "conv.weight" in shapes and "blocks.0.conv1.weight" in shapes:
        return "ResNetBase", _resnetbase_fields(shapes)
    if "stages.0.blocks.0.norm1.weight" in shapes:
        return "ResNetV2", _resnetv2_fields(shapes)
    raise StateDictMismatchError(
        "not a ResNet state_dict: expected torchvision keys (conv1.*, layer1.*, ...), timm keys "
        "(conv1.0.*, layer1.*, ...; ResNetV2: stem.*, stages.N.*) or labml.ai's ResNetBase keys "
        "(conv.*, bn.*, blocks.N.*); first "
        f"keys are {list(shapes)[:5]}."
    )


def infer_model(state_dict: Mapping[str, Any]) -> Any:
    """The Linen model (``resnet_jax.ResNet`` or ``ResNetBase``) a state_dict belongs to.

    For labml.ai's ResNetBase, stages start at block 0 and at each block with a projection
    shortcut. Strides show in its weights only in one place: a block that projects its shortcut
    although its channel count does not change must be strided (the annotated labml ResNet
    strides its very first block, so block 0 has a projection). Where the channel count changes
    the stride cannot be known from the weights; those stages follow the convention block 0
    reveals: stride 1 after a strided block 0 (labml's), else stride 2 (the default
    ``(1, 2, 2, ...)``). Pass your own model to ``torch_to_flax`` when that guess is not yours.
    """
    from resnet_jax import models

    kind, fields = infer_fields(state_dict)
    return getattr(models, kind)(**fields)


def _resnet_fields(shapes: Shapes) -> dict[str, Any]:
    stage_sizes = []
    while any(k.startswith(f"layer{len(stage_sizes) + 1}.") for k in shapes):
        i = len(stage_sizes) + 1
        stage_sizes.append(max(int(k.split(".")[1]) for k in shapes if k.startswith(f"layer{i}.")) + 1)
    fields: dict[str, Any] = dict(stage_sizes=tuple(stage_sizes))
    bottleneck = "layer1.0.conv3.weight" in shapes
    fields["block"] = "bottleneck" if bottleneck else "basic"
    if bottleneck:
        width, in_per_group = shapes["layer1.0.conv2.weight"][:2]
        groups = width // in_per_group
        fields.update(groups=groups, width_per_group=width // groups)
    if "conv1.0.weight" in shapes:  # timm's deep stem: conv1.0, conv1.3, conv1.6
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
    fields["avg_down"] = any(_AVG_SHORTCUT.fullmatch(k) and len(s) == 4 for k, s in shapes.items())
    fields["attn_layer"] = "se" if "layer1.0.se.fc1.weight" in shapes else ""
    fields["num_classes"] = shapes["fc.weight"][0] if "fc.weight" in shapes else None
    return fields


def _resnetv2_fields(shapes: Shapes) -> dict[str, Any]:
    """timm's ResNetV2: GroupNorm (no running statistics) means BiT, whose convs are weight
    standardised and whose stem pool is 'fixed'; a deep stem comes with average-pool shortcuts,
    as in timm's -d presets (the pool has no weights to tell)."""
    stage_sizes = []
    while f"stages.{len(stage_sizes)}.blocks.0.conv1.weight" in shapes:
        i = len(stage_sizes)
        stage_sizes.append(
            1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(f"stages.{i}.blocks."))
        )
    group = "stages.0.blocks.0.norm1.running_mean" not in shapes
    deep = "stem.conv1.weight" in shapes
    stem = shapes["stem.conv3.weight" if deep else "stem.conv.weight"]
    outs = [shapes[f"stages.{i}.blocks.0.conv3.weight"][0] for i in range(len(stage_sizes))]
    width_factor = max(stem[0] // 64, 1)
    return dict(
        stage_sizes=tuple(stage_sizes),
        channels=tuple(c // width_factor for c in outs),
        width_factor=width_factor,
        stem_width=stem[0] // width_factor,
        stem_type="deep" if deep else "fixed" if group else "",
        avg_down=deep,
        norm_layer="group" if group else "batch",
        std_conv_eps=1e-8 if group else 0.0,
        img_channels=shapes["stem.conv1.weight" if deep else "stem.conv.weight"][1],
        num_classes=shapes["head.fc.weight"][0] if "head.fc.weight" in shapes else None,
    )


def _resnetbase_fields(shapes: Shapes) -> dict[str, Any]:
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
    return dict(
        n_blocks=tuple(n_blocks),
        n_channels=tuple(n_channels),
        bottlenecks=tuple(widths) if bottleneck else None,
        img_channels=conv[1],
        first_kernel_size=conv[2],
        strides=None if strides == (1,) + (2,) * (len(strides) - 1) else strides,
        conv_bias="conv.bias" in shapes,
    )
