"""The residual blocks of labml.ai's annotated ResNet (``labml_nn.resnet``), torchvision and timm,
one class each, for Linen and NNX alike.

Each block is an architecture definition (``layers.Node``): :meth:`children` lists its layers by
their PyTorch names, and :meth:`forward` connects them, top to bottom. A network takes a block
class (or its registered name, ``BLOCKS``) per stage family, as timm and Flax's
``examples/imagenet`` do; a new block type is one new class here.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Union

import jax

from resnet_jax import ops
from resnet_jax.layers import Conv, Layers, Node, Norm, Spec, check_rate, drop_path

Array = jax.Array

# The PyTorch module of a block's projection shortcut: labml's ``ShortcutProjection`` (``shortcut``:
# ``shortcut.conv``, ``shortcut.bn``) or torchvision's ``nn.Sequential`` (``downsample.0``/``.1``;
# timm's ``downsample.1``/``.2`` after the pool with ``avg_down``).
PROJECTIONS = ("shortcut", "downsample")
# Attention after a branch's last BatchNorm, as timm's ``attn_layer``: none, or squeeze-and-excitation.
ATTN_LAYERS = ("", "se")


def se_channels(channels: int, rd_ratio: float = 1.0 / 16, divisor: int = 8) -> int:
    """Width of the squeeze-and-excitation bottleneck of ``channels``: timm's ``SEModule``
    default, ``make_divisible(channels * rd_ratio, divisor, round_limit=0)``, i.e. rounded to the
    nearest multiple of ``divisor`` (halves up), and at least ``divisor``."""
    return max(divisor, int(channels * rd_ratio + divisor / 2) // divisor * divisor)


@dataclasses.dataclass(frozen=True)
class ShortcutProjection(Node):
    """The projection ``W_s x`` of the shortcut: 1x1 conv (with the block's stride) and BatchNorm,
    as labml.ai's annotated ResNet names it (``shortcut.conv``, ``shortcut.bn``).

    He et al. found projections better than zero-padding when the shape changes, and identity
    better than projections when it does not, so blocks only build one when they must.
    """

    in_channels: int
    out_channels: int
    stride: int = 1

    def children(self) -> Mapping[str, Spec]:
        return {
            "conv": Conv(self.in_channels, self.out_channels, 1, self.stride),
            "bn": Norm(self.out_channels),
        }

    def forward(self, m: Layers, x: Array) -> Array:
        return m["bn"](m["conv"](x))


@dataclasses.dataclass(frozen=True)
class SqueezeExcite(Node):
    """timm's ``SEModule`` (``fc1``, ``fc2``: 1x1 convs with biases); see ``ops.squeeze_excite``."""

    channels: int

    def children(self) -> Mapping[str, Spec]:
        reduced = se_channels(self.channels)
        return {
            "fc1": Conv(self.channels, reduced, 1, bias=True),
            "fc2": Conv(reduced, self.channels, 1, bias=True),
        }

    def forward(self, m: Layers, x: Array) -> Array:
        return ops.squeeze_excite(x, m["fc1"], m["fc2"])


@dataclasses.dataclass(frozen=True)
class ResidualBlock(Node):
    """What every post-activation block shares: ``act(F(x) + shortcut(x))``.

    Learning the residual ``F(x) = H(x) - x`` instead of ``H(x)`` makes an identity mapping the
    easy default, which is what lets very deep stacks train at all (the degradation problem).
    Subclasses give the branch ``F``: its layers (:meth:`branch`) and its forward up to the last
    conv (:meth:`forward`). ``projection`` names the shortcut's projection as labml
    (``'shortcut'``) or torchvision and timm (``'downsample'``); ``avg_down`` (ResNet-D, "Bag of
    Tricks", He et al. 2019) makes a strided projection a ``stride`` x ``stride`` average pool and
    a stride-1 1x1 conv, so it sees every input pixel instead of a quarter of them;
    ``attn_layer='se'`` adds timm's squeeze-and-excitation after the last BatchNorm;
    ``drop_path_rate`` drops the whole branch of an example with this probability in training
    (stochastic depth, Huang et al. 2016; timm's ``drop_path``), just before the addition.
    """

    in_channels: int
    out_channels: int
    stride: int = 1
    width: int = 0  # the branch's inner width; 0: out_channels (a basic block has no other)
    groups: int = 1
    projection: str = "shortcut"
    avg_down: bool = False
    attn_layer: str = ""
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0

    def __post_init__(self):
        check_rate("drop_path_rate", self.drop_path_rate)
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be 'shortcut' or 'downsample'; got {self.projection!r}.")
        if self.attn_layer not in ATTN_LAYERS:
            raise ValueError(
                f"attn_layer must be '' or 'se' (timm's squeeze-and-excitation); got {self.attn_layer!r}."
            )

    def branch(self) -> dict[str, Spec]:
        raise NotImplementedError

    def children(self) -> Mapping[str, Spec]:
        out = self.branch()
        if self.stride != 1 or self.in_channels != self.out_channels:
            cin, cout = self.in_channels, self.out_channels
            if self.projection == "shortcut":
                out["shortcut"] = ShortcutProjection(cin, cout, self.stride)
            elif self.avg_down:  # downsample.0 is the (parameter-free) pool, an identity at stride 1
                out.update({"downsample.1": Conv(cin, cout, 1), "downsample.2": Norm(cout)})
            else:
                out.update({"downsample.0": Conv(cin, cout, 1, self.stride), "downsample.1": Norm(cout)})
        if self.attn_layer == "se":
            out["se"] = SqueezeExcite(self.out_channels)
        if self.drop_path_rate:
            out["drop_path"] = drop_path(self.drop_path_rate)
        return out

    def shortcut(self, m: Layers, x: Array) -> Array:
        """``x``, or its projection when the block changes the shape."""
        if self.stride == 1 and self.in_channels == self.out_channels:
            return x
        if self.projection == "shortcut":
            return m["shortcut"](x)
        if self.avg_down:
            return m["downsample.2"](m["downsample.1"](ops.avg_pool_ceil(x, self.stride)))
        return m["downsample.1"](m["downsample.0"](x))

    def end(self, m: Layers, y: Array, shortcut: Array, norm: str) -> Array:
        """The last BatchNorm ``norm`` of the branch output ``y``, then (SE, drop path,) the
        addition and ``act``."""
        if not (self.attn_layer or self.drop_path_rate):
            return m[norm](y, residual=shortcut, act=m.act)  # norm -> add -> act, foldable into one pass
        y = m[norm](y)
        if self.attn_layer == "se":
            y = m["se"](y)
        if self.drop_path_rate:
            y = m["drop_path"](y)
        return m.act(y + shortcut)

    def last_norm(self, channels: int) -> Norm:
        return Norm(channels, zero_init=self.zero_init_residual)


@dataclasses.dataclass(frozen=True)
class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions and a shortcut: ``relu(F(x) + x)``, the block of ResNet-18/34. The
    stride sits on the first convolution."""

    expansion = 1

    def __post_init__(self):
        super().__post_init__()
        if self.groups != 1 or self.width not in (0, self.out_channels):
            raise ValueError("basic blocks support only groups=1 and width_per_group=64 (as torchvision).")

    def branch(self) -> dict[str, Spec]:
        cin, cout = self.in_channels, self.out_channels
        return {
            "conv1": Conv(cin, cout, 3, self.stride),
            "bn1": Norm(cout),
            "conv2": Conv(cout, cout, 3),
            "bn2": self.last_norm(cout),
        }

    def forward(self, m: Layers, x: Array) -> Array:
        y = m["bn1"](m["conv1"](x), act=m.act)
        shortcut = self.shortcut(m, x)
        return self.end(m, m["conv2"](y), shortcut, "bn2")


@dataclasses.dataclass(frozen=True)
class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided, optionally grouped), 1x1 expand, plus a shortcut.

    Running the expensive 3x3 on ``width`` channels instead of ``out_channels`` is what makes
    50+ layer networks affordable. The stride is on the 3x3 (ResNet v1.5, as torchvision), and
    ``groups > 1`` gives the ResNeXt block.
    """

    expansion = 4

    def branch(self) -> dict[str, Spec]:
        w = self.width or self.out_channels
        return {
            "conv1": Conv(self.in_channels, w, 1),
            "bn1": Norm(w),
            "conv2": Conv(w, w, 3, self.stride, self.groups),
            "bn2": Norm(w),
            "conv3": Conv(w, self.out_channels, 1),
            "bn3": self.last_norm(self.out_channels),
        }

    def forward(self, m: Layers, x: Array) -> Array:
        y = m["bn1"](m["conv1"](x), act=m.act)
        y = m["bn2"](m["conv2"](y), act=m.act)
        shortcut = self.shortcut(m, x)
        return self.end(m, m["conv3"](y), shortcut, "bn3")


# Block classes by the names that configs and presets use (``ResNet(block='bottleneck')``).
BLOCKS: dict[str, type] = {"basic": BasicBlock, "bottleneck": Bottleneck}
BlockType = Union[str, type]


def block_class(block: BlockType, registry: Mapping[str, type] = BLOCKS) -> type:
    """The block class of ``block``: a class, or a name in ``registry`` (a network family's)."""
    if isinstance(block, type) and issubclass(block, Node):
        return block
    if isinstance(block, str) and block in registry:
        return registry[block]
    names = " or ".join(map(repr, registry))
    raise ValueError(f"block must be {names} or a block class; got {block!r}.")
