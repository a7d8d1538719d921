"""The vocabulary of an architecture definition, shared by the Linen and the NNX modules.

An architecture is written once, as plain frozen dataclasses that know neither API:

* layer specs (:class:`Conv`, :class:`Norm`, :class:`Linear`) say what a layer is;
* a :class:`Node` (a block, a shortcut, a whole network) names its children by their PyTorch
  module paths (``conv1``, ``downsample.1``, ``layer1.0``) in :meth:`Node.children`, and says how
  they connect in :meth:`Node.forward`, read top to bottom like a PyTorch ``forward``.

``forward`` reaches its children through ``m[path]`` (a :class:`Layers`). Each API supplies its own
``Layers``: Linen creates the submodule inside the calling compact method, NNX looks up the child it
built from ``children()``. So the same forward runs in both APIs, and the PyTorch names are the
state's names, which keeps weight conversion a structural walk. docs/design.md explains the split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax

from resnet_jax import ops

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Conv:
    """A 2-D convolution with PyTorch's symmetric ``kernel_size // 2`` padding.

    ``bias``: this conv has a bias of its own, initialised as PyTorch's (squeeze-and-excitation's
    ``fc1``/``fc2``, timm's conv heads); otherwise the network's conv options decide.
    ``pad_channels_to``: zero-pad the input channels inside the conv (:func:`ops.channel_padded_conv`).
    ``standardize``: weight standardisation with this epsilon (0: off), BiT's ``StdConv2d``.
    """

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    bias: bool = False
    pad_channels_to: int = 0
    standardize: float = 0.0


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalisation of ``channels``: the network's BatchNorm (``kind='batch'``), or GroupNorm
    with ``groups`` groups (``kind='group'``). ``zero_init`` starts its scale at 0, which makes a
    residual branch that ends with it start as the identity (``zero_init_residual``)."""

    channels: int
    zero_init: bool = False
    kind: str = "batch"
    groups: int = 32
    epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class Linear:
    """A fully connected layer, initialised as ``torch.nn.Linear`` (the classifier ``fc``)."""

    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Dropout of probability ``rate`` in training, the identity in evaluation; what is kept is
    scaled by ``1 / (1 - rate)``. The draws share a mask along ``broadcast_dims``: ``(1, 2, 3)``
    of an NHWC map is timm's ``DropPath`` (stochastic depth), one draw per example, so a residual
    branch is dropped for the whole example. The draws come from the ``'dropout'`` RNG stream."""

    rate: float
    broadcast_dims: tuple[int, ...] = ()


def drop_path(rate: float) -> Dropout:
    """timm's ``DropPath(rate)`` of a residual branch: per-example dropout of an NHWC map."""
    return Dropout(rate, broadcast_dims=(1, 2, 3))


def check_rate(name: str, rate: float) -> None:
    """A dropout probability must be in [0, 1): at 1 nothing would be kept."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {rate!r}.")


class Layers(Protocol):
    """How a :meth:`Node.forward` reaches its children, in either API.

    ``m[path]`` is the child named ``path`` in :meth:`Node.children`: a conv, linear layer or
    dropout is ``x -> y``; a norm is ``(x, residual=None, act=None) -> act(norm(x) + residual)``;
    a node is ``x -> y``. ``m.act`` is the network's activation. A dropout knows the train flag
    and its RNG stream from its API (Linen: ``train`` and ``rngs={'dropout': key}``; NNX:
    ``model.train()``/``model.eval()`` and ``nnx.Rngs(dropout=...)``).
    """

    act: Callable[[Array], Array]

    def __getitem__(self, path: str) -> Callable[..., Array]: ...


Spec = Any  # Conv | Norm | Linear | Dropout | Node


class Node:
    """A module of an architecture definition: children by PyTorch path, and a forward.

    Subclasses are frozen dataclasses, so a definition is a hashable value that Linen modules can
    hold as a field and NNX modules as static data.
    """

    def children(self) -> Mapping[str, Spec]:
        """``{pytorch_path: spec}`` in creation order (NNX draws initial parameters in this order)."""
        raise NotImplementedError

    def forward(self, m: Layers, x: Array) -> Array:
        raise NotImplementedError


# (path of the conv, path of its norm, the conv) of a stem, in order.
StemLayer = tuple[str, str, Conv]
# Stages: the feature map's name and its blocks, each (PyTorch path, block definition).
Stages = tuple[tuple[str, tuple[tuple[str, Node], ...]], ...]


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class Network(Node):
    """What every network definition has: a stem, stages of blocks, and a head.

    Subclasses are frozen dataclasses whose fields are the model's fields. They give
    :meth:`stem` and :meth:`stages`, and may override :meth:`head`; the layer options
    (:meth:`conv_options`, :meth:`norm_options`) are what their fields mean for every conv and
    BatchNorm, which each API turns into its own layer factories.
    """

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists from configs and JSON: hashable tuples
            object.__setattr__(self, f.name, _as_tuple(getattr(self, f.name)))
        for name in ("drop_rate", "drop_path_rate"):  # the networks that have them
            if hasattr(self, name):
                check_rate(name, getattr(self, name))

    # -- the plan --

    def stem(self) -> tuple[tuple[StemLayer, ...], bool, bool]:
        """``(layers, act, max_pool)``: conv+norm pairs, whether ReLU follows each, and the pool."""
        raise NotImplementedError

    def stages(self) -> Stages:
        raise NotImplementedError

    def head_children(self) -> dict[str, Spec]:
        return {}

    def children(self) -> Mapping[str, Spec]:
        out: dict[str, Spec] = {}
        for conv_path, norm_path, conv in self.stem()[0]:
            out[conv_path], out[norm_path] = conv, Norm(conv.out_channels)
        for _, blocks in self.stages():
            out.update(blocks)
        out.update(self.head_children())
        return out

    @property
    def out_channels(self) -> int:
        return self.stages()[-1][1][-1][1].out_channels

    def conv_options(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def norm_options(self) -> dict[str, Any]:
        keys = ("momentum", "epsilon", "axis_name", "dtype", "param_dtype")
        return {k: getattr(self, k) for k in keys}

    # -- the forward --

    def features(self, m: Layers, x: Array) -> dict[str, Array]:
        layers, act, max_pool = self.stem()
        for conv_path, norm_path, _ in layers:
            x = m[norm_path](m[conv_path](x), act=jax.nn.relu if act else None)
        x = ops.max_pool_3x3(x) if max_pool else x
        feats = {"stem": x}
        for key, blocks in self.stages():
            for path, _ in blocks:
                x = m[path](x)
            feats[key] = x
        return feats

    def head(self, m: Layers, feats: Mapping[str, Array]) -> Array:
        return ops.global_avg_pool(feats[self.stages()[-1][0]]).astype(self.dtype)

    def forward(self, m: Layers, x: Array) -> Array:
        return self.head(m, self.features(m, x))
