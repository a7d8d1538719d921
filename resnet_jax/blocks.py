"""Linen building blocks: PyTorch-exact BatchNorm, the residual blocks of labml.ai's annotated
ResNet (``labml_nn.resnet``) and torchvision, and timm's squeeze-and-excitation.

Which layers a block has, and their PyTorch names, come from ``core.block_plan`` (shared with the
NNX modules); how they connect is the block's forward here, read top to bottom. Every convolution
is padded explicitly (``kernel // 2`` on each side, as PyTorch does) because Flax's ``'SAME'``
pads stride-2 convolutions asymmetrically and would shift every feature map by half a pixel
relative to a PyTorch model with the same weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import core
from resnet_jax.core import kaiming_normal_fan_out, torch_padding

Dtype = Any
ModuleDef = Callable[..., nn.Module]

__all__ = [
    "BatchNorm",
    "BottleneckResidualBlock",
    "ResidualBlock",
    "ShortcutProjection",
    "SqueezeExcite",
    "default_conv",
    "kaiming_normal_fan_out",
    "torch_padding",
]


def default_conv(**overrides: Any) -> ModuleDef:
    """An ``nn.Conv`` factory with torchvision's initialisation, no bias, and a kernel that
    follows the input onto an explicit-axis mesh (``sharding.conv_general_dilated``)."""
    return functools.partial(nn.Conv, **{**core.conv_args(), **overrides})


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's semantics (see ``core.batch_norm``).

    Differences from ``flax.linen.BatchNorm`` that matter for parity with ``torch.nn.BatchNorm2d``:
    the running variance is updated with the *unbiased* batch variance, and ``momentum`` 0.9
    (Flax's convention) equals PyTorch's 0.1. ``variance`` is ``'two_pass'`` (default, robust
    whatever the mean) or ``'shifted'`` (one pass, shifted by the running mean: faster, see
    BENCHMARKS.md, but less exact in float32 in the first steps from scratch); both give
    PyTorch's value at float64. ``recompute=True`` keeps the backward pass's copy of ``x`` in its
    own dtype (values unchanged; measured slower). ``norm(x, train, residual, act)`` returns
    ``act(bn(x) + residual)``, the end of a block; ``fused=True`` makes that one custom-VJP pass
    in training (``core.batch_norm``; an experiment for the GPU, values unchanged). Statistics
    are computed in at least float32 whatever ``dtype`` is. Under ``jax.jit`` with a batch
    sharded over a mesh the reductions are global automatically; under ``pmap`` set
    ``axis_name`` to average them across devices (synchronised BatchNorm).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None
    unbiased_running_var: bool = True
    variance: str = "two_pass"
    recompute: bool = False
    fused: bool = False
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = True,
        residual: Optional[jax.Array] = None,
        act: Optional[Callable[[jax.Array], jax.Array]] = None,
    ) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        stat_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stat_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), stat_dtype)
        update = train and not self.is_initializing()
        stats = (ra_mean.value, ra_var.value)
        folded, after = core.fold_act(self.fused, residual, act)
        y, mean, var = core.batch_norm(
            x, scale, bias, *stats, train=train, update_stats=update, **core.bn_fields(self), **folded
        )
        if update:
            ra_mean.value, ra_var.value = mean, var
        return after(y)


def conv_bn(
    conv: ModuleDef, norm: ModuleDef, spec: core.ConvSpec, train: bool, zero_init_residual: bool = False
) -> core.Layer:
    """The conv and BatchNorm of ``spec`` (made by the ``conv`` and ``norm`` factories, inside the
    calling compact method) as one layer ``x -> norm(conv(pool(x)))``; ``pool`` is the ResNet-D
    shortcut's average pool, or nothing. Keywords (``residual``, ``act``) go to the norm."""
    k = spec.kernel_size
    conv = conv(
        spec.out_channels,
        (k, k),
        strides=spec.stride,
        padding=spec.padding,
        feature_group_count=spec.groups,
        name=core.linen_name(spec.conv),
        **core.conv_overrides(spec),
    )
    norm = norm(name=core.linen_name(spec.norm), **spec.norm_overrides(zero_init_residual))
    return lambda x, **end: norm(conv(core.avg_pool_ceil(x, spec.pool)), train, **end)


class ShortcutProjection(nn.Module):
    """The projection ``W_s x`` of the shortcut: 1x1 conv (with the block's stride) and BatchNorm,
    as labml.ai's annotated ResNet names it (``shortcut.conv``, ``shortcut.bn``).

    The paper found projections better than zero-padding when the shape changes, and identity
    better than projections when it does not, so blocks only build one when they must.
    """

    out_channels: int
    stride: int = 1
    conv: ModuleDef = default_conv()
    norm: ModuleDef = BatchNorm
    conv_name: str = "conv"
    norm_name: str = "bn"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        spec = core.projection_spec(
            x.shape[-1], self.out_channels, self.stride, self.conv_name, self.norm_name
        )
        return conv_bn(self.conv, self.norm, spec, train)(x)


class SqueezeExcite(nn.Module):
    """timm's ``SEModule`` (``fc1``, ``fc2``: 1x1 convs with biases); see ``core.squeeze_excite``."""

    conv: ModuleDef = default_conv()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        reduced = core.se_channels(channels)
        fc1 = self.conv(reduced, (1, 1), name="fc1", **core.se_conv_args(channels))
        fc2 = self.conv(channels, (1, 1), name="fc2", **core.se_conv_args(reduced))
        return core.squeeze_excite(x, fc1, fc2)


class _Block(nn.Module):
    """The forward of both residual blocks; their fields give the plan of their layers."""

    def plan(self, in_channels: int) -> core.BlockPlan:
        bottleneck = getattr(self, "bottleneck_channels", None)  # None: a basic block
        return core.block_plan(
            in_channels,
            self.out_channels,
            self.stride,
            bottleneck,
            getattr(self, "groups", 1),
            self.projection,
            self.avg_down,
            self.attn_layer,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        plan = self.plan(x.shape[-1])
        layer = functools.partial(
            conv_bn, self.conv, self.norm, train=train, zero_init_residual=self.zero_init_residual
        )
        *inner, last = plan.branch
        y = x
        for spec in inner:  # conv -> norm -> act
            y = layer(spec)(y, act=self.act)
        shortcut = x
        if plan.shortcut_module is not None:
            s = plan.shortcut
            shortcut = ShortcutProjection(
                s.out_channels, s.stride, self.conv, self.norm, s.conv, s.norm, name=plan.shortcut_module
            )(x, train)
        elif plan.shortcut is not None:
            shortcut = layer(plan.shortcut)(x)
        if plan.se_channels:  # conv -> norm -> SE -> add -> act
            return self.act(SqueezeExcite(self.conv, name="se")(layer(last)(y)) + shortcut)
        return layer(last)(y, residual=shortcut, act=self.act)  # conv -> norm -> add -> act


class ResidualBlock(_Block):
    """Two 3x3 convolutions and a shortcut: ``relu(F(x) + x)``, the block of ResNet-18/34.

    Learning the residual ``F(x) = H(x) - x`` instead of ``H(x)`` makes an identity mapping the
    easy default, which is what lets very deep stacks train at all (the degradation problem).
    The stride sits on the first convolution. ``projection``, ``avg_down`` and ``attn_layer``
    choose the shortcut's names and pool and the SE module (see ``core.block_plan``).
    """

    out_channels: int
    stride: int = 1
    conv: ModuleDef = default_conv()
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    zero_init_residual: bool = False
    projection: str = "shortcut"
    avg_down: bool = False
    attn_layer: str = ""


class BottleneckResidualBlock(_Block):
    """1x1 reduce, 3x3 (strided, optionally grouped), 1x1 expand, plus a shortcut.

    Running the expensive 3x3 on ``bottleneck_channels`` instead of ``out_channels`` is what makes
    50+ layer networks affordable. The stride is on the 3x3 (ResNet v1.5, as torchvision), and
    ``groups > 1`` gives the ResNeXt block.
    """

    bottleneck_channels: int
    out_channels: int
    stride: int = 1
    groups: int = 1
    conv: ModuleDef = default_conv()
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    zero_init_residual: bool = False
    projection: str = "shortcut"
    avg_down: bool = False
    attn_layer: str = ""
