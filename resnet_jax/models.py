"""Linen ResNetBase (labml.ai's annotated ResNet backbone), the torchvision-layout ResNet
classifier, and presets.

The stems, stages and blocks come from the plans in ``core.py``, shared with the NNX modules.
Submodule names mirror the PyTorch modules they correspond to, with ``.N`` list indices written
``_N`` (``blocks.3`` -> ``blocks_3``, ``layer2.0.downsample.1`` -> ``layer2_0/downsample_1``), so
weight conversion is a structural walk (see ``convert.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import core
from resnet_jax.blocks import (
    BatchNorm,
    BottleneckResidualBlock,
    ResidualBlock,
    conv_bn,
    default_conv,
)
from resnet_jax.core import PRESETS, TORCHVISION_ARCHS, check_images

Dtype = Any

__all__ = [
    "PRESETS",
    "TORCHVISION_ARCHS",
    "ResNet",
    "ResNetBase",
    "check_images",
    "classifier_head",
    "get_model",
]


def _features(
    x: jax.Array,
    train: bool,
    stem: core.StemSpec,
    stages: core.Stages,
    conv: Callable,
    norm: Callable,
    **block_fields: Any,
) -> dict[str, jax.Array]:
    """Stem and stages of a plan as Linen submodules (call inside a compact method)."""
    for spec in stem.convs:
        x = conv_bn(conv, norm, spec, train)(x, act=nn.relu if stem.act else None)
    x = core.max_pool_3x3(x) if stem.max_pool else x
    feats = {"stem": x}
    for key, blocks in stages:
        for b in blocks:
            common = dict(stride=b.stride, conv=conv, norm=norm, name=core.linen_name(b.name))
            common.update(attn_layer=b.attn_layer, **block_fields)
            if b.bottleneck_channels is None:
                block = ResidualBlock(b.out_channels, **common)
            else:
                block = BottleneckResidualBlock(
                    b.bottleneck_channels, b.out_channels, groups=b.groups, **common
                )
            x = block(x, train)
        feats[key] = x
    return feats


class ResNetBase(nn.Module):
    """labml.ai's annotated ResNet backbone (``labml_nn.resnet``): conv + BatchNorm stem, residual
    stages, global average pooling.

    ``ResNetBase(n_blocks, n_channels, bottlenecks=None, img_channels=3, first_kernel_size=7)``
    maps ``[batch, H, W, img_channels]`` to ``[batch, n_channels[-1]]``. ``bottlenecks`` (one
    width per stage) selects bottleneck blocks. ``strides`` are the first-block strides per stage
    (default ``(1, 2, 2, ...)``). To reproduce labml.ai's annotated PyTorch ResNet exactly
    (labml_nn.resnet), use ``strides=(2, 1, 1, ...)`` and ``conv_bias=True``: it strides only the
    network's very first block and keeps PyTorch's default conv biases. ``train`` defaults to
    True, as for :class:`ResNet`.

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

    @nn.compact
    def features(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
        """Feature maps after the stem (``'stem'``) and after each stage (``'stage1'``, ...)."""
        stages = core.resnetbase_plan(self.n_blocks, self.n_channels, self.bottlenecks, self.strides)
        check_images(x, self.img_channels, "ResNetBase")
        conv = default_conv(use_bias=self.conv_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            BatchNorm,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        stem = core.resnetbase_stem(self.img_channels, self.n_channels[0], self.first_kernel_size)
        x = jnp.asarray(x, self.dtype)
        return _features(x, train, stem, stages, conv, norm, zero_init_residual=self.zero_init_residual)

    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        last = self.features(x, train)[f"stage{len(self.n_channels)}"]
        return core.global_avg_pool(last).astype(self.dtype)


class ResNet(nn.Module):
    """ResNet classifier with torchvision's architecture (v1.5) and module names.

    ``block`` is ``'basic'`` (ResNet-18/34) or ``'bottleneck'``; ``groups`` and
    ``width_per_group`` give ResNeXt and Wide ResNet. ``small_stem=True`` replaces the 7x7/2 conv
    and max-pool by a 3x3/1 conv, for 32x32 inputs such as CIFAR. ``num_classes=None`` drops
    ``fc`` and returns pooled features. Per-stage maps (C2..C5) come from :meth:`features`.
    Logits are returned in float32 whatever ``dtype`` is.

    ``train`` defaults to True, as in Flax's ``examples/imagenet`` (whose trainer calls
    ``init``/``apply`` without it, so this class is a drop-in there) and as a new PyTorch or NNX
    model is in train mode. A training pass updates ``batch_stats``, so ``model.apply(variables,
    x)`` without ``mutable=['batch_stats']`` raises Flax's "collection is immutable" error; pass
    ``train=False`` to evaluate.

    timm's stem and shortcut options, with timm's parameter names (so timm weights convert):
    ``stem_type='deep'`` replaces the 7x7 conv by three 3x3 convs (``'deep_tiered'``: a narrower
    first one; see ``core.resnet_stem``); ``avg_down=True`` makes each downsampling shortcut a 2x2
    average pool followed by a stride-1 1x1 conv (``downsample.1``/``.2``). Deep stem plus
    ``avg_down`` is ResNet-D ("Bag of Tricks", He et al. 2019): strided 1x1 convs discard three
    quarters of their input, and a 7x7 conv costs as much as three 3x3 ones.
    ``attn_layer='se'`` adds timm's squeeze-and-excitation to every block (``layerN_M/se/fc1``,
    ``fc2``; see ``core.squeeze_excite``): SE-ResNet and SE-ResNeXt.

    Speed options that leave every value unchanged (up to float32 rounding): ``bn_variance``
    (``'two_pass'``, the default, or the faster one-pass ``'shifted'``; see :class:`BatchNorm`),
    ``bn_recompute`` (BatchNorm's backward keeps its input in ``dtype`` instead of float32),
    ``bn_fused`` (each BatchNorm with its add and ReLU as one custom VJP; an experiment) and
    ``stem_pad_channels`` (the stem convolution pads its input channels with zeros to this
    multiple: ``None``, the default, means 8 on GPUs, where a 3-channel stem leaves cuDNN on slow
    kernels, and off elsewhere; 0 = off).

    Attributes:
        stage_sizes: Blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        block: ``'basic'`` or ``'bottleneck'``.
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
        momentum: BatchNorm momentum, Flax's convention (0.9 is PyTorch's 0.1).
        epsilon: BatchNorm epsilon.
        axis_name: A ``pmap`` axis for synchronised BatchNorm; None under ``jax.jit``.
        bn_variance: ``'two_pass'`` or ``'shifted'`` BatchNorm variance.
        bn_recompute: Recompute BatchNorm in the backward pass instead of storing float32 copies.
        bn_fused: In training, each BatchNorm with the add and ReLU after it is one custom-VJP
            pass (``core.batch_norm(fused=True)``; an experiment for the GPU, values unchanged).
        stem_pad_channels: Pad the stem conv's input channels to this multiple; None: 8 on GPUs,
            off elsewhere; 0: off.
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
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
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None
    bn_variance: str = "two_pass"
    bn_recompute: bool = False
    bn_fused: bool = False
    stem_pad_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def features(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
        """Feature maps: ``'stem'`` (after max-pool) and ``'layer1'``..``'layer4'`` (C2..C5).

        ``model.apply(variables, x, train=False, method='features')``; add
        ``mutable=['batch_stats']`` with ``train=True``. ``fc`` is neither used nor needed.
        """
        return self._forward(x, train, head=False)[0]

    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        return self._forward(x, train, head=True)[1]

    @nn.compact
    def _forward(self, x: jax.Array, train: bool, head: bool):
        stem = core.resnet_stem(
            self.img_channels, self.small_stem, self.stem_type, self.stem_width, self.stem_pad_channels
        )
        stages = core.resnet_plan(
            self.stage_sizes,
            self.block,
            self.groups,
            self.width_per_group,
            stem.out_channels,
            self.attn_layer,
        )
        check_images(x, self.img_channels, "ResNet")
        conv = default_conv(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            BatchNorm,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            variance=self.bn_variance,
            recompute=self.bn_recompute,
            fused=self.bn_fused,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = jnp.asarray(x, self.dtype)
        feats = _features(
            x,
            train,
            stem,
            stages,
            conv,
            norm,
            zero_init_residual=self.zero_init_residual,
            projection="downsample",
            avg_down=self.avg_down,
        )
        if not head:
            return feats, None
        pooled = core.global_avg_pool(feats[stages[-1][0]]).astype(self.dtype)
        if self.num_classes is None:
            return feats, pooled
        logits = classifier_head(self.num_classes, pooled.shape[-1], self.dtype, self.param_dtype)(pooled)
        return feats, logits.astype(jnp.promote_types(self.param_dtype, jnp.float32))


def classifier_head(
    num_classes: int, fan_in: int, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> nn.Dense:
    """The ``fc`` layer of :class:`ResNet`, initialised as ``torch.nn.Linear``.

    Shared with weight conversion, which initialises a fresh head the same way.

    Args:
        num_classes: Output features (logits).
        fan_in: Input features (the pooled width); sets the bias initialisation's range, as
            PyTorch's ``Linear`` does (an initializer of the bias alone cannot see it).
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
    """
    return nn.Dense(
        num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        name="fc",
        **core.linear_args(fan_in),
    )


def get_model(arch: str, num_classes: Optional[int] = 1000, **overrides: Any) -> ResNet:
    """Build the preset ``arch`` (a key of ``PRESETS``); ``overrides`` set any other ResNet field."""
    known = set(ResNet.__dataclass_fields__) - {"parent", "name"}
    return ResNet(num_classes=num_classes, **core.preset_fields(arch, overrides, known))


def _preset(arch: str) -> Callable[..., ResNet]:
    def preset(num_classes: Optional[int] = 1000, **overrides: Any) -> ResNet:
        return get_model(arch, num_classes, **overrides)

    preset.__name__ = preset.__qualname__ = arch
    preset.__doc__ = (
        f"{core.preset_source(arch)}'s {arch} as a Flax ResNet; ``overrides`` set any ResNet field."
    )
    return preset


resnet18 = _preset("resnet18")
resnet34 = _preset("resnet34")
resnet50 = _preset("resnet50")
resnet101 = _preset("resnet101")
resnet152 = _preset("resnet152")
resnet200 = _preset("resnet200")
wide_resnet50_2 = _preset("wide_resnet50_2")
wide_resnet101_2 = _preset("wide_resnet101_2")
resnext50_32x4d = _preset("resnext50_32x4d")
resnext101_32x8d = _preset("resnext101_32x8d")
resnext101_64x4d = _preset("resnext101_64x4d")
resnet18d = _preset("resnet18d")
resnet34d = _preset("resnet34d")
resnet26d = _preset("resnet26d")
resnet50d = _preset("resnet50d")
resnet101d = _preset("resnet101d")
resnet152d = _preset("resnet152d")
resnet200d = _preset("resnet200d")
resnet26t = _preset("resnet26t")
resnet50t = _preset("resnet50t")
seresnet50 = _preset("seresnet50")
seresnext50_32x4d = _preset("seresnext50_32x4d")
seresnext101_32x8d = _preset("seresnext101_32x8d")
seresnext26d_32x4d = _preset("seresnext26d_32x4d")
