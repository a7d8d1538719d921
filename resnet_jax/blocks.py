"""Building blocks: PyTorch-exact BatchNorm and the three residual blocks of the seed.

Every convolution is padded explicitly (``kernel // 2`` on each side, as PyTorch does) because
Flax's ``'SAME'`` pads stride-2 convolutions asymmetrically and would shift every feature map by
half a pixel relative to a PyTorch model with the same weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu'):
# an untruncated normal with variance 2 / fan_out.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric ``kernel_size // 2`` padding, PyTorch's choice for every ResNet conv and pool."""
    p = kernel_size // 2
    return ((p, p), (p, p))


def default_conv(**overrides: Any) -> ModuleDef:
    """An ``nn.Conv`` factory with torchvision's initialisation and no bias."""
    kwargs = dict(use_bias=False, kernel_init=kaiming_normal_fan_out)
    kwargs.update(overrides)
    return functools.partial(nn.Conv, **kwargs)


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's semantics.

    Differences from ``flax.linen.BatchNorm`` that matter for parity with ``torch.nn.BatchNorm2d``:
    the running variance is updated with the *unbiased* batch variance (``n / (n - 1)``), as PyTorch
    does. Normalisation itself uses the biased variance in both frameworks. ``momentum`` follows
    Flax's convention (``new = momentum * old + (1 - momentum) * batch``), so 0.9 equals PyTorch's
    0.1.

    ``variance`` chooses how the batch variance is computed; both are algebraically PyTorch's value
    and agree with it at float64:

    * ``'two_pass'`` (default): ``mean((x - mean)^2)``, robust whatever the mean.
    * ``'shifted'``: one pass over ``x``, ``E[(x - s)^2] - E[x - s]^2`` with the shift
      ``s`` the running mean (a constant to autodiff). Unlike Flax's one-pass ``E[x^2] - E[x]^2``,
      float32 cancellation stays small once the running mean tracks the batch mean. It saves a read
      of every activation: 1.08x the images/s of two-pass for ResNet-50 on an H100 (BENCHMARKS.md).
      Its weak spot is the first steps from scratch, while the running mean (0 at init) is not
      yet a useful shift: cancellation then amplifies float32 rounding, e.g. a 2-process run
      and a 1-process run of the digits config drift apart by 1e-4 where two-pass keeps 1e-6.
      The ImageNet and benchmark configs use it; the library default stays two-pass.

    ``recompute=True`` checkpoints the normalisation (``jax.checkpoint``): the backward pass keeps
    ``x`` in its own dtype and recomputes the float32 product, rather than storing float32 copies.
    Values are unchanged.

    Statistics are computed in at least float32 whatever ``dtype`` is. Under ``jax.jit`` with a
    batch sharded over a mesh the reductions are global automatically; under ``pmap`` set
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
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        stat_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stat_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), stat_dtype)

        compute_dtype = jnp.promote_types(jnp.promote_types(x.dtype, stat_dtype), jnp.float32)
        xf = x.astype(compute_dtype)
        if train:
            axes = tuple(range(x.ndim - 1))
            n = 1
            for a in axes:
                n *= x.shape[a]
            if self.variance == "two_pass":
                mean = jnp.mean(xf, axis=axes)
                if self.axis_name is not None:
                    mean = jax.lax.pmean(mean, self.axis_name)
                var = jnp.mean(jnp.square(xf - mean), axis=axes)
                if self.axis_name is not None:
                    var = jax.lax.pmean(var, self.axis_name)
            elif self.variance == "shifted":
                shift = jax.lax.stop_gradient(ra_mean.value).astype(compute_dtype)
                centred = xf - shift
                moments = (jnp.mean(centred, axis=axes), jnp.mean(jnp.square(centred), axis=axes))
                if self.axis_name is not None:
                    moments = jax.lax.pmean(moments, self.axis_name)
                mean = moments[0] + shift
                var = jnp.maximum(moments[1] - jnp.square(moments[0]), 0.0)
            else:
                raise ValueError(f"variance must be 'two_pass' or 'shifted'; got {self.variance!r}.")
            if self.axis_name is not None:
                n = n * jax.lax.psum(1, self.axis_name)
            if not self.is_initializing():
                if isinstance(n, int) and n < 2:
                    raise ValueError(
                        f"BatchNorm in train mode needs more than 1 value per channel, got input "
                        f"shape {x.shape}; use a larger batch or train=False."
                    )
                unbiased = var * (n / (n - 1)) if self.unbiased_running_var else var
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.astype(stat_dtype)
                ra_var.value = m * ra_var.value + (1 - m) * unbiased.astype(stat_dtype)
        else:
            mean, var = ra_mean.value.astype(compute_dtype), ra_var.value.astype(compute_dtype)

        out_dtype = self.dtype if self.dtype is not None else x.dtype

        def normalize(x, mean, var, scale, bias):
            mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(compute_dtype)
            y = x.astype(compute_dtype) * mul + (bias.astype(compute_dtype) - mean * mul)
            return y.astype(out_dtype)

        if self.recompute:
            # Autodiff keeps x in its own (e.g. bfloat16) dtype for the backward pass and recomputes
            # the float32 cast there, instead of storing a float32 copy of every activation.
            normalize = jax.checkpoint(normalize)
        return normalize(x, mean, var, scale, bias)


class ChannelPaddedConv(nn.Module):
    """``nn.Conv`` without bias whose input channels are zero-padded to a multiple of ``pad_to``
    inside the call (image and kernel alike), so the result is exactly the unpadded convolution.

    The parameter keeps its true shape ``(*kernel_size, in, features)`` and name ``kernel``, so
    weights convert as for ``nn.Conv``; the padded slice of the kernel is zeros and gets no
    gradient. It exists for GPU stems: a 3-channel input leaves cuDNN on slow kernels.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: Any = "VALID"
    pad_to: int = 8
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = kaiming_normal_fan_out

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (*self.kernel_size, cin, self.features), self.param_dtype
        )
        dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, self.param_dtype)
        extra = (-cin) % self.pad_to
        x = jnp.pad(x.astype(dtype), [(0, 0)] * (x.ndim - 1) + [(0, extra)])
        kernel = jnp.pad(kernel.astype(dtype), [(0, 0), (0, 0), (0, extra), (0, 0)])
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class ShortcutProjection(nn.Module):
    """The projection ``W_s x`` of the shortcut: 1x1 conv (with the block's stride) and BatchNorm.

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
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return _project(self, x, train, self.out_channels, self.stride, self.conv_name, self.norm_name)


def _project(mod, x, train, out_channels, stride, conv_name, norm_name, avg_down=False):
    if avg_down and stride != 1:
        # ResNet-D: average 2x2 windows, then a stride-1 1x1 conv, so the projection sees every
        # input pixel instead of a quarter of them.
        x = avg_pool_ceil(x, stride)
        stride = 1
    y = mod.conv(out_channels, (1, 1), strides=stride, padding=((0, 0), (0, 0)), name=conv_name)(x)
    return mod.norm(name=norm_name)(y, train)


def avg_pool_ceil(x: jax.Array, stride: int) -> jax.Array:
    """PyTorch's ``AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)``.

    On odd sizes ceil mode adds a last, partial window that averages only the pixels it covers.
    """
    pads = [(0, -size % stride) for size in x.shape[1:3]]
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding=pads, count_include_pad=False)


class _Block(nn.Module):
    """Shared shortcut logic of the two residual blocks."""

    def shortcut(self, x: jax.Array, train: bool, out_channels: int) -> jax.Array:
        if self.stride == 1 and x.shape[-1] == out_channels:
            return x
        module_name, conv_name, norm_name = self.shortcut_names
        if module_name is None:
            # torchvision keeps the projection as `downsample.0` / `downsample.1` of the block,
            # timm's ResNet-D as `downsample.1` / `downsample.2` after a parameter-free pool.
            return _project(self, x, train, out_channels, self.stride, conv_name, norm_name, self.avg_down)
        return ShortcutProjection(
            out_channels, self.stride, self.conv, self.norm, conv_name, norm_name, name=module_name
        )(x, train)

    def residual_norm(self, name: str) -> nn.Module:
        init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        return self.norm(scale_init=init, name=name)


class ResidualBlock(_Block):
    """Two 3x3 convolutions and a shortcut: ``relu(F(x) + x)``, the block of ResNet-18/34.

    Learning the residual ``F(x) = H(x) - x`` instead of ``H(x)`` makes an identity mapping the
    easy default, which is what lets very deep stacks train at all (the degradation problem).
    The stride sits on the first convolution.
    """

    out_channels: int
    stride: int = 1
    conv: ModuleDef = default_conv()
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    zero_init_residual: bool = False
    shortcut_names: Sequence[Optional[str]] = ("shortcut", "conv", "bn")
    avg_down: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = self.shortcut(x, train, self.out_channels)
        y = self.conv(self.out_channels, (3, 3), strides=self.stride, padding=torch_padding(3), name="conv1")(
            x
        )
        y = self.act(self.norm(name="bn1")(y, train))
        y = self.conv(self.out_channels, (3, 3), padding=torch_padding(3), name="conv2")(y)
        y = self.residual_norm("bn2")(y, train)
        return self.act(y + shortcut)


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
    shortcut_names: Sequence[Optional[str]] = ("shortcut", "conv", "bn")
    avg_down: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = self.shortcut(x, train, self.out_channels)
        y = self.conv(self.bottleneck_channels, (1, 1), padding=((0, 0), (0, 0)), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y, train))
        y = self.conv(
            self.bottleneck_channels,
            (3, 3),
            strides=self.stride,
            padding=torch_padding(3),
            feature_group_count=self.groups,
            name="conv2",
        )(y)
        y = self.act(self.norm(name="bn2")(y, train))
        y = self.conv(self.out_channels, (1, 1), padding=((0, 0), (0, 0)), name="conv3")(y)
        y = self.residual_norm("bn3")(y, train)
        return self.act(y + shortcut)
