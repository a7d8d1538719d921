"""The Linen modules: PyTorch-exact BatchNorm, the host that runs an architecture definition
(``layers.Node``) as a Linen module, and ``ResNet``/``ResNetBase`` with their presets.

The networks and blocks are defined once, in ``networks.py`` and ``blocks.py``; this file turns
their layer specs into Linen layers. Submodule names are the PyTorch names with ``.N`` written
``_N`` (``layer2.0.downsample.1`` -> ``layer2_0/downsample_1``), so weight conversion is a
structural walk (``layout.py``). Every convolution is padded explicitly (``kernel // 2`` on each
side, as PyTorch does): Flax's ``'SAME'`` pads stride-2 convolutions asymmetrically and would
shift every feature map by half a pixel relative to a PyTorch model with the same weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import blocks, names, ops, presets
from resnet_jax.batchnorm import batch_norm, bn_fields, fold_act
from resnet_jax.layers import Conv, Dropout, Linear, Node, Norm
from resnet_jax.networks import NETWORKS, Network, ResNetBaseDef, ResNetDef, ResNetV2Def
from resnet_jax.ops import check_images
from resnet_jax.presets import ALL_PRESETS, PRESETS, TORCHVISION_ARCHS

Dtype = Any
ModuleDef = Callable[..., nn.Module]


def default_conv(**overrides: Any) -> ModuleDef:
    """An ``nn.Conv`` factory with torchvision's initialisation, no bias, and a kernel that
    follows the input onto an explicit-axis mesh (``sharding.conv_general_dilated``)."""
    return functools.partial(nn.Conv, **{**ops.conv_args(), **overrides})


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's semantics (``batchnorm.batch_norm``).

    Differences from ``flax.linen.BatchNorm`` that matter for parity with ``torch.nn.BatchNorm2d``:
    the running variance is updated with the *unbiased* batch variance, and ``momentum`` 0.9
    (Flax's convention) equals PyTorch's 0.1. ``variance`` is ``'two_pass'`` (default, robust
    whatever the mean) or ``'shifted'`` (one pass, shifted by the running mean: less work, but
    less exact in float32 in the first steps from scratch); both give PyTorch's value at
    float64. ``recompute=True`` keeps the backward pass's copy of ``x`` in its own dtype (values
    unchanged). ``norm(x, train, residual, act)`` returns ``act(bn(x) + residual)``, the end of a
    block; ``fused=True`` makes that one custom-VJP pass in training (an experiment for the GPU,
    values unchanged). Statistics are computed in at least float32 whatever ``dtype`` is. Under
    ``jax.jit`` with a batch sharded over a mesh the reductions are global automatically; under
    ``pmap`` set ``axis_name`` to average them across devices (synchronised BatchNorm).
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
        folded, after = fold_act(self.fused, residual, act)
        y, mean, var = batch_norm(
            x, scale, bias, *stats, train=train, update_stats=update, **bn_fields(self), **folded
        )
        if update:
            ra_mean.value, ra_var.value = mean, var
        return after(y)


def classifier_head(
    num_classes: int,
    fan_in: int,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str = "fc",
) -> nn.Dense:
    """The ``fc`` layer of :class:`ResNet`, initialised as ``torch.nn.Linear``; shared with weight
    conversion, which initialises a fresh head the same way. ``fan_in`` sets the bias
    initialisation's range, as PyTorch's ``Linear`` does."""
    return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype, name=name, **ops.linear_args(fan_in))


@dataclasses.dataclass(frozen=True)
class Factories:
    """How a network's fields become Linen layers: its conv and BatchNorm factories, activation
    and dtypes."""

    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def of(cls, net: Network) -> "Factories":
        conv = default_conv(**net.conv_options())
        return cls(
            conv, functools.partial(BatchNorm, **net.norm_options()), nn.relu, net.dtype, net.param_dtype
        )


class _Layers:
    """``m[path]`` for a definition's forward in Linen: creates the child inside the calling
    compact method the first time it is used (Linen binds a submodule to the module whose
    compact method is running)."""

    def __init__(self, node: Node, train: bool, make: Factories):
        self.specs, self.train, self.make, self.act, self.made = node.children(), train, make, make.act, {}

    def __getitem__(self, path: str) -> Callable[..., jax.Array]:
        if path not in self.made:
            self.made[path] = self._create(names.linen_name(path), self.specs[path])
        return self.made[path]

    def _create(self, name: str, spec: Any) -> Callable[..., jax.Array]:
        f = self.make
        if isinstance(spec, Conv):
            k = spec.kernel_size
            kw = dict(strides=spec.stride, padding=ops.torch_padding(k), feature_group_count=spec.groups)
            return f.conv(spec.out_channels, (k, k), name=name, **kw, **ops.conv_overrides(spec))
        if isinstance(spec, Norm) and spec.kind == "group":
            gn = nn.GroupNorm(
                spec.groups, epsilon=spec.epsilon, use_fast_variance=False, dtype=f.dtype,
                param_dtype=f.param_dtype, name=name,
            )  # fmt: skip
            return lambda x, residual=None, act=None: ops.end_block(gn(x), residual, act)
        if isinstance(spec, Norm):
            init = {"scale_init": nn.initializers.zeros} if spec.zero_init else {}
            return functools.partial(f.norm(name=name, **init), train=self.train)
        if isinstance(spec, Linear):
            return classifier_head(spec.out_features, spec.in_features, f.dtype, f.param_dtype, name)
        if isinstance(spec, Dropout):  # draws from the 'dropout' RNG (``make_rng``) in training
            drop = nn.Dropout(spec.rate, broadcast_dims=spec.broadcast_dims, name=name)
            return functools.partial(drop, deterministic=not self.train)
        return functools.partial(Block(spec, f, name=name), train=self.train)


class Block(nn.Module):
    """Runs an architecture definition (a block from ``resnet_jax.blocks``, or any ``layers.Node``)
    as a Linen module: ``Block(Bottleneck(256, 256), Factories(conv, norm))(x, train)``."""

    node: Node
    make: Factories

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        return self.node.forward(_Layers(self.node, train, self.make), x)


class _Model(nn.Module):
    """A network whose fields are those of its ``definition`` (``networks.py``), a class
    attribute of each subclass (not a field)."""

    definition = None

    def network(self) -> Network:
        """The architecture definition with this module's fields."""
        return self.definition(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self.definition)})

    def features(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
        """Feature maps: ``'stem'`` (after the stem) and one per stage (``'layer1'``..``'layer4'``,
        C2..C5, for ResNet). ``model.apply(variables, x, train=False, method='features')``; add
        ``mutable=['batch_stats']`` with ``train=True``. ``fc`` is neither used nor needed."""
        return self._forward(x, train, head=False)[0]

    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        return self._forward(x, train, head=True)[1]

    @nn.compact
    def _forward(self, x: jax.Array, train: bool, head: bool):
        net = self.network()
        net.stages()  # the plan's errors before the input's
        check_images(x, net.img_channels, type(self).__name__)
        m = _Layers(net, train, Factories.of(net))
        feats = net.features(m, jnp.asarray(x, net.dtype))
        return feats, (net.head(m, feats) if head else None)


def linen_model(definition: type, name: str) -> type:
    """A Linen module class with ``definition``'s fields, defaults and docstring."""
    fields = dataclasses.fields(definition)
    namespace = {
        "__annotations__": {f.name: f.type for f in fields},
        **{f.name: f.default for f in fields if f.default is not dataclasses.MISSING},
        "__doc__": definition.__doc__,
        "__module__": __name__,
        "__qualname__": name,
        "definition": definition,
    }
    MODELS[definition] = type(name, (_Model,), namespace)
    return MODELS[definition]


# The Linen model class of each network definition.
MODELS: dict[type, type] = {}
globals().update({name: linen_model(d, name) for name, d in NETWORKS.items()})  # ResNet, ResNetBase, ...
ResNet, ResNetBase, ResNetV2 = (MODELS[d] for d in (ResNetDef, ResNetBaseDef, ResNetV2Def))


def get_model(arch: str, num_classes: Optional[int] = 1000, **overrides: Any) -> nn.Module:
    """Build the preset ``arch`` (a key of ``ALL_PRESETS``); ``overrides`` set any other field."""
    definition = NETWORKS[presets.family(arch)]
    known = {f.name for f in dataclasses.fields(definition)}
    return MODELS[definition](num_classes=num_classes, **presets.preset_fields(arch, overrides, known))


def _preset(arch: str) -> Callable[..., nn.Module]:
    def preset(num_classes: Optional[int] = 1000, **overrides: Any) -> nn.Module:
        return get_model(arch, num_classes, **overrides)

    preset.__name__ = preset.__qualname__ = arch
    preset.__doc__ = f"{presets.preset_source(arch)}'s {arch} as a Flax model; ``overrides`` set any field."
    return preset


globals().update({arch: _preset(arch) for arch in ALL_PRESETS})


# ---------------------------------------------------------------------------------------------
# The blocks as Linen modules of their own, for building other networks: each infers its input
# channels from ``x`` and takes the conv and norm factories.


class _BlockModule(nn.Module):
    def node(self, in_channels: int) -> Node:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        node = self.node(x.shape[-1])
        return node.forward(_Layers(node, train, Factories(self.conv, self.norm, self.act)), x)


class ResidualBlock(_BlockModule):
    """``blocks.BasicBlock`` as a Linen module: two 3x3 convolutions and a shortcut."""

    out_channels: int
    stride: int = 1
    conv: ModuleDef = default_conv()
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    zero_init_residual: bool = False
    projection: str = "shortcut"
    avg_down: bool = False
    attn_layer: str = ""

    def node(self, in_channels: int) -> Node:
        kw = dict(projection=self.projection, avg_down=self.avg_down, attn_layer=self.attn_layer)
        return blocks.BasicBlock(
            in_channels, self.out_channels, self.stride, zero_init_residual=self.zero_init_residual, **kw
        )


class BottleneckResidualBlock(_BlockModule):
    """``blocks.Bottleneck`` as a Linen module: 1x1 reduce, 3x3 (strided, grouped), 1x1 expand."""

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

    def node(self, in_channels: int) -> Node:
        kw = dict(projection=self.projection, avg_down=self.avg_down, attn_layer=self.attn_layer)
        return blocks.Bottleneck(
            in_channels, self.out_channels, self.stride, self.bottleneck_channels, self.groups,
            zero_init_residual=self.zero_init_residual, **kw,
        )  # fmt: skip


class ShortcutProjection(_BlockModule):
    """``blocks.ShortcutProjection`` as a Linen module: 1x1 conv (strided) and BatchNorm."""

    out_channels: int
    stride: int = 1
    conv: ModuleDef = default_conv()
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu

    def node(self, in_channels: int) -> Node:
        return blocks.ShortcutProjection(in_channels, self.out_channels, self.stride)


class SqueezeExcite(_BlockModule):
    """``blocks.SqueezeExcite`` as a Linen module: timm's ``SEModule`` (``fc1``, ``fc2``)."""

    conv: ModuleDef = default_conv()
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu

    def node(self, in_channels: int) -> Node:
        return blocks.SqueezeExcite(in_channels)


__all__ = [
    "ALL_PRESETS",
    "PRESETS",
    "TORCHVISION_ARCHS",
    "BatchNorm",
    "Block",
    "BottleneckResidualBlock",
    "Factories",
    "ResNet",
    "ResNetBase",
    "ResNetV2",
    "ResidualBlock",
    "ShortcutProjection",
    "SqueezeExcite",
    "check_images",
    "classifier_head",
    "default_conv",
    "get_model",
    *ALL_PRESETS,
]
