"""timm's pre-activation ResNets (``timm.models.resnetv2``) for Linen and NNX: ResNetV2 with
BatchNorm, and Big Transfer (BiT) with GroupNorm and weight-standardised convolutions.

The blocks, the stem, the stages and the network, as architecture definitions (``layers.Node``)
with timm's module names, so timm's state_dicts convert both ways; ``networks.NETWORKS`` makes
Linen and NNX ``ResNetV2`` models of them, and ``presets.py`` names timm's architectures.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import ops
from resnet_jax.blocks import BlockType, block_class
from resnet_jax.layers import Conv, Dropout, Layers, Network, Node, Norm, Spec, Stages, check_rate, drop_path

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class PreActBottleneck(Node):
    """The pre-activation bottleneck of ResNetV2 ("Identity Mappings in Deep Residual Networks",
    He et al. 2016) as timm's ``PreActBottleneck``: norm and ReLU come before each conv, and
    nothing follows the addition, so the shortcut is a clean identity path through the whole
    network. The stride is on the 3x3, as in v1.5.

    ``project``: the block's shortcut is timm's ``downsample`` (a 1x1 conv of the pre-activated
    input; with ``avg_down`` a 2x2 average pool first), which timm gives the first block of
    every stage. ``norm`` is ``'batch'`` (the network's BatchNorm) or ``'group'`` (GroupNorm of
    32 groups, BiT's); ``standardize`` is the weight standardisation's epsilon (0: plain convs).
    ``drop_path_rate``: stochastic depth of the residual branch (timm's ``drop_path``).
    """

    in_channels: int
    out_channels: int
    stride: int = 1
    width: int = 0  # 0: out_channels // 4, timm's bottle_ratio 0.25
    groups: int = 1
    project: bool = False
    avg_down: bool = False
    norm: str = "batch"
    standardize: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        check_rate("drop_path_rate", self.drop_path_rate)

    def children(self) -> Mapping[str, Spec]:
        w, std = self.width or self.out_channels // 4, self.standardize
        out: dict[str, Spec] = {}
        if self.project:
            out["downsample"] = Downsample(
                self.in_channels, self.out_channels, self.stride, self.avg_down, std
            )
        out.update({
            "norm1": Norm(self.in_channels, kind=self.norm),
            "conv1": Conv(self.in_channels, w, 1, standardize=std),
            "norm2": Norm(w, kind=self.norm),
            "conv2": Conv(w, w, 3, self.stride, self.groups, standardize=std),
            "norm3": Norm(w, kind=self.norm),
            "conv3": Conv(w, self.out_channels, 1, standardize=std),
        })  # fmt: skip
        if self.drop_path_rate:
            out["drop_path"] = drop_path(self.drop_path_rate)
        return out

    def forward(self, m: Layers, x: Array) -> Array:
        x_preact = m["norm1"](x, act=m.act)
        shortcut = m["downsample"](x_preact) if self.project else x
        y = m["conv1"](x_preact)
        y = m["conv2"](m["norm2"](y, act=m.act))
        y = m["conv3"](m["norm3"](y, act=m.act))
        if self.drop_path_rate:
            y = m["drop_path"](y)
        return y + shortcut


@dataclasses.dataclass(frozen=True)
class Downsample(Node):
    """timm's pre-activation shortcut: ``DownsampleConv`` (a strided 1x1 conv) or, with
    ``avg_down``, ``DownsampleAvg`` (a ``stride`` x ``stride`` average pool, then a 1x1 conv).
    Either way the conv is ``downsample.conv`` and no norm follows it."""

    in_channels: int
    out_channels: int
    stride: int = 1
    avg_down: bool = False
    standardize: float = 0.0

    def children(self) -> Mapping[str, Spec]:
        stride = 1 if self.avg_down else self.stride
        return {"conv": Conv(self.in_channels, self.out_channels, 1, stride, standardize=self.standardize)}

    def forward(self, m: Layers, x: Array) -> Array:
        return m["conv"](ops.avg_pool_ceil(x, self.stride) if self.avg_down else x)


# The blocks of the pre-activation networks (``ResNetV2(block=...)``).
PREACT_BLOCKS: dict[str, type] = {"preact_bottleneck": PreActBottleneck}


@dataclasses.dataclass(frozen=True)
class PreActStem(Node):
    """timm's ResNetV2 stem (``stem.*``), convs only, since the first block's norm pre-activates:
    a 7x7/2 conv (``stem.conv``), or with ``stem_type='deep'`` three 3x3 convs with norm and ReLU
    between (``stem.conv1``, ``norm1``, ``conv2``, ``norm2``, ``conv3``); then a 3x3/2 max-pool.
    ``'fixed'`` (BiT's) pads with one row of zeros and pools without padding, which is what
    TensorFlow's SAME pooling of the original BiT gave on even sizes."""

    in_channels: int
    out_channels: int
    stem_type: str = ""
    norm: str = "batch"
    standardize: float = 0.0

    def children(self) -> Mapping[str, Spec]:
        cin, out, std = self.in_channels, self.out_channels, self.standardize
        if self.stem_type != "deep":
            return {"conv": Conv(cin, out, 7, 2, standardize=std)}
        mid = out // 2
        return {
            "conv1": Conv(cin, mid, 3, 2, standardize=std),
            "norm1": Norm(mid, kind=self.norm),
            "conv2": Conv(mid, mid, 3, standardize=std),
            "norm2": Norm(mid, kind=self.norm),
            "conv3": Conv(mid, out, 3, standardize=std),
        }

    def forward(self, m: Layers, x: Array) -> Array:
        if self.stem_type == "deep":
            x = m["norm1"](m["conv1"](x), act=m.act)
            x = m["norm2"](m["conv2"](x), act=m.act)
            x = m["conv3"](x)
        else:
            x = m["conv"](x)
        if self.stem_type == "fixed":
            return ops.max_pool_3x3_valid(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
        return ops.max_pool_3x3(x)


@dataclasses.dataclass(frozen=True)
class Stage(Node):
    """timm's ``ResNetStage``: ``blocks.0``, ``blocks.1``, ... in sequence."""

    blocks: tuple[Node, ...]

    def children(self) -> Mapping[str, Spec]:
        return {f"blocks.{i}": b for i, b in enumerate(self.blocks)}

    def forward(self, m: Layers, x: Array) -> Array:
        for i in range(len(self.blocks)):
            x = m[f"blocks.{i}"](x)
        return x


@dataclasses.dataclass(frozen=True)
class ConvHead(Node):
    """timm's ``ClassifierHead(use_conv=True)``: dropout of ``drop_rate`` (``head.drop``), then
    ``head.fc``, a 1x1 conv with a bias on the pooled ``[batch, 1, 1, channels]`` features."""

    in_channels: int
    num_classes: int
    drop_rate: float = 0.0

    def children(self) -> Mapping[str, Spec]:
        out: dict[str, Spec] = {"fc": Conv(self.in_channels, self.num_classes, 1, bias=True)}
        if self.drop_rate:
            out["drop"] = Dropout(self.drop_rate)
        return out

    def forward(self, m: Layers, x: Array) -> Array:
        if self.drop_rate:
            x = m["drop"](x)
        return m["fc"](x[:, None, None, :])[:, 0, 0, :]


@dataclasses.dataclass(frozen=True)
class ResNetV2Def(Network):
    """timm's pre-activation ResNet (``timm.models.resnetv2``): ResNetV2 with BatchNorm, and Big
    Transfer (BiT, Kolesnikov et al. 2020) with GroupNorm and weight-standardised convolutions.

    Pre-activation blocks (``blocks.PreActBottleneck``) put norm and ReLU before each conv, so
    the identity path runs from the stem to the final ``norm`` untouched. BiT replaces
    BatchNorm by GroupNorm and standardises every conv's weights, so nothing depends on the
    batch: that is what lets it pre-train at huge batch and fine-tune at any batch, which is
    why its ImageNet-21k weights transfer well. Module names are timm's (``stem.conv``,
    ``stages.0.blocks.0.norm1``, ``norm``, ``head.fc``), so timm state_dicts convert both ways.

    Attributes:
        stage_sizes: Blocks per stage (timm's ``layers``), e.g. ``(3, 4, 6, 3)``.
        block: ``'preact_bottleneck'`` or a block class.
        num_classes: Classifier size; None: no ``head``, the model returns the pooled features.
        channels: Output channels per stage before ``width_factor``.
        width_factor: Channel multiplier (BiT's x1, x3, ...).
        stem_width: The stem's output channels before ``width_factor`` (timm's ``stem_chs``).
        stem_type: ``''`` (7x7 conv, max-pool), ``'fixed'`` (BiT's zero-padded pool) or
            ``'deep'`` (three 3x3 convs).
        avg_down: Average-pool downsampling shortcuts (ResNet-D).
        norm_layer: ``'batch'`` (BatchNorm) or ``'group'`` (GroupNorm, 32 groups).
        std_conv_eps: Weight standardisation's epsilon in every conv; 0: plain convs (BiT: 1e-8).
        drop_rate: Dropout before the classifier in training (timm's ``head.drop``); none
            without a classifier.
        drop_path_rate: Stochastic depth: the last block's drop-path probability in training,
            rising linearly from 0 at the first block (timm's ``drop_path_rate``).
        img_channels: Input image channels.
        momentum: BatchNorm momentum, Flax's convention (0.9 is PyTorch's 0.1).
        epsilon: BatchNorm epsilon.
        axis_name: A ``pmap`` axis for synchronised BatchNorm; None under ``jax.jit``.
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
    """

    stage_sizes: Sequence[int]
    block: BlockType = "preact_bottleneck"
    num_classes: Optional[int] = 1000
    channels: Sequence[int] = (256, 512, 1024, 2048)
    width_factor: int = 1
    stem_width: int = 64
    stem_type: str = ""
    avg_down: bool = False
    norm_layer: str = "batch"
    std_conv_eps: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    img_channels: int = 3
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def stem_node(self) -> PreActStem:
        if self.stem_type not in ("", "fixed", "deep"):
            raise ValueError(f"stem_type must be '', 'fixed' or 'deep'; got {self.stem_type!r}.")
        if self.norm_layer not in ("batch", "group"):
            raise ValueError(f"norm_layer must be 'batch' or 'group'; got {self.norm_layer!r}.")
        width = self.stem_width * self.width_factor
        return PreActStem(self.img_channels, width, self.stem_type, self.norm_layer, self.std_conv_eps)

    def stages(self) -> Stages:
        cls = block_class(self.block, PREACT_BLOCKS)
        stages, cin = [], self.stem_node().out_channels
        sizes = tuple(self.stage_sizes[: len(self.channels)])
        rates = iter(linspace_float32(self.drop_path_rate, sum(sizes)))
        for i, (n, c) in enumerate(zip(sizes, self.channels)):
            out = c * self.width_factor
            blocks = []
            for j in range(n):
                block = cls(
                    cin, out, 2 if (i > 0 and j == 0) else 1, project=j == 0, avg_down=self.avg_down,
                    norm=self.norm_layer, standardize=self.std_conv_eps, drop_path_rate=next(rates),
                )  # fmt: skip
                blocks.append((f"stages.{i}.blocks.{j}", block))
                cin = out
            stages.append((f"stage{i + 1}", tuple(blocks)))
        return tuple(stages)

    def children(self) -> Mapping[str, Spec]:
        out: dict[str, Spec] = {"stem": self.stem_node()}
        for i, (_, blocks) in enumerate(self.stages()):
            out[f"stages.{i}"] = Stage(tuple(b for _, b in blocks))
        out["norm"] = Norm(self.out_channels, kind=self.norm_layer)
        if self.num_classes is not None:
            out["head"] = ConvHead(self.out_channels, self.num_classes, self.drop_rate)
        return out

    def features(self, m: Layers, x: Array) -> dict[str, Array]:
        x = m["stem"](x)
        feats = {"stem": x}
        for i, (key, _) in enumerate(self.stages()):
            x = m[f"stages.{i}"](x)
            feats[key] = x
        return feats

    def head(self, m: Layers, feats: Mapping[str, Array]) -> Array:
        x = m["norm"](feats[self.stages()[-1][0]], act=m.act)
        pooled = ops.global_avg_pool(x).astype(self.dtype)
        if self.num_classes is None:
            return pooled
        return m["head"](pooled).astype(jnp.promote_types(self.param_dtype, jnp.float32))


def linspace_float32(stop: float, n: int) -> list[float]:
    """``torch.linspace(0, stop, n).tolist()`` as PyTorch's CPU kernel computes it in float32: a
    float32 step, the first half up from 0 and the second half down from ``stop``, each value one
    fused multiply-add (one rounding, done here in float64, where the product is exact). These
    are timm's ResNetV2 drop-path rates per block (``calculate_drop_path_rates``), to the bit."""
    if n < 2:
        return [0.0] * n
    end = np.float32(stop)
    step = float(end / np.float32(n - 1))
    return [float(np.float32(step * i if i < n // 2 else float(end) - step * (n - 1 - i))) for i in range(n)]
