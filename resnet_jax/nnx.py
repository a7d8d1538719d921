"""Flax NNX versions of the resnet_jax models, for users of the NNX API.

Same architectures, fields, defaults and presets as the Linen modules, with NNX conventions:
modules are built eagerly from ``rngs`` (``nnx.eval_shape`` builds them without allocating),
BatchNorm statistics are ``nnx.BatchStat`` variables updated in place, and ``model.train()`` /
``model.eval()`` switch BatchNorm between batch and running statistics (a new model is in train
mode, as in PyTorch and ``flax.nnx``). State paths are PyTorch's module paths: ``layer1[0].conv1``
is ``layer1.0.conv1`` (``nnx.List`` for numbered children), so conversion stays one structural walk.

What a block or network contains (the plans: layer names, channels, strides, groups, shortcut,
stem, presets) and the arithmetic (BatchNorm, pools, the SE gate) come from ``core.py``, shared
with the Linen modules; this file imports nothing of Linen's modules. Linen <-> NNX conversion is
in ``bridge.py``. (``nnx.bridge`` could wrap the Linen modules instead, but it needs a sample
input to initialise, and keeps Linen's ``layer1_0`` names.)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import core
from resnet_jax.core import PRESETS, check_images

Dtype = Any
Factory = Callable[..., nnx.Module]


def default_conv(**overrides: Any) -> Factory:
    """An ``nnx.Conv`` factory with torchvision's initialisation, no bias, and a kernel that
    follows the input onto an explicit-axis mesh (``sharding.conv_general_dilated``)."""
    return functools.partial(nnx.Conv, **{**core.conv_args(), **overrides})


DEFAULT_CONV = default_conv()


class BatchNorm(nnx.Module):
    """PyTorch's BatchNorm2d over all axes but the last (the math is ``core.batch_norm``, shared
    with the Linen ``resnet_jax.BatchNorm``; see there for ``variance`` and ``momentum``).

    ``use_running_average`` is set by ``model.train()`` / ``model.eval()`` or per call.

    Args:
        num_features: Channels (the last axis).
        use_running_average: Normalise with the running statistics (eval) rather than the
            batch's (train).
        momentum: Weight of the old running statistics (Flax's convention: 0.9 is PyTorch's 0.1).
        epsilon: Added to the variance before the square root.
        dtype: The output's dtype; None keeps the input's.
        param_dtype: Dtype of ``scale`` and ``bias``; the statistics are at least float32.
        axis_name: A ``pmap`` axis for synchronised BatchNorm; None under ``jax.jit``.
        unbiased_running_var: Update the running variance with the unbiased batch variance, as
            PyTorch does.
        variance: ``'two_pass'`` or ``'shifted'`` (see ``core.batch_norm``).
        recompute: Recompute the normalisation in the backward pass (see ``core.batch_norm``).
        fused: In training, ``bn(x, residual=..., act=...)`` is one custom-VJP pass (see
            ``core.batch_norm``; an experiment for the GPU).
        scale_init: Initializer of ``scale``.
        bias_init: Initializer of ``bias``.
        rngs: Random streams; ``params`` initialises ``scale`` and ``bias``.
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
        fused: bool = False,
        scale_init: Callable = jax.nn.initializers.ones,
        bias_init: Callable = jax.nn.initializers.zeros,
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
        self.fused = fused

    def __call__(
        self,
        x: jax.Array,
        use_running_average: Optional[bool] = None,
        *,
        residual: Optional[jax.Array] = None,
        act: Optional[Callable[[jax.Array], jax.Array]] = None,
    ) -> jax.Array:
        """``act(bn(x) + residual)``; ``residual`` and ``act`` default to none."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        train = not use_running_average
        stats = (self.mean[...], self.var[...])
        folded, after = core.fold_act(self.fused, residual, act)
        y, mean, var = core.batch_norm(
            x, self.scale[...], self.bias[...], *stats, train=train, **core.bn_fields(self), **folded
        )
        if train:
            self.mean.set_value(mean)
            self.var.set_value(var)
        return after(y)


# ---------------------------------------------------------------------------------------------
# From a plan's PyTorch paths to NNX children: `name.N` is element N of the nnx.List `name`, any
# other name a plain attribute. Indices of a PyTorch nn.Sequential that hold no parameters (a
# ReLU, a pool) are None.


def _attach(module: nnx.Module, path: str, child: nnx.Module) -> None:
    group, index = core.split_index(path)
    if index is None:
        setattr(module, group, child)
        return
    if not hasattr(module, group):
        setattr(module, group, nnx.List())
    children = getattr(module, group)
    if index < len(children):
        raise ValueError(f"{path}: children of {group!r} must be added in order (next is {len(children)}).")
    while len(children) < index:
        children.append(None)
    children.append(child)


def _child(module: nnx.Module, path: str) -> nnx.Module:
    group, index = core.split_index(path)
    return getattr(module, group) if index is None else getattr(module, group)[index]


def _add_conv_bn(
    module: nnx.Module,
    spec: core.ConvSpec,
    conv: Factory,
    norm: Factory,
    rngs: nnx.Rngs,
    zero_init_residual: bool = False,
) -> None:
    k = spec.kernel_size
    layer = conv(
        spec.in_channels,
        spec.out_channels,
        (k, k),
        strides=spec.stride,
        padding=spec.padding,
        feature_group_count=spec.groups,
        rngs=rngs,
        **core.conv_overrides(spec),
    )
    _attach(module, spec.conv, layer)
    _attach(module, spec.norm, norm(spec.out_channels, rngs=rngs, **spec.norm_overrides(zero_init_residual)))


def _conv_bn(module: nnx.Module, spec: core.ConvSpec) -> core.Layer:
    """``x -> norm(conv(pool(x)))`` of ``spec``'s children of ``module``; keywords (``residual``,
    ``act``) go to the norm."""
    conv, norm = _child(module, spec.conv), _child(module, spec.norm)
    return lambda x, **end: norm(conv(core.avg_pool_ceil(x, spec.pool)), **end)


class ShortcutProjection(nnx.Module):
    """The projection ``W_s x`` of the shortcut: 1x1 conv (with the block's stride) and BatchNorm,
    as labml.ai's annotated ResNet names it (``shortcut.conv``, ``shortcut.bn``)."""

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
    """Children from a ``core.BlockPlan``, and the forward of both residual blocks."""

    def _build(self, plan: core.BlockPlan, conv: Factory, norm: Factory, rngs: nnx.Rngs) -> None:
        self.plan = plan
        for spec in plan.branch:
            _add_conv_bn(self, spec, conv, norm, rngs, self.zero_init_residual)
        if plan.shortcut_module is not None:
            s = plan.shortcut
            proj = ShortcutProjection(
                s.in_channels, s.out_channels, s.stride, conv=conv, norm=norm, conv_name=s.conv,
                norm_name=s.norm, rngs=rngs,
            )  # fmt: skip
            _attach(self, plan.shortcut_module, proj)
        elif plan.shortcut is not None:
            _add_conv_bn(self, plan.shortcut, conv, norm, rngs)
        self.se = nnx.data(None)  # data, not static: it holds the SE module when there is one
        if plan.se_channels:
            self.se = SqueezeExcite(plan.out_channels, conv=conv, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        plan = self.plan
        *inner, last = plan.branch
        y = x
        for spec in inner:  # conv -> norm -> act
            y = _conv_bn(self, spec)(y, act=self.act)
        shortcut = x
        if plan.shortcut_module is not None:
            shortcut = _child(self, plan.shortcut_module)(x)
        elif plan.shortcut is not None:
            shortcut = _conv_bn(self, plan.shortcut)(x)
        if self.se is not None:  # conv -> norm -> SE -> add -> act
            return self.act(self.se(_conv_bn(self, last)(y)) + shortcut)
        return _conv_bn(self, last)(y, residual=shortcut, act=self.act)  # conv -> norm -> add -> act


class ResidualBlock(_Block):
    """Two 3x3 convolutions and a shortcut: ``relu(F(x) + x)``, the block of ResNet-18/34
    (``core.block_plan``). NNX needs ``in_channels``; the other fields are the Linen block's."""

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
        projection: str = "shortcut",
        avg_down: bool = False,
        attn_layer: str = "",
        rngs: nnx.Rngs,
    ):
        _store_fields(self, locals(), skip=("conv", "norm"))
        plan = core.block_plan(
            in_channels, out_channels, stride, projection=projection, avg_down=avg_down, attn_layer=attn_layer
        )
        self._build(plan, conv, norm, rngs)


class BottleneckResidualBlock(_Block):
    """1x1 reduce, 3x3 (strided, optionally grouped: ResNeXt), 1x1 expand, plus a shortcut
    (``core.block_plan``). NNX needs ``in_channels``; the other fields are the Linen block's."""

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
        projection: str = "shortcut",
        avg_down: bool = False,
        attn_layer: str = "",
        rngs: nnx.Rngs,
    ):
        _store_fields(self, locals(), skip=("conv", "norm"))
        plan = core.block_plan(
            in_channels, out_channels, stride, bottleneck_channels, groups, projection, avg_down, attn_layer
        )
        self._build(plan, conv, norm, rngs)


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
        for spec in self.stem_spec.convs:
            x = _conv_bn(self, spec)(x, act=nnx.relu if self.stem_spec.act else None)
        x = core.max_pool_3x3(x) if self.stem_spec.max_pool else x
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
    """labml.ai's annotated ResNet backbone (NNX): conv + BatchNorm stem, residual stages, global
    average pooling.

    Fields and defaults as the Linen ``resnet_jax.ResNetBase``; ``strides=(2, 1, ...)`` with
    ``conv_bias=True`` is the annotated PyTorch ResNet (labml_nn.resnet). ``features(x)`` gives
    ``'stem'``, ``'stage1'``, ...; calling the model gives pooled ``[batch, n_channels[-1]]``.

    Args:
        n_blocks: Residual blocks per stage.
        n_channels: Output channels per stage; the stem has ``n_channels[0]``.
        bottlenecks: Bottleneck width per stage (bottleneck blocks); None: basic blocks.
        img_channels: Input image channels.
        first_kernel_size: The stem conv's kernel size.
        strides: The first block's stride per stage; None means ``(1, 2, 2, ...)``.
        conv_bias: Give every conv a bias, as PyTorch's ``Conv2d`` does by default.
        zero_init_residual: Initialise each block's last BatchNorm scale to 0 (blocks start as
            the identity).
        momentum: BatchNorm momentum, Flax's convention (0.9 is PyTorch's 0.1).
        epsilon: BatchNorm epsilon.
        axis_name: A ``pmap`` axis for synchronised BatchNorm; None under ``jax.jit``.
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
        rngs: Random streams for the initial parameters (``nnx.Rngs(0)``, or ``nnx.eval_shape``
            to allocate none).
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
    ``attn_layer='se'`` (SE-ResNet: ``layer1[0].se.fc1``) and the speed options ``bn_variance``,
    ``bn_recompute``, ``stem_pad_channels`` as in Linen.

    Args:
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
        zero_init_residual: Initialise each block's last BatchNorm scale to 0 (blocks start as
            the identity).
        momentum: BatchNorm momentum, Flax's convention (0.9 is PyTorch's 0.1).
        epsilon: BatchNorm epsilon.
        axis_name: A ``pmap`` axis for synchronised BatchNorm; None under ``jax.jit``.
        bn_variance: ``'two_pass'`` or ``'shifted'`` BatchNorm variance.
        bn_recompute: Recompute BatchNorm in the backward pass instead of storing float32 copies.
        bn_fused: BatchNorm, add and ReLU as one custom-VJP pass in training (an experiment).
        stem_pad_channels: Pad the stem conv's input channels to this multiple; None: 8 on GPUs,
            off elsewhere; 0: off.
        dtype: Compute dtype.
        param_dtype: Parameter dtype.
        rngs: Random streams for the initial parameters (``nnx.Rngs(0)``, or ``nnx.eval_shape``
            to allocate none).
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
        bn_fused: bool = False,
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
            fused=bn_fused,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        block_fields = dict(zero_init_residual=zero_init_residual, projection="downsample", avg_down=avg_down)
        self._build(stem, stages, conv, norm, rngs, **block_fields)
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


def _store_fields(module: nnx.Module, args: Mapping[str, Any], skip: Sequence[str] = ()) -> None:
    for name, value in args.items():
        if name not in ("self", "rngs", "__class__", *skip):
            setattr(module, name, tuple(value) if isinstance(value, list) else value)


def fields(model: nnx.Module) -> dict[str, Any]:
    """The constructor fields of an NNX ``ResNet``/``ResNetBase`` (those of its Linen twin)."""
    names = [n for n in inspect.signature(type(model).__init__).parameters if n not in ("self", "rngs")]
    return {n: getattr(model, n) for n in names}


def get_model(arch: str, num_classes: Optional[int] = 1000, *, rngs: nnx.Rngs, **overrides: Any) -> ResNet:
    """Build the preset ``arch`` (a key of ``PRESETS``); ``overrides`` set any other ResNet field."""
    known = set(inspect.signature(ResNet.__init__).parameters) - {"self", "rngs"}
    return ResNet(num_classes=num_classes, **core.preset_fields(arch, overrides, known), rngs=rngs)


def _preset(arch: str) -> Callable[..., ResNet]:
    def preset(num_classes: Optional[int] = 1000, *, rngs: nnx.Rngs, **overrides: Any) -> ResNet:
        return get_model(arch, num_classes, rngs=rngs, **overrides)

    preset.__name__ = preset.__qualname__ = arch
    preset.__doc__ = (
        f"{core.preset_source(arch)}'s {arch} as an NNX ResNet; ``overrides`` set any ResNet field."
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


def __getattr__(name: str) -> Any:
    # Linen <-> NNX conversion lives in bridge.py (it imports the Linen modules); these names stay
    # importable from here, loaded on first use so that importing this module loads no Linen model.
    if name in ("from_linen", "to_linen"):
        from resnet_jax import bridge

        return getattr(bridge, name)
    raise AttributeError(f"module 'resnet_jax.nnx' has no attribute {name!r}")


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
    "get_model",
    *PRESETS,
]
