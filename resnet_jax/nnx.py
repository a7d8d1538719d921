"""Flax NNX versions of the resnet_jax models, for users of the NNX API.

Same architectures, fields, defaults and presets as the Linen modules, with NNX conventions:
modules are built eagerly from ``rngs`` (``nnx.eval_shape`` builds them without allocating),
BatchNorm statistics are ``nnx.BatchStat`` variables updated in place, and ``model.train()`` /
``model.eval()`` switch BatchNorm between batch and running statistics (a new model is in train
mode, as in PyTorch and ``flax.nnx``). State paths are PyTorch's module paths: ``layer1[0].conv1``
is ``layer1.0.conv1`` (``nnx.List`` for numbered children), so conversion stays one structural walk.

One set of definitions: what a block or a network contains (layer names, channels, strides,
groups, which shortcut, which stem) and how it computes (block and stem forwards, PyTorch-exact
BatchNorm arithmetic) live in ``core.py`` and are shared with the Linen modules. This file only
turns a ``core.ConvSpec`` into an ``nnx.Conv`` and a :class:`BatchNorm` (``_add_conv_bn``) and a
plan into children; presets are generated from the Linen ``PRESETS`` table. (``nnx.bridge``
could wrap the Linen modules instead, but it needs a sample input to initialise, and keeps Linen's
``layer1_0`` names, so neither ``rngs``-at-construction nor PyTorch paths would hold.)
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen, nnx

from resnet_jax import core
from resnet_jax import models as _linen_models
from resnet_jax.core import check_images

Dtype = Any
Factory = Callable[..., nnx.Module]

_INDEX = re.compile(r"^(.*)_(\d+)$")
TORCHVISION_SHORTCUT = _linen_models.TORCHVISION_SHORTCUT
TIMM_AVG_SHORTCUT = _linen_models.TIMM_AVG_SHORTCUT


def default_conv(**overrides: Any) -> Factory:
    """An ``nnx.Conv`` factory with torchvision's initialisation, no bias, and a kernel that
    follows the input onto an explicit-axis mesh (``sharding.conv_general_dilated``)."""
    return functools.partial(nnx.Conv, **{**core.conv_args(), **overrides})


DEFAULT_CONV = default_conv()


class BatchNorm(nnx.Module):
    """PyTorch's BatchNorm2d over all axes but the last (the math is ``core.batch_norm``, shared
    with the Linen ``resnet_jax.BatchNorm``; see there for ``variance`` and ``momentum``).

    ``use_running_average`` is set by ``model.train()`` / ``model.eval()`` or per call.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        axis_name: Optional[str] = None,
        unbiased_running_var: bool = True,
        variance: str = "two_pass",
        recompute: bool = False,
        scale_init: Callable = linen.initializers.ones,
        bias_init: Callable = linen.initializers.zeros,
        rngs: nnx.Rngs,
    ):
        if variance not in core.BN_VARIANCES:
            raise ValueError(f"variance must be 'two_pass' or 'shifted'; got {variance!r}.")
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype))
        stat_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros(shape, stat_dtype))
        self.var = nnx.BatchStat(jnp.ones(shape, stat_dtype))
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.axis_name = axis_name
        self.unbiased_running_var = unbiased_running_var
        self.variance = variance
        self.recompute = recompute

    def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        train = not use_running_average
        y, mean, var = core.batch_norm(
            x,
            self.scale[...],
            self.bias[...],
            self.mean[...],
            self.var[...],
            train=train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            variance=self.variance,
            axis_name=self.axis_name,
            unbiased_running_var=self.unbiased_running_var,
            dtype=self.dtype,
            recompute=self.recompute,
        )
        if train:
            self.mean.set_value(mean)
            self.var.set_value(var)
        return y


# ---------------------------------------------------------------------------------------------
# From a plan's names to NNX children: `name_N` is element N of the nnx.List `name` (PyTorch's
# `name.N`), any other name a plain attribute. Indices of a PyTorch nn.Sequential that hold no
# parameters (a ReLU, a pool) are None.


def _attach(module: nnx.Module, name: str, child: nnx.Module) -> None:
    m = _INDEX.match(name)
    if m is None:
        setattr(module, name, child)
        return
    group, index = m.group(1), int(m.group(2))
    if not hasattr(module, group):
        setattr(module, group, nnx.List())
    children = getattr(module, group)
    if index < len(children):
        raise ValueError(f"{name}: children of {group!r} must be added in order (next is {len(children)}).")
    while len(children) < index:
        children.append(None)
    children.append(child)


def _child(module: nnx.Module, name: str) -> nnx.Module:
    m = _INDEX.match(name)
    return getattr(module, name) if m is None else getattr(module, m.group(1))[int(m.group(2))]


def _add_conv_bn(
    module: nnx.Module,
    spec: core.ConvSpec,
    conv: Factory,
    norm: Factory,
    rngs: nnx.Rngs,
    zero_init_residual: bool = False,
) -> None:
    k = spec.kernel_size
    _attach(
        module,
        spec.conv,
        conv(
            spec.in_channels,
            spec.out_channels,
            (k, k),
            strides=spec.stride,
            padding=spec.padding,
            feature_group_count=spec.groups,
            rngs=rngs,
            **core.conv_overrides(spec),
        ),
    )
    _attach(module, spec.norm, norm(spec.out_channels, rngs=rngs, **spec.norm_overrides(zero_init_residual)))


def _conv_bn(module: nnx.Module, spec: core.ConvSpec) -> core.Layer:
    return core.conv_bn_forward(spec, _child(module, spec.conv), _child(module, spec.norm))


class ShortcutProjection(nnx.Module):
    """The projection ``W_s x`` of the shortcut: 1x1 conv (with the block's stride) and BatchNorm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        conv: Factory = DEFAULT_CONV,
        norm: Factory = BatchNorm,
        conv_name: str = "conv",
        norm_name: str = "bn",
        rngs: nnx.Rngs,
    ):
        self.spec = core.projection_spec(in_channels, out_channels, stride, conv_name, norm_name)
        _add_conv_bn(self, self.spec, conv, norm, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv_bn(self, self.spec)(x)


class SqueezeExcite(nnx.Module):
    """timm's ``SEModule`` (``fc1``, ``fc2``: 1x1 convs with biases); see ``core.squeeze_excite``."""

    def __init__(self, channels: int, *, conv: Factory = DEFAULT_CONV, rngs: nnx.Rngs):
        reduced = core.se_channels(channels)
        self.fc1 = conv(channels, reduced, (1, 1), rngs=rngs, **core.se_conv_args(channels))
        self.fc2 = conv(reduced, channels, (1, 1), rngs=rngs, **core.se_conv_args(reduced))

    def __call__(self, x: jax.Array) -> jax.Array:
        return core.squeeze_excite(x, self.fc1, self.fc2)


class _Block(nnx.Module):
    """Children and forward shared by the two residual blocks."""

    def _build(
        self, stride, branch, conv, norm, act, zero_init_residual, shortcut_names, avg_down, attn_layer, rngs
    ) -> None:
        self.in_channels, self.out_channels = branch[0].in_channels, branch[-1].out_channels
        self.stride = stride
        self.act = act
        self.zero_init_residual = zero_init_residual
        self.avg_down = avg_down
        self.attn_layer = attn_layer
        self.branch_specs = branch
        for spec in branch:
            _add_conv_bn(self, spec, conv, norm, rngs, zero_init_residual)
        self.se = nnx.data(None)  # data, not static: it holds the SE module when there is one
        if attn_layer == "se":
            self.se = SqueezeExcite(self.out_channels, conv=conv, rngs=rngs)
        self.shortcut_spec, self.shortcut_module = None, None
        if core.needs_projection(self.in_channels, self.out_channels, self.stride):
            module_name, conv_name, norm_name = shortcut_names
            if module_name is None:
                # torchvision keeps the projection as `downsample.0` / `downsample.1` of the block,
                # timm's ResNet-D as `downsample.1` / `downsample.2` after a parameter-free pool.
                spec = core.projection_spec(
                    self.in_channels, self.out_channels, self.stride, conv_name, norm_name, avg_down
                )
                _add_conv_bn(self, spec, conv, norm, rngs)
                self.shortcut_spec = spec
            else:
                proj = ShortcutProjection(
                    self.in_channels,
                    self.out_channels,
                    self.stride,
                    conv=conv,
                    norm=norm,
                    conv_name=conv_name,
                    norm_name=norm_name,
                    rngs=rngs,
                )
                _attach(self, module_name, proj)
                self.shortcut_module = module_name

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.shortcut_spec is not None:
            shortcut = _conv_bn(self, self.shortcut_spec)
        elif self.shortcut_module is not None:
            shortcut = _child(self, self.shortcut_module)
        else:
            shortcut = None
        branch = [_conv_bn(self, s) for s in self.branch_specs]
        return core.residual_forward(x, branch, shortcut, self.act, self.se)


class ResidualBlock(_Block):
    """Two 3x3 convolutions and a shortcut: ``relu(F(x) + x)``, the block of ResNet-18/34
    (``core.residual_branch``). NNX needs ``in_channels``; the other fields are the Linen block's."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        conv: Factory = DEFAULT_CONV,
        norm: Factory = BatchNorm,
        act: Callable[[jax.Array], jax.Array] = nnx.relu,
        zero_init_residual: bool = False,
        shortcut_names: Sequence[Optional[str]] = ("shortcut", "conv", "bn"),
        avg_down: bool = False,
        attn_layer: str = "",
        rngs: nnx.Rngs,
    ):
        branch = core.residual_branch(in_channels, out_channels, stride)
        self._build(
            stride, branch, conv, norm, act, zero_init_residual, shortcut_names, avg_down, attn_layer, rngs
        )


class BottleneckResidualBlock(_Block):
    """1x1 reduce, 3x3 (strided, optionally grouped: ResNeXt), 1x1 expand, plus a shortcut
    (``core.residual_branch``). NNX needs ``in_channels``; the other fields are the Linen block's."""

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        *,
        conv: Factory = DEFAULT_CONV,
        norm: Factory = BatchNorm,
        act: Callable[[jax.Array], jax.Array] = nnx.relu,
        zero_init_residual: bool = False,
        shortcut_names: Sequence[Optional[str]] = ("shortcut", "conv", "bn"),
        avg_down: bool = False,
        attn_layer: str = "",
        rngs: nnx.Rngs,
    ):
        branch = core.residual_branch(in_channels, out_channels, stride, bottleneck_channels, groups)
        self.bottleneck_channels, self.groups = bottleneck_channels, groups
        self._build(
            stride, branch, conv, norm, act, zero_init_residual, shortcut_names, avg_down, attn_layer, rngs
        )


class _Network(nnx.Module):
    """Stem, stages and feature maps from a plan; the subclasses hold the fields."""

    def _build(self, stem: core.StemSpec, stages: core.Stages, conv, norm, rngs, **block_fields) -> None:
        self.stem_spec, self.stages = stem, stages
        for spec in stem.convs:
            _add_conv_bn(self, spec, conv, norm, rngs)
        for _, blocks in stages:
            for b in blocks:
                common = dict(conv=conv, norm=norm, rngs=rngs, attn_layer=b.attn_layer, **block_fields)
                if b.bottleneck_channels is None:
                    block = ResidualBlock(b.in_channels, b.out_channels, b.stride, **common)
                else:
                    block = BottleneckResidualBlock(
                        b.in_channels, b.bottleneck_channels, b.out_channels, b.stride, b.groups, **common
                    )
                _attach(self, b.name, block)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        check_images(x, self.img_channels, type(self).__name__)
        x = jnp.asarray(x, self.dtype)
        layers = [_conv_bn(self, s) for s in self.stem_spec.convs]
        x = core.stem_forward(x, self.stem_spec, layers, nnx.relu)
        feats = {"stem": x}
        for key, blocks in self.stages:
            for b in blocks:
                x = _child(self, b.name)(x)
            feats[key] = x
        return feats

    def _pooled(self, x: jax.Array) -> jax.Array:
        last = self.features(x)[self.stages[-1][0]]
        return core.global_avg_pool(last).astype(self.dtype)


class ResNetBase(_Network):
    """The seed's backbone (NNX): conv + BatchNorm stem, residual stages, global average pooling.

    Fields and defaults as the Linen ``resnet_jax.ResNetBase``; ``strides=(2, 1, ...)`` with
    ``conv_bias=True`` is the annotated PyTorch ResNet (labml_nn.resnet). ``features(x)`` gives
    ``'stem'``, ``'stage1'``, ...; calling the model gives pooled ``[batch, n_channels[-1]]``.
    """

    def __init__(
        self,
        n_blocks: Sequence[int],
        n_channels: Sequence[int],
        bottlenecks: Optional[Sequence[int]] = None,
        img_channels: int = 3,
        first_kernel_size: int = 7,
        strides: Optional[Sequence[int]] = None,
        conv_bias: bool = False,
        zero_init_residual: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        axis_name: Optional[str] = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        _store_fields(self, locals())
        stages = core.resnetbase_plan(n_blocks, n_channels, bottlenecks, strides)
        conv = default_conv(use_bias=conv_bias, dtype=dtype, param_dtype=param_dtype)
        norm = functools.partial(
            BatchNorm,
            momentum=momentum,
            epsilon=epsilon,
            axis_name=axis_name,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        stem = core.resnetbase_stem(img_channels, n_channels[0], first_kernel_size)
        self._build(stem, stages, conv, norm, rngs, zero_init_residual=zero_init_residual)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pooled(x)


class ResNet(_Network):
    """ResNet classifier (NNX) with torchvision's architecture (v1.5) and module names.

    Fields and defaults as the Linen ``resnet_jax.ResNet``: ``block`` ``'basic'`` or
    ``'bottleneck'``, ``groups``/``width_per_group`` (ResNeXt, Wide ResNet), ``small_stem`` (3x3/1
    stem, no max-pool, for 32x32 inputs), ``num_classes=None`` (no ``fc``: pooled features).
    ``features(x)`` gives ``'stem'`` and ``'layer1'``..``'layer4'`` (C2..C5). Logits are float32
    whatever ``dtype`` is. timm's ``stem_type``/``stem_width``/``avg_down`` (ResNet-D, -T),
    ``attn_layer='se'`` (SE-ResNet: ``layer1[0].se.fc1``) and the
    speed options ``bn_variance``, ``bn_recompute``, ``stem_pad_channels`` as in Linen.
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        block: str = "bottleneck",
        num_classes: Optional[int] = 1000,
        groups: int = 1,
        width_per_group: int = 64,
        img_channels: int = 3,
        small_stem: bool = False,
        stem_type: str = "",
        stem_width: int = 64,
        avg_down: bool = False,
        attn_layer: str = "",
        zero_init_residual: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        axis_name: Optional[str] = None,
        bn_variance: str = "two_pass",
        bn_recompute: bool = False,
        stem_pad_channels: Optional[int] = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        _store_fields(self, locals())
        stem = core.resnet_stem(img_channels, small_stem, stem_type, stem_width, stem_pad_channels)
        stages = core.resnet_plan(stage_sizes, block, groups, width_per_group, stem.out_channels, attn_layer)
        conv = default_conv(dtype=dtype, param_dtype=param_dtype)
        norm = functools.partial(
            BatchNorm,
            momentum=momentum,
            epsilon=epsilon,
            axis_name=axis_name,
            variance=bn_variance,
            recompute=bn_recompute,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self._build(
            stem,
            stages,
            conv,
            norm,
            rngs,
            zero_init_residual=zero_init_residual,
            shortcut_names=TIMM_AVG_SHORTCUT if avg_down else TORCHVISION_SHORTCUT,
            avg_down=avg_down,
        )
        self.fc = nnx.data(None)  # data, not static: it holds the classifier when there is one
        if num_classes is not None:
            fan_in = stages[-1][1][-1].out_channels
            self.fc = nnx.Linear(
                fan_in,
                num_classes,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
                **core.linear_args(fan_in),
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = self._pooled(x)
        if self.fc is None:
            return pooled
        return self.fc(pooled).astype(jnp.promote_types(self.param_dtype, jnp.float32))


def _store_fields(module: nnx.Module, args: Mapping[str, Any]) -> None:
    for name, value in args.items():
        if name not in ("self", "rngs", "__class__"):
            setattr(module, name, tuple(value) if isinstance(value, list) else value)


def fields(model: Union[ResNet, ResNetBase]) -> dict[str, Any]:
    """The constructor fields of an NNX ``ResNet``/``ResNetBase`` (those of its Linen twin)."""
    names = [n for n in inspect.signature(type(model).__init__).parameters if n not in ("self", "rngs")]
    return {n: getattr(model, n) for n in names}


_LINEN = {ResNet: _linen_models.ResNet, ResNetBase: _linen_models.ResNetBase}


def from_linen(module: linen.Module, *, rngs: nnx.Rngs) -> Union[ResNet, ResNetBase]:
    """The NNX model with the fields of a Linen ``resnet_jax.ResNet`` or ``ResNetBase``."""
    for nnx_cls, linen_cls in _LINEN.items():
        if type(module) is linen_cls:
            names = [n for n in linen_cls.__dataclass_fields__ if n not in ("parent", "name")]
            return nnx_cls(**{n: getattr(module, n) for n in names}, rngs=rngs)
    raise TypeError(f"from_linen takes a resnet_jax ResNet or ResNetBase; got {type(module).__name__}.")


def to_linen(model: Union[ResNet, ResNetBase]) -> linen.Module:
    """The Linen module with the fields of an NNX ``ResNet`` or ``ResNetBase`` (for
    ``convert.nnx_to_linen`` variables)."""
    if type(model) not in _LINEN:
        raise TypeError(f"to_linen takes a resnet_jax.nnx ResNet or ResNetBase; got {type(model).__name__}.")
    return _LINEN[type(model)](**fields(model))


# ---------------------------------------------------------------------------------------------
# Presets, generated from the Linen table so that the two APIs cannot drift apart.

PRESETS = _linen_models.PRESETS


def get_model(arch: str, num_classes: Optional[int] = 1000, *, rngs: nnx.Rngs, **overrides: Any) -> ResNet:
    """Build the preset ``arch`` (a key of ``PRESETS``); ``overrides`` set any other ResNet field."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(PRESETS)}.")
    known = set(inspect.signature(ResNet.__init__).parameters) - {"self", "rngs"}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown ResNet field(s) {sorted(unknown)} for {arch}.")
    return ResNet(num_classes=num_classes, **{**PRESETS[arch], **overrides}, rngs=rngs)


def _make_preset(arch: str) -> Callable[..., ResNet]:
    def preset(num_classes: Optional[int] = 1000, *, rngs: nnx.Rngs, **overrides: Any) -> ResNet:
        return get_model(arch, num_classes, rngs=rngs, **overrides)

    preset.__name__ = preset.__qualname__ = arch
    source = "torchvision" if arch in _linen_models.TORCHVISION_ARCHS else "timm"
    preset.__doc__ = f"{source}'s {arch} as an NNX ResNet; ``overrides`` set any ResNet field."
    return preset


for _arch in PRESETS:
    globals()[_arch] = _make_preset(_arch)
del _arch

__all__ = [
    "BatchNorm",
    "BottleneckResidualBlock",
    "PRESETS",
    "ResNet",
    "ResNetBase",
    "ResidualBlock",
    "ShortcutProjection",
    "SqueezeExcite",
    "default_conv",
    "fields",
    "from_linen",
    "get_model",
    "to_linen",
    *PRESETS,
]
