"""The networks, as architecture definitions: their fields (declared once, with defaults and
docs), their layers by PyTorch name, and their forward. ``models.py`` (Linen) and ``nnx.py`` (NNX)
build their ``ResNet`` and ``ResNetBase`` from these classes, so both APIs have the same fields,
defaults, layers and computation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from resnet_jax.blocks import ATTN_LAYERS, BLOCKS, BlockType, block_class
from resnet_jax.layers import Conv, Dropout, Layers, Linear, Network, Spec, Stages, StemLayer
from resnet_jax.resnetv2 import ResNetV2Def

Array = jax.Array
Dtype = Any

STEM_TYPES = ("", "deep", "deep_tiered")


@dataclasses.dataclass(frozen=True)
class ResNetDef(Network):
    """ResNet classifier with torchvision's architecture (v1.5) and module names.

    ``block`` is ``'basic'`` (ResNet-18/34), ``'bottleneck'``, or a block class
    (``resnet_jax.blocks``); ``groups`` and ``width_per_group`` give ResNeXt and Wide ResNet.
    ``small_stem=True`` replaces the 7x7/2 conv and max-pool by a 3x3/1 conv, for 32x32 inputs
    such as CIFAR. ``num_classes=None`` drops ``fc`` and returns pooled features. Per-stage maps
    (C2..C5) come from ``features``. Logits are returned in float32 whatever ``dtype`` is.

    ``train`` defaults to True, as in Flax's ``examples/imagenet`` (whose trainer calls
    ``init``/``apply`` without it, so this class is a drop-in there) and as a new PyTorch or NNX
    model is in train mode. A Linen training pass updates ``batch_stats``, so
    ``model.apply(variables, x)`` without ``mutable=['batch_stats']`` raises Flax's "collection is
    immutable" error; pass ``train=False`` to evaluate.

    timm's stem and shortcut options, with timm's parameter names (so timm weights convert):
    ``stem_type='deep'`` replaces the 7x7 conv by three 3x3 convs (``'deep_tiered'``: a narrower
    first one); ``avg_down=True`` makes each downsampling shortcut a 2x2 average pool followed by
    a stride-1 1x1 conv (``downsample.1``/``.2``). Deep stem plus ``avg_down`` is ResNet-D ("Bag
    of Tricks", He et al. 2019): strided 1x1 convs discard three quarters of their input, and a
    7x7 conv costs as much as three 3x3 ones. ``attn_layer='se'`` adds timm's
    squeeze-and-excitation to every block (``layerN.M.se.fc1``, ``fc2``): SE-ResNet and
    SE-ResNeXt.

    timm's regularisers, off by default: ``drop_path_rate`` is stochastic depth (Huang et al.
    2016): in training each block's residual branch is dropped for a whole example with a
    probability rising linearly from 0 at the first block to ``drop_path_rate`` at the last, as
    timm's ``ResNet``; ``drop_rate`` is dropout before ``fc``. Both draw from the ``'dropout'``
    RNG (Linen: ``apply(..., rngs={'dropout': key})``; NNX: ``nnx.Rngs(dropout=...)``) and are
    the identity in evaluation.

    Speed options that leave every value unchanged (up to float32 rounding): ``bn_variance``
    (``'two_pass'``, the default, or the one-pass ``'shifted'``; see ``batchnorm.batch_norm``),
    ``bn_recompute`` (BatchNorm's backward keeps its input in ``dtype`` instead of float32),
    ``bn_fused`` (each BatchNorm with its add and ReLU as one custom VJP; an experiment) and
    ``stem_pad_channels`` (the stem convolution pads its input channels with zeros to this
    multiple: ``None``, the default, means 8 on GPUs, where a 3-channel stem leaves cuDNN on slow
    kernels, and off elsewhere; 0 = off).

    Attributes:
        stage_sizes: Blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        block: ``'basic'``, ``'bottleneck'`` or a block class.
        num_classes: Classifier size; None: no ``fc``, the model returns pooled features.
        groups: Grouped 3x3 convs in bottleneck blocks (ResNeXt's cardinality).
        width_per_group: Bottleneck width per group (64 standard; 128 for Wide ResNet).
        img_channels: Input image channels.
        small_stem: 3x3/1 stem conv without max-pool, for 32x32 inputs.
        stem_type: ``''`` (torchvision's 7x7), ``'deep'`` or ``'deep_tiered'`` (timm's).
        stem_width: Width of the deep stem's first convs (timm's ``stem_width``).
        avg_down: Average-pool downsampling shortcuts (timm's ``avg_down``).
        attn_layer: ``''`` or ``'se'`` (squeeze-and-excitation in every block).
        zero_init_residual: Initialise each block's last BatchNorm scale to 0, so every block
            starts as the identity (torchvision's option of the same name).
        drop_rate: Dropout before ``fc`` in training (timm's ``drop_rate``); none without ``fc``.
        drop_path_rate: Stochastic depth: the last block's drop-path probability in training
            (timm's ``drop_path_rate``).
        momentum: BatchNorm momentum, Flax's convention (0.9 is PyTorch's 0.1).
        epsilon: BatchNorm epsilon.
        axis_name: A ``pmap`` axis for synchronised BatchNorm; None under ``jax.jit``.
        bn_variance: ``'two_pass'`` or ``'shifted'`` BatchNorm variance.
        bn_recompute: Recompute BatchNorm in the backward pass instead of storing float32 copies.
        bn_fused: In training, each BatchNorm with the add and ReLU after it is one custom-VJP
            pass (``batchnorm.batch_norm(fused=True)``; an experiment for the GPU, values unchanged).
        stem_pad_channels: Pad the stem conv's input channels to this multiple; None: 8 on GPUs,
            off elsewhere; 0: off.
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
    """

    stage_sizes: Sequence[int]
    block: BlockType = "bottleneck"
    num_classes: Optional[int] = 1000
    groups: int = 1
    width_per_group: int = 64
    img_channels: int = 3
    small_stem: bool = False
    stem_type: str = ""
    stem_width: int = 64
    avg_down: bool = False
    attn_layer: str = ""
    zero_init_residual: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None
    bn_variance: str = "two_pass"
    bn_recompute: bool = False
    bn_fused: bool = False
    stem_pad_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def stem(self) -> tuple[tuple[StemLayer, ...], bool, bool]:
        """torchvision's 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool; or a 3x3/1 conv without
        max-pool for 32x32 inputs (``small_stem``).

        timm's ``stem_type='deep'`` replaces the 7x7 conv by three 3x3 convs of ``stem_width``,
        ``stem_width``, ``2 * stem_width`` channels with BatchNorm+ReLU between, named as timm's
        ``nn.Sequential``: ``conv1.0``, ``conv1.1`` (BatchNorm), ``conv1.3``, ``conv1.4``,
        ``conv1.6``, then ``bn1``. ``'deep_tiered'`` starts with ``3 * (stem_width // 4)``
        channels. Three 3x3 convs see the same 7x7 window at a lower cost.
        """
        if self.stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type must be '', 'deep' or 'deep_tiered'; got {self.stem_type!r}.")
        if self.stem_type and self.small_stem:
            raise ValueError("small_stem=True replaces the stem; it cannot be combined with stem_type.")
        cin, pad = self.img_channels, stem_padding(self.img_channels, self.stem_pad_channels)
        if self.small_stem:
            return (("conv1", "bn1", Conv(cin, 64, 3, pad_channels_to=pad)),), True, False
        if not self.stem_type:
            return (("conv1", "bn1", Conv(cin, 64, 7, 2, pad_channels_to=pad)),), True, True
        w = self.stem_width
        first = w if self.stem_type == "deep" else 3 * (w // 4)
        layers = (
            ("conv1.0", "conv1.1", Conv(cin, first, 3, 2, pad_channels_to=pad)),
            ("conv1.3", "conv1.4", Conv(first, w, 3)),
            ("conv1.6", "bn1", Conv(w, 2 * w, 3)),
        )
        return layers, True, True

    def stages(self) -> Stages:
        """torchvision's stages ``layerN`` of blocks ``layerN.j``: ``64 * 2**i`` planes, the
        first block of each stage after the first strided. Block ``k`` of ``n`` in the network
        drops its path with probability ``drop_path_rate * k / (n - 1)``, timm's expression."""
        if self.attn_layer not in ATTN_LAYERS:
            raise ValueError(
                f"attn_layer must be '' or 'se' (timm's squeeze-and-excitation); got {self.attn_layer!r}."
            )
        cls = block_class(self.block, BLOCKS)
        shared = dict(
            groups=self.groups,
            projection="downsample",
            avg_down=self.avg_down,
            attn_layer=self.attn_layer,
            zero_init_residual=self.zero_init_residual,
        )
        stages, channels = [], self.stem()[0][-1][2].out_channels
        total, index = sum(self.stage_sizes), 0
        for i, n in enumerate(self.stage_sizes):
            planes = 64 * 2**i
            width = int(planes * (self.width_per_group / 64.0)) * self.groups
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                rate = self.drop_path_rate * index / (total - 1) if total > 1 else 0.0
                block = cls(channels, planes * cls.expansion, stride, width, drop_path_rate=rate, **shared)
                blocks.append((f"layer{i + 1}.{j}", block))
                channels, index = block.out_channels, index + 1
            stages.append((f"layer{i + 1}", tuple(blocks)))
        return tuple(stages)

    def head_children(self) -> dict[str, Spec]:
        if self.num_classes is None:
            return {}
        drop = {"drop": Dropout(self.drop_rate)} if self.drop_rate else {}
        return {"fc": Linear(self.out_channels, self.num_classes), **drop}

    def norm_options(self) -> dict[str, Any]:
        bn = dict(variance=self.bn_variance, recompute=self.bn_recompute, fused=self.bn_fused)
        return {**super().norm_options(), **bn}

    def head(self, m: Layers, feats: Mapping[str, Array]) -> Array:
        pooled = super().head(m, feats)
        if self.num_classes is None:
            return pooled
        if self.drop_rate:
            pooled = m["drop"](pooled)
        return m["fc"](pooled).astype(jnp.promote_types(self.param_dtype, jnp.float32))


def stem_padding(img_channels: int, pad_channels_to: Optional[int]) -> int:
    """The stem conv's channel padding: ``None`` means 8 on GPUs, where a 3-channel stem leaves
    cuDNN on slow kernels, and off elsewhere; 0 (or channels already a multiple) means off."""
    if pad_channels_to is None:
        pad_channels_to = 8 if jax.default_backend() == "gpu" else 0
    return pad_channels_to if pad_channels_to > 1 and img_channels % pad_channels_to else 0


@dataclasses.dataclass(frozen=True)
class ResNetBaseDef(Network):
    """labml.ai's annotated ResNet backbone (``labml_nn.resnet``): conv + BatchNorm stem, residual
    stages, global average pooling.

    ``ResNetBase(n_blocks, n_channels, bottlenecks=None, img_channels=3, first_kernel_size=7)``
    maps ``[batch, H, W, img_channels]`` to ``[batch, n_channels[-1]]``. ``bottlenecks`` (one
    width per stage) selects bottleneck blocks. ``strides`` are the first-block strides per stage
    (default ``(1, 2, 2, ...)``). To reproduce labml.ai's annotated PyTorch ResNet exactly
    (labml_nn.resnet), use ``strides=(2, 1, 1, ...)`` and ``conv_bias=True``: it strides only the
    network's very first block and keeps PyTorch's default conv biases. ``train`` defaults to
    True, as for ``ResNet``. ``features`` gives ``'stem'``, ``'stage1'``, ...

    Attributes:
        n_blocks: Residual blocks per stage.
        n_channels: Output channels per stage; the stem has ``n_channels[0]``.
        bottlenecks: Bottleneck width per stage (bottleneck blocks); None: basic blocks.
        img_channels: Input image channels.
        first_kernel_size: The stem conv's kernel size.
        strides: The first block's stride per stage; None means ``(1, 2, 2, ...)``.
        conv_bias: Give every conv a bias, as PyTorch's ``Conv2d`` does by default.
        zero_init_residual: Initialise each block's last BatchNorm scale to 0, so every block
            starts as the identity.
        momentum: BatchNorm momentum, Flax's convention (0.9 is PyTorch's 0.1).
        epsilon: BatchNorm epsilon.
        axis_name: A ``pmap`` axis for synchronised BatchNorm; None under ``jax.jit``.
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
    """

    n_blocks: Sequence[int]
    n_channels: Sequence[int]
    bottlenecks: Optional[Sequence[int]] = None
    img_channels: int = 3
    first_kernel_size: int = 7
    strides: Optional[Sequence[int]] = None
    conv_bias: bool = False
    zero_init_residual: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def stem(self) -> tuple[tuple[StemLayer, ...], bool, bool]:
        """labml.ai's annotated ResNet stem: a strided conv and BatchNorm, no activation, no pooling."""
        conv = Conv(self.img_channels, self.n_channels[0], self.first_kernel_size, 2)
        return (("conv", "bn", conv),), False, False

    def stages(self) -> Stages:
        """Stages ``stage1..`` of blocks numbered across the network, ``blocks.0, ...``."""
        n_blocks, n_channels, bottlenecks = self.n_blocks, self.n_channels, self.bottlenecks
        if len(n_blocks) != len(n_channels) or not n_blocks:
            raise ValueError(
                "n_blocks and n_channels need one entry per stage; "
                f"got {len(n_blocks)} and {len(n_channels)}."
            )
        if bottlenecks is not None and len(bottlenecks) != len(n_channels):
            raise ValueError(
                f"bottlenecks needs one width per stage ({len(n_channels)}); got {len(bottlenecks)}. "
                "Pass None for basic residual blocks."
            )
        strides = self.strides if self.strides is not None else (1,) + (2,) * (len(n_channels) - 1)
        if len(strides) != len(n_channels):
            raise ValueError(
                f"strides needs one first-block stride per stage ({len(n_channels)}); got {strides}."
            )
        cls = block_class("basic" if bottlenecks is None else "bottleneck")
        stages, channels, index = [], n_channels[0], 0
        for stage, (n, out) in enumerate(zip(n_blocks, n_channels)):
            blocks = []
            for j in range(n):
                width = 0 if bottlenecks is None else bottlenecks[stage]
                stride = strides[stage] if j == 0 else 1
                block = cls(channels, out, stride, width, zero_init_residual=self.zero_init_residual)
                blocks.append((f"blocks.{index}", block))
                channels, index = out, index + 1
            stages.append((f"stage{stage + 1}", tuple(blocks)))
        return tuple(stages)

    def conv_options(self) -> dict[str, Any]:
        return {**super().conv_options(), "use_bias": self.conv_bias}


# The network definitions by the name of the model class that each API builds from them.
NETWORKS: dict[str, type] = {"ResNet": ResNetDef, "ResNetBase": ResNetBaseDef, "ResNetV2": ResNetV2Def}

__all__ = ["NETWORKS", "ResNetBaseDef", "ResNetDef", "ResNetV2Def", "stem_padding"]
