"""ResNetBase (the seed's backbone), the torchvision-layout ResNet classifier, and its presets.

Submodule names mirror the PyTorch modules they correspond to, with ``.N`` list indices written
``_N`` (``blocks.3`` -> ``blocks_3``, ``layer2.0.downsample.1`` -> ``layer2_0/downsample_1``), so
weight conversion is a structural walk (see ``convert.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.blocks import (
    BatchNorm,
    BottleneckResidualBlock,
    ChannelPaddedConv,
    ResidualBlock,
    default_conv,
    torch_padding,
)

Dtype = Any

TORCHVISION_SHORTCUT = (None, "downsample_0", "downsample_1")
TIMM_AVG_SHORTCUT = (None, "downsample_1", "downsample_2")  # downsample.0 is the pool


def check_images(x: jax.Array, img_channels: int, model: str) -> None:
    """Raise a ValueError that says how to fix a batch that is not NHWC with ``img_channels``."""
    if x.ndim != 4:
        raise ValueError(
            f"{model} expects a batch of images [batch, height, width, channels] (rank 4); got "
            f"shape {tuple(x.shape)}. Add a batch axis with x[None] for a single image."
        )
    if x.shape[-1] != img_channels:
        hint = ""
        if x.shape[1] == img_channels:
            hint = " The input looks NCHW (PyTorch layout): transpose it with x.transpose(0, 2, 3, 1)."
        raise ValueError(
            f"{model} expects NHWC input with {img_channels} channels (img_channels={img_channels}); "
            f"got shape {tuple(x.shape)}.{hint} Or build the model with img_channels={x.shape[-1]}."
        )


def _global_avg_pool(x: jax.Array) -> jax.Array:
    # Accumulate in at least float32: a bfloat16 sum over 49+ positions loses digits.
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))


def _torch_linear_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ResNetBase(nn.Module):
    """The seed's backbone: conv + BatchNorm stem, residual stages, global average pooling.

    ``ResNetBase(n_blocks, n_channels, bottlenecks=None, img_channels=3, first_kernel_size=7)``
    maps ``[batch, H, W, img_channels]`` to ``[batch, n_channels[-1]]``. ``bottlenecks`` (one
    width per stage) selects bottleneck blocks. ``strides`` are the first-block strides per stage
    (default ``(1, 2, 2, ...)``). To reproduce the annotated PyTorch ResNet the seed describes
    (labml_nn.resnet), use ``strides=(2, 1, 1, ...)`` and ``conv_bias=True``: it strides only the
    network's very first block and keeps PyTorch's default conv biases.
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

    def _check_config(self) -> Sequence[int]:
        if len(self.n_blocks) != len(self.n_channels) or not self.n_blocks:
            raise ValueError(
                f"n_blocks and n_channels need one entry per stage; got {len(self.n_blocks)} and "
                f"{len(self.n_channels)}."
            )
        if self.bottlenecks is not None and len(self.bottlenecks) != len(self.n_channels):
            raise ValueError(
                f"bottlenecks needs one width per stage ({len(self.n_channels)}); got "
                f"{len(self.bottlenecks)}. Pass None for basic residual blocks."
            )
        strides = self.strides
        if strides is None:
            strides = (1,) + (2,) * (len(self.n_channels) - 1)
        if len(strides) != len(self.n_channels):
            raise ValueError(
                f"strides needs one first-block stride per stage ({len(self.n_channels)}); got {strides}."
            )
        return strides

    @nn.compact
    def features(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Feature maps after the stem (``'stem'``) and after each stage (``'stage1'``, ...)."""
        strides = self._check_config()
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
        k = self.first_kernel_size
        x = jnp.asarray(x, self.dtype)
        x = conv(self.n_channels[0], (k, k), strides=2, padding=torch_padding(k), name="conv")(x)
        x = norm(name="bn")(x, train)
        feats = {"stem": x}
        index = 0
        for stage, (n, channels) in enumerate(zip(self.n_blocks, self.n_channels)):
            for j in range(n):
                common = dict(
                    stride=strides[stage] if j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    zero_init_residual=self.zero_init_residual,
                    name=f"blocks_{index}",
                )
                if self.bottlenecks is None:
                    x = ResidualBlock(channels, **common)(x, train)
                else:
                    x = BottleneckResidualBlock(self.bottlenecks[stage], channels, **common)(x, train)
                index += 1
            feats[f"stage{stage + 1}"] = x
        return feats

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        last = self.features(x, train)[f"stage{len(self.n_channels)}"]
        return _global_avg_pool(last).astype(self.dtype)


class ResNet(nn.Module):
    """ResNet classifier with torchvision's architecture (v1.5) and module names.

    ``block`` is ``'basic'`` (ResNet-18/34) or ``'bottleneck'``; ``groups`` and
    ``width_per_group`` give ResNeXt and Wide ResNet. ``small_stem=True`` replaces the 7x7/2 conv
    and max-pool by a 3x3/1 conv, for 32x32 inputs such as CIFAR. ``num_classes=None`` drops
    ``fc`` and returns pooled features. Per-stage maps (C2..C5) come from :meth:`features`.
    Logits are returned in float32 whatever ``dtype`` is.

    timm's stem and shortcut options, with timm's parameter names (so timm weights convert):
    ``stem_type='deep'`` replaces the 7x7 conv by three 3x3 convs of ``stem_width``,
    ``stem_width``, ``2 * stem_width`` channels (``conv1.0``, ``conv1.3``, ``conv1.6`` with
    BatchNorm+ReLU ``conv1.1``/``conv1.4`` between), ``'deep_tiered'`` uses
    ``3 * (stem_width // 4)`` channels for the first; ``avg_down=True`` makes each downsampling
    shortcut a 2x2 average pool followed by a stride-1 1x1 conv (``downsample.1``/``.2``). Deep
    stem plus ``avg_down`` is ResNet-D ("Bag of Tricks", He et al. 2019): strided 1x1 convs
    discard three quarters of their input, and a 7x7 conv costs as much as three 3x3 ones.

    Speed options that leave every value unchanged (up to float32 rounding): ``bn_variance``
    (``'two_pass'``, the default, or the faster one-pass ``'shifted'``; see
    :class:`BatchNorm`), ``bn_recompute`` (BatchNorm's backward keeps its input in ``dtype``
    instead of float32) and ``stem_pad_channels`` (the stem convolution pads its
    input channels with zeros to this multiple: ``None``, the default, means 8 on GPUs, where a
    3-channel stem leaves cuDNN on slow kernels, and off elsewhere; 0 = off).
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
    zero_init_residual: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None
    bn_variance: str = "two_pass"
    bn_recompute: bool = False
    stem_pad_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def features(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Feature maps: ``'stem'`` (after max-pool) and ``'layer1'``..``'layer4'`` (C2..C5).

        ``model.apply(variables, x, train=False, method='features')``; add
        ``mutable=['batch_stats']`` with ``train=True``. ``fc`` is neither used nor needed.
        """
        return self._forward(x, train, head=False)[0]

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self._forward(x, train, head=True)[1]

    @nn.compact
    def _forward(self, x: jax.Array, train: bool, head: bool):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck'; got {self.block!r}.")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("basic blocks support only groups=1 and width_per_group=64 (as torchvision).")
        check_images(x, self.img_channels, "ResNet")
        conv = default_conv(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            BatchNorm,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            variance=self.bn_variance,
            recompute=self.bn_recompute,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.stem_type not in ("", "deep", "deep_tiered"):
            raise ValueError(f"stem_type must be '', 'deep' or 'deep_tiered'; got {self.stem_type!r}.")
        if self.stem_type and self.small_stem:
            raise ValueError("small_stem=True replaces the stem; it cannot be combined with stem_type.")
        x = jnp.asarray(x, self.dtype)
        stem = conv
        pad_to = self.stem_pad_channels
        if pad_to is None:  # GPUs: 1.02x ResNet-50 bf16 training on an H100 (BENCHMARKS.md)
            pad_to = 8 if jax.default_backend() == "gpu" else 0
        if pad_to > 1 and x.shape[-1] % pad_to:
            stem = functools.partial(
                ChannelPaddedConv, pad_to=pad_to, dtype=self.dtype, param_dtype=self.param_dtype
            )
        if self.small_stem:
            x = stem(64, (3, 3), padding=torch_padding(3), name="conv1")(x)
        elif self.stem_type:
            # timm's nn.Sequential(conv, bn, relu, conv, bn, relu, conv): indices 0..6.
            first = self.stem_width if self.stem_type == "deep" else 3 * (self.stem_width // 4)
            widths = (first, self.stem_width, 2 * self.stem_width)
            for i, width in enumerate(widths):
                stride = 2 if i == 0 else 1
                x = (stem if i == 0 else conv)(
                    width, (3, 3), strides=stride, padding=torch_padding(3), name=f"conv1_{3 * i}"
                )(x)
                if i < 2:
                    x = nn.relu(norm(name=f"conv1_{3 * i + 1}")(x, train))
        else:
            x = stem(64, (7, 7), strides=2, padding=torch_padding(7), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x, train))
        if not self.small_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=torch_padding(3))
        feats = {"stem": x}
        for i, n in enumerate(self.stage_sizes):
            planes = 64 * 2**i
            for j in range(n):
                common = dict(
                    stride=2 if (i > 0 and j == 0) else 1,
                    conv=conv,
                    norm=norm,
                    zero_init_residual=self.zero_init_residual,
                    shortcut_names=TIMM_AVG_SHORTCUT if self.avg_down else TORCHVISION_SHORTCUT,
                    avg_down=self.avg_down,
                    name=f"layer{i + 1}_{j}",
                )
                if self.block == "basic":
                    x = ResidualBlock(planes, **common)(x, train)
                else:
                    width = int(planes * (self.width_per_group / 64.0)) * self.groups
                    x = BottleneckResidualBlock(width, planes * 4, groups=self.groups, **common)(x, train)
            feats[f"layer{i + 1}"] = x
        if not head:
            return feats, None
        pooled = _global_avg_pool(x).astype(self.dtype)
        if self.num_classes is None:
            return feats, pooled
        logits = classifier_head(self.num_classes, pooled.shape[-1], self.dtype, self.param_dtype)(pooled)
        return feats, logits.astype(jnp.promote_types(self.param_dtype, jnp.float32))


def classifier_head(
    num_classes: int, fan_in: int, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> nn.Dense:
    """The ``fc`` layer of :class:`ResNet`, initialised as ``torch.nn.Linear``.

    Shared with weight conversion, which initialises a fresh head the same way.
    """
    return nn.Dense(
        num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_init=_torch_linear_bias_init(fan_in),
        name="fc",
    )


_D = dict(stem_type="deep", stem_width=32, avg_down=True)
_T = dict(stem_type="deep_tiered", stem_width=32, avg_down=True)

# name -> ResNet fields. Architectures as torchvision.models; resnet200 as in He et al. 2016
# ("Identity Mappings in Deep Residual Networks"), which torchvision does not ship; the -D and
# -T variants as timm.models.resnet (timm names them the same).
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
}
# The presets whose architecture torchvision ships (the others come from timm).
TORCHVISION_ARCHS = tuple(a for a, f in PRESETS.items() if "stem_type" not in f)


def get_model(arch: str, num_classes: Optional[int] = 1000, **overrides: Any) -> ResNet:
    """Build the preset ``arch`` (a key of ``PRESETS``); ``overrides`` set any other ResNet field."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(PRESETS)}.")
    unknown = set(overrides) - set(ResNet.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise TypeError(f"unknown ResNet field(s) {sorted(unknown)} for {arch}.")
    fields = {**PRESETS[arch], **overrides}
    return ResNet(num_classes=num_classes, **fields)


def _make_preset(arch: str) -> Callable[..., ResNet]:
    def preset(num_classes: Optional[int] = 1000, **overrides: Any) -> ResNet:
        return get_model(arch, num_classes, **overrides)

    preset.__name__ = preset.__qualname__ = arch
    source = "torchvision" if arch in TORCHVISION_ARCHS else "timm"
    preset.__doc__ = f"{source}'s {arch} as a Flax ResNet; ``overrides`` set any ResNet field."
    return preset


resnet18 = _make_preset("resnet18")
resnet34 = _make_preset("resnet34")
resnet50 = _make_preset("resnet50")
resnet101 = _make_preset("resnet101")
resnet152 = _make_preset("resnet152")
resnet200 = _make_preset("resnet200")
wide_resnet50_2 = _make_preset("wide_resnet50_2")
wide_resnet101_2 = _make_preset("wide_resnet101_2")
resnext50_32x4d = _make_preset("resnext50_32x4d")
resnext101_32x8d = _make_preset("resnext101_32x8d")
resnext101_64x4d = _make_preset("resnext101_64x4d")
resnet18d = _make_preset("resnet18d")
resnet34d = _make_preset("resnet34d")
resnet26d = _make_preset("resnet26d")
resnet50d = _make_preset("resnet50d")
resnet101d = _make_preset("resnet101d")
resnet152d = _make_preset("resnet152d")
resnet200d = _make_preset("resnet200d")
resnet26t = _make_preset("resnet26t")
resnet50t = _make_preset("resnet50t")
