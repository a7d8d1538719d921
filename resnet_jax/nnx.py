"""Flax NNX versions of the resnet_jax models, for users of the NNX API.

Same architectures, fields, defaults and presets as the Linen modules, with NNX conventions:
modules are built eagerly from ``rngs`` (``nnx.eval_shape`` builds them without allocating),
BatchNorm statistics are ``nnx.BatchStat`` variables updated in place, and ``model.train()`` /
``model.eval()`` switch BatchNorm between batch and running statistics (a new model is in train
mode, as in PyTorch and ``flax.nnx``). State paths are PyTorch's module paths: ``layer1[0].conv1``
is ``layer1.0.conv1`` (``nnx.List`` for numbered children), so conversion stays one structural walk.

The networks and blocks are defined once, in ``networks.py`` and ``blocks.py`` (fields, layers
by PyTorch name, forward); this file builds their children as NNX modules and imports nothing of
Linen's modules. Linen <-> NNX conversion is in ``bridge.py``. (``nnx.bridge`` could wrap the
Linen modules instead, but it needs a sample input to initialise, and keeps Linen's ``layer1_0``
names.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import blocks, names, ops, presets
from resnet_jax.batchnorm import BN_VARIANCES, batch_norm, bn_fields, fold_act
from resnet_jax.layers import Conv, Dropout, Linear, Node, Norm
from resnet_jax.networks import NETWORKS, Network, ResNetBaseDef, ResNetDef, ResNetV2Def
from resnet_jax.ops import check_images
from resnet_jax.presets import ALL_PRESETS, PRESETS

Dtype = Any
Factory = Callable[..., nnx.Module]


def default_conv(**overrides: Any) -> Factory:
    """An ``nnx.Conv`` factory with torchvision's initialisation, no bias, and a kernel that
    follows the input onto an explicit-axis mesh (``sharding.conv_general_dilated``)."""
    return functools.partial(nnx.Conv, **{**ops.conv_args(), **overrides})


DEFAULT_CONV = default_conv()


class BatchNorm(nnx.Module):
    """PyTorch's BatchNorm2d over all axes but the last (the math is ``batchnorm.batch_norm``,
    shared with the Linen ``resnet_jax.BatchNorm``; see there for ``variance`` and ``momentum``).

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
        variance: ``'two_pass'`` or ``'shifted'`` (see ``batchnorm.batch_norm``).
        recompute: Recompute the normalisation in the backward pass (see ``batchnorm.batch_norm``).
        fused: In training, ``bn(x, residual=..., act=...)`` is one custom-VJP pass (see
            ``batchnorm.batch_norm``; an experiment for the GPU).
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
        if variance not in BN_VARIANCES:
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
        folded, after = fold_act(self.fused, residual, act)
        y, mean, var = batch_norm(
            x, self.scale[...], self.bias[...], *stats, train=train, **bn_fields(self), **folded
        )
        if train:
            self.mean.set_value(mean)
            self.var.set_value(var)
        return after(y)


@dataclasses.dataclass(frozen=True)
class Factories:
    """How a network's fields become NNX layers: its conv and BatchNorm factories, activation
    and dtypes."""

    conv: Factory = DEFAULT_CONV
    norm: Factory = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nnx.relu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def of(cls, net: Network) -> "Factories":
        conv = default_conv(**net.conv_options())
        return cls(
            conv, functools.partial(BatchNorm, **net.norm_options()), nnx.relu, net.dtype, net.param_dtype
        )


# ---------------------------------------------------------------------------------------------
# From a definition's PyTorch paths to NNX children: ``name.N`` is element N of the nnx.List
# ``name``, any other name a plain attribute. Indices of a PyTorch nn.Sequential that hold no
# parameters (a ReLU, a pool) are None.


def _attach(module: nnx.Module, path: str, child: nnx.Module) -> None:
    group, index = names.split_index(path)
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
    group, index = names.split_index(path)
    return getattr(module, group) if index is None else getattr(module, group)[index]


def _create(spec: Any, f: Factories, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX layer of a spec (``layers.Conv``, ``Norm``, ``Linear``) or definition (a node)."""
    if isinstance(spec, Conv):
        k = spec.kernel_size
        kw = dict(strides=spec.stride, padding=ops.torch_padding(k), feature_group_count=spec.groups)
        return f.conv(
            spec.in_channels, spec.out_channels, (k, k), rngs=rngs, **kw, **ops.conv_overrides(spec)
        )
    if isinstance(spec, Norm) and spec.kind == "group":
        return nnx.GroupNorm(
            spec.channels, num_groups=spec.groups, epsilon=spec.epsilon, use_fast_variance=False,
            dtype=f.dtype, param_dtype=f.param_dtype, rngs=rngs,
        )  # fmt: skip
    if isinstance(spec, Norm):
        init = {"scale_init": jax.nn.initializers.zeros} if spec.zero_init else {}
        return f.norm(spec.channels, rngs=rngs, **init)
    if isinstance(spec, Linear):
        linear = ops.linear_args(spec.in_features)
        return nnx.Linear(
            spec.in_features, spec.out_features, dtype=f.dtype, param_dtype=f.param_dtype, rngs=rngs, **linear
        )
    if isinstance(spec, Dropout):  # a stream forked from rngs.dropout; model.eval() makes it the identity
        return nnx.Dropout(spec.rate, broadcast_dims=spec.broadcast_dims, rngs=rngs)
    return Block(spec, f, rngs=rngs)


def _build(module: nnx.Module, node: Node, f: Factories, rngs: nnx.Rngs) -> None:
    for path, spec in node.children().items():
        _attach(module, path, _create(spec, f, rngs))


class _Layers:
    """``m[path]`` for a definition's forward in NNX: the child built from ``children()``."""

    def __init__(self, module: nnx.Module, act: Callable[[jax.Array], jax.Array]):
        self.module, self.act = module, act

    def __getitem__(self, path: str) -> Callable[..., jax.Array]:
        child = _child(self.module, path)
        if isinstance(child, nnx.GroupNorm):
            return lambda x, residual=None, act=None: ops.end_block(child(x), residual, act)
        return child


class Block(nnx.Module):
    """Runs an architecture definition (a block from ``resnet_jax.blocks``, or any ``layers.Node``)
    as an NNX module: ``Block(Bottleneck(256, 256), Factories(), rngs=nnx.Rngs(0))(x)``."""

    def __init__(self, node: Node, make: Factories = Factories(), *, rngs: nnx.Rngs):
        self.node, self.act = node, make.act
        _build(self, node, make, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.node.forward(_Layers(self, self.act), x)


class _Model(nnx.Module):
    """A network whose constructor fields are those of its ``definition`` (``networks.py``)."""

    definition: ClassVar[type]

    def _setup(self, fields: Mapping[str, Any], rngs: nnx.Rngs) -> None:
        net = self.definition(**fields)
        for name in fields:  # as the definition normalised them (lists become tuples)
            setattr(self, name, getattr(net, name))
        self.network = net
        _build(self, net, Factories.of(net), rngs)
        if getattr(net, "num_classes", 0) is None:
            self.fc = nnx.data(None)  # data, not static: the classifier's place, empty

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Feature maps: ``'stem'`` and one per stage (``'layer1'``..``'layer4'`` for ResNet)."""
        check_images(x, self.network.img_channels, type(self).__name__)
        return self.network.features(_Layers(self, nnx.relu), jnp.asarray(x, self.network.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.network.head(_Layers(self, nnx.relu), self.features(x))


def nnx_model(definition: type, name: str) -> type:
    """An NNX module class whose constructor takes ``definition``'s fields (and ``rngs``)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(definition):
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    params.append(inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY))
    signature = inspect.Signature(params)

    def __init__(self, *args: Any, rngs: nnx.Rngs, **kwargs: Any):
        bound = signature.bind(self, *args, rngs=rngs, **kwargs)
        bound.apply_defaults()
        fields = {k: v for k, v in bound.arguments.items() if k not in ("self", "rngs")}
        _Model._setup(self, fields, rngs)

    __init__.__signature__ = signature
    rngs_doc = "NNX: pass ``rngs`` (``nnx.Rngs(0)``; under ``nnx.eval_shape``, none allocated)."
    doc = f"{definition.__doc__}\n    {rngs_doc}\n"
    namespace = {"__init__": __init__, "definition": definition, "__doc__": doc, "__module__": __name__}
    MODELS[definition] = type(name, (_Model,), {**namespace, "__qualname__": name})
    return MODELS[definition]


# The NNX model class of each network definition.
MODELS: dict[type, type] = {}
globals().update({name: nnx_model(d, name) for name, d in NETWORKS.items()})  # ResNet, ResNetBase, ...
ResNet, ResNetBase, ResNetV2 = (MODELS[d] for d in (ResNetDef, ResNetBaseDef, ResNetV2Def))


def fields(model: nnx.Module) -> dict[str, Any]:
    """The constructor fields of an NNX ``ResNet``/``ResNetBase`` (those of its Linen twin)."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model.definition)}


def get_model(
    arch: str, num_classes: Optional[int] = 1000, *, rngs: nnx.Rngs, **overrides: Any
) -> nnx.Module:
    """Build the preset ``arch`` (a key of ``ALL_PRESETS``); ``overrides`` set any other field."""
    definition = NETWORKS[presets.family(arch)]
    known = {f.name for f in dataclasses.fields(definition)}
    return MODELS[definition](
        num_classes=num_classes, **presets.preset_fields(arch, overrides, known), rngs=rngs
    )


def _preset(arch: str) -> Callable[..., nnx.Module]:
    def preset(num_classes: Optional[int] = 1000, *, rngs: nnx.Rngs, **overrides: Any) -> nnx.Module:
        return get_model(arch, num_classes, rngs=rngs, **overrides)

    preset.__name__ = preset.__qualname__ = arch
    preset.__doc__ = f"{presets.preset_source(arch)}'s {arch} as an NNX model; ``overrides`` set any field."
    return preset


globals().update({arch: _preset(arch) for arch in ALL_PRESETS})


# ---------------------------------------------------------------------------------------------
# The blocks as NNX modules of their own, with the Linen blocks' fields plus ``in_channels``.


class ResidualBlock(Block):
    """``blocks.BasicBlock`` as an NNX module: two 3x3 convolutions and a shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, *, conv: Factory = DEFAULT_CONV,
        norm: Factory = BatchNorm, act: Callable = nnx.relu, zero_init_residual: bool = False,
        projection: str = "shortcut", avg_down: bool = False, attn_layer: str = "", rngs: nnx.Rngs,
    ):  # fmt: skip
        kw = dict(
            projection=projection,
            avg_down=avg_down,
            attn_layer=attn_layer,
            zero_init_residual=zero_init_residual,
        )
        node = blocks.BasicBlock(in_channels, out_channels, stride, **kw)
        super().__init__(node, Factories(conv, norm, act), rngs=rngs)


class BottleneckResidualBlock(Block):
    """``blocks.Bottleneck`` as an NNX module: 1x1 reduce, 3x3 (strided, grouped), 1x1 expand."""

    def __init__(
        self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int = 1,
        groups: int = 1, *, conv: Factory = DEFAULT_CONV, norm: Factory = BatchNorm, act: Callable = nnx.relu,
        zero_init_residual: bool = False, projection: str = "shortcut", avg_down: bool = False,
        attn_layer: str = "", rngs: nnx.Rngs,
    ):  # fmt: skip
        kw = dict(
            projection=projection,
            avg_down=avg_down,
            attn_layer=attn_layer,
            zero_init_residual=zero_init_residual,
        )
        node = blocks.Bottleneck(in_channels, out_channels, stride, bottleneck_channels, groups, **kw)
        super().__init__(node, Factories(conv, norm, act), rngs=rngs)


class ShortcutProjection(Block):
    """``blocks.ShortcutProjection`` as an NNX module: 1x1 conv (strided) and BatchNorm."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, *, conv: Factory = DEFAULT_CONV,
        norm: Factory = BatchNorm, act: Callable = nnx.relu, rngs: nnx.Rngs,
    ):  # fmt: skip
        node = blocks.ShortcutProjection(in_channels, out_channels, stride)
        super().__init__(node, Factories(conv, norm, act), rngs=rngs)


class SqueezeExcite(Block):
    """``blocks.SqueezeExcite`` as an NNX module: timm's ``SEModule`` (``fc1``, ``fc2``)."""

    def __init__(
        self, channels: int, *, conv: Factory = DEFAULT_CONV, norm: Factory = BatchNorm,
        act: Callable = nnx.relu, rngs: nnx.Rngs,
    ):  # fmt: skip
        super().__init__(blocks.SqueezeExcite(channels), Factories(conv, norm, act), rngs=rngs)


def from_linen(module: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX model with the fields of a Linen ``resnet_jax.ResNet`` or ``ResNetBase`` (the same
    definition, so the same layers and names; ``bridge.linen_to_nnx`` copies the variables)."""
    cls = MODELS.get(getattr(type(module), "definition", None))
    if cls is None or isinstance(module, nnx.Module):
        raise TypeError(f"from_linen takes a resnet_jax ResNet or ResNetBase; got {type(module).__name__}.")
    return cls(**{f.name: getattr(module, f.name) for f in dataclasses.fields(cls.definition)}, rngs=rngs)


def to_linen(model: nnx.Module) -> Any:
    """The Linen module with the fields of an NNX ``ResNet`` or ``ResNetBase`` (for
    ``bridge.nnx_to_linen`` variables). Imports the Linen modules on first use."""
    from resnet_jax import models  # not at the top: NNX users need not import the Linen modules

    if not isinstance(model, _Model):
        raise TypeError(f"to_linen takes a resnet_jax.nnx ResNet or ResNetBase; got {type(model).__name__}.")
    return models.MODELS[model.definition](**fields(model))


__all__ = [
    "ALL_PRESETS",
    "PRESETS",
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
    "default_conv",
    "fields",
    "from_linen",
    "get_model",
    "to_linen",
    *ALL_PRESETS,
]
