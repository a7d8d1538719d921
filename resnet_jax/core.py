"""The one definition of the architectures, shared by the Linen and the NNX modules.

Plain data and pure functions that know neither API: plans (:func:`block_plan`,
:func:`resnet_plan`, :func:`resnetbase_plan`, the stems), PyTorch-path names and their Linen and
NNX spellings, the ``PRESETS`` table, and the arithmetic both APIs call (:func:`batch_norm`,
pools, the SE gate, padding, initialisers). docs/design.md explains the split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax.linen import pooling  # pure functions, shared by both APIs

from resnet_jax import sharding

Array = jax.Array
Layer = Callable[[Array], Array]


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric ``kernel_size // 2`` padding, PyTorch's choice for every ResNet conv and pool."""
    p = kernel_size // 2
    return ((p, p), (p, p))


# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu'):
# an untruncated normal with variance 2 / fan_out.
kaiming_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Callable:
    """torch.nn.Linear's default bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv_args() -> dict[str, Any]:
    """Arguments of every conv of both APIs' ``Conv``: torchvision's initialisation, no bias, and
    a kernel that follows the input onto an explicit-axis mesh."""
    return dict(
        use_bias=False,
        kernel_init=kaiming_normal_fan_out,
        conv_general_dilated=sharding.conv_general_dilated,
    )


def linear_args(fan_in: int) -> dict[str, Any]:
    """Arguments of the classifier of both APIs: ``torch.nn.Linear``'s initialisation, and a
    kernel that follows the input onto an explicit-axis mesh."""
    return dict(
        kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in),
        dot_general=sharding.dot_general,
    )


def se_conv_args(fan_in: int) -> dict[str, Any]:
    """Conv arguments of a squeeze-and-excitation ``fc``: a bias, initialised as PyTorch's."""
    return dict(use_bias=True, bias_init=torch_linear_bias_init(fan_in))


def check_images(x: Array, img_channels: int, model: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# Names: PyTorch module paths, and their Linen spelling


def linen_name(path: str) -> str:
    """The Linen name of a PyTorch module path within its parent: ``layer1.0`` -> ``layer1_0``."""
    return path.replace(".", "_")


def split_index(path: str) -> tuple[str, Optional[int]]:
    """``downsample.1`` -> ``('downsample', 1)``; a name without an index -> ``(name, None)``."""
    group, _, index = path.partition(".")
    return (group, int(index)) if index else (path, None)


def linen_path(torch_parts: Sequence[str]) -> tuple[str, ...]:
    """A PyTorch module path (``['layer1', '0', 'conv1']``) as Linen names (``layer1_0/conv1``)."""
    out: list[str] = []
    for part in torch_parts:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def torch_path(linen_names: Sequence[str]) -> str:
    """Linen names (``('layer1_0', 'downsample_1')``) as a PyTorch path (``layer1.0.downsample.1``)."""
    parts = []
    for name in linen_names:
        head, _, tail = name.rpartition("_")
        parts.append(f"{head}.{tail}" if head and tail.isdigit() else name)
    return ".".join(parts)


# ---------------------------------------------------------------------------------------------
# Plans


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A convolution and the BatchNorm after it, named by their PyTorch module paths.

    ``closes_branch`` marks the last conv of a residual branch: no activation follows it before
    the addition, and ``zero_init_residual`` zeroes its BatchNorm scale.
    """

    conv: str
    norm: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    closes_branch: bool = False
    # ResNet-D shortcut: a ``pool`` x ``pool`` average pool (ceil mode) before a stride-1 conv.
    pool: int = 1
    # Zero-pad the input channels to a multiple of this inside the conv (0: off); see
    # :func:`channel_padded_conv`.
    pad_channels_to: int = 0

    @property
    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return torch_padding(self.kernel_size)

    def norm_overrides(self, zero_init_residual: bool) -> dict[str, Callable]:
        """BatchNorm arguments beyond the defaults: the scale of a branch's last BatchNorm starts
        at 0 under ``zero_init_residual`` (each block then starts as the identity, Goyal et al.)."""
        if not self.closes_branch:
            return {}
        init = jax.nn.initializers.zeros if zero_init_residual else jax.nn.initializers.ones
        return {"scale_init": init}


def residual_branch(
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    bottleneck_channels: Optional[int] = None,
    groups: int = 1,
) -> tuple[ConvSpec, ...]:
    """The residual function ``F(x)``: two 3x3 convs (basic), or 1x1-3x3-1x1 (bottleneck).

    Running the 3x3 of a bottleneck on ``bottleneck_channels`` instead of ``out_channels`` is what
    makes 50+ layer networks affordable. The stride is on the first 3x3 (ResNet v1.5, as
    torchvision); ``groups > 1`` on the bottleneck's 3x3 gives ResNeXt.
    """
    if bottleneck_channels is None:
        if groups != 1:
            raise ValueError("basic residual blocks support only groups=1 (as torchvision).")
        return (
            ConvSpec("conv1", "bn1", in_channels, out_channels, 3, stride),
            ConvSpec("conv2", "bn2", out_channels, out_channels, 3, closes_branch=True),
        )
    width = bottleneck_channels
    return (
        ConvSpec("conv1", "bn1", in_channels, width, 1),
        ConvSpec("conv2", "bn2", width, width, 3, stride, groups),
        ConvSpec("conv3", "bn3", width, out_channels, 1, closes_branch=True),
    )


def projection_spec(
    in_channels: int, out_channels: int, stride: int, conv_name: str = "conv", norm_name: str = "bn"
) -> ConvSpec:
    """The shortcut's projection ``W_s x``: a 1x1 conv with the block's stride, and BatchNorm.

    He et al. found projections better than zero-padding when the shape changes, and identity
    better than projections when it does not, so a block only has one when it must.
    """
    return ConvSpec(conv_name, norm_name, in_channels, out_channels, 1, stride)


# Attention after a branch's last BatchNorm, as timm's ``attn_layer``: none, or squeeze-and-excitation.
ATTN_LAYERS = ("", "se")
# The PyTorch module of a block's projection shortcut: labml's ``ShortcutProjection`` (``shortcut``:
# ``shortcut.conv``, ``shortcut.bn``) or torchvision's ``nn.Sequential`` (``downsample.0``/``.1``;
# timm's ``downsample.1``/``.2`` after the pool with ``avg_down``).
PROJECTIONS = ("shortcut", "downsample")


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """A residual block's layers: the branch ``F``, the shortcut's projection (``None``: the
    identity; ``shortcut_module``: the submodule that holds it), and the width of its
    squeeze-and-excitation (0: none)."""

    branch: tuple[ConvSpec, ...]
    shortcut: Optional[ConvSpec] = None
    shortcut_module: Optional[str] = None
    se_channels: int = 0

    @property
    def out_channels(self) -> int:
        return self.branch[-1].out_channels


def block_plan(
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    bottleneck_channels: Optional[int] = None,
    groups: int = 1,
    projection: str = "shortcut",
    avg_down: bool = False,
    attn_layer: str = "",
) -> BlockPlan:
    """The plan of a basic (``bottleneck_channels=None``) or bottleneck block.

    ``avg_down`` (ResNet-D, "Bag of Tricks", He et al. 2019): a strided projection becomes a
    ``stride`` x ``stride`` average pool and a stride-1 1x1 conv, so it sees every input pixel
    instead of a quarter of them. ``attn_layer='se'``: timm's squeeze-and-excitation after the
    last BatchNorm (``se.fc1``, ``se.fc2``).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be 'shortcut' or 'downsample'; got {projection!r}.")
    if attn_layer not in ATTN_LAYERS:
        raise ValueError(
            f"attn_layer must be '' or 'se' (timm's squeeze-and-excitation); got {attn_layer!r}."
        )
    branch = residual_branch(in_channels, out_channels, stride, bottleneck_channels, groups)
    shortcut, module = None, None
    if stride != 1 or in_channels != out_channels:
        if projection == "shortcut":
            shortcut, module = projection_spec(in_channels, out_channels, stride), "shortcut"
        elif avg_down:  # downsample.0 is the (parameter-free) pool, an identity at stride 1
            shortcut = ConvSpec("downsample.1", "downsample.2", in_channels, out_channels, 1, pool=stride)
        else:
            shortcut = projection_spec(in_channels, out_channels, stride, "downsample.0", "downsample.1")
    se = se_channels(out_channels) if attn_layer == "se" else 0
    return BlockPlan(branch, shortcut, module, se)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block of a network: its PyTorch path and its :func:`block_plan` arguments."""

    name: str
    in_channels: int
    out_channels: int
    stride: int
    bottleneck_channels: Optional[int] = None  # None: basic block
    groups: int = 1
    attn_layer: str = ""


def se_channels(channels: int, rd_ratio: float = 1.0 / 16, divisor: int = 8) -> int:
    """Width of the squeeze-and-excitation bottleneck of ``channels``: timm's ``SEModule``
    default, ``make_divisible(channels * rd_ratio, divisor, round_limit=0)``, i.e. rounded to the
    nearest multiple of ``divisor`` (halves up), and at least ``divisor``."""
    return max(divisor, int(channels * rd_ratio + divisor / 2) // divisor * divisor)


@dataclasses.dataclass(frozen=True)
class StemSpec:
    """The stem: conv(s), each with BatchNorm (and ReLU if ``act``), then optionally a 3x3/2
    max-pool."""

    convs: tuple[ConvSpec, ...]
    act: bool
    max_pool: bool

    @property
    def out_channels(self) -> int:
        return self.convs[-1].out_channels


# Stages: name of the feature map, and its blocks.
Stages = tuple[tuple[str, tuple[BlockSpec, ...]], ...]


STEM_TYPES = ("", "deep", "deep_tiered")


def resnet_stem(
    img_channels: int,
    small_stem: bool,
    stem_type: str = "",
    stem_width: int = 64,
    pad_channels_to: Optional[int] = 0,
) -> StemSpec:
    """torchvision's 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool; or a 3x3/1 conv without
    max-pool for 32x32 inputs (``small_stem``).

    timm's ``stem_type='deep'`` replaces the 7x7 conv by three 3x3 convs of ``stem_width``,
    ``stem_width``, ``2 * stem_width`` channels with BatchNorm+ReLU between, named as timm's
    ``nn.Sequential``: ``conv1.0``, ``conv1.1`` (BatchNorm), ``conv1.3``, ``conv1.4``, ``conv1.6``,
    then ``bn1``. ``'deep_tiered'`` starts with ``3 * (stem_width // 4)`` channels. Three 3x3
    convs see the same 7x7 window at a lower cost.

    ``pad_channels_to`` zero-pads the first conv's input channels (see
    :func:`channel_padded_conv`); ``None`` means 8 on GPUs, where a 3-channel stem leaves cuDNN on
    slow kernels (the gain is in BENCHMARKS.md), and off elsewhere.
    """
    if stem_type not in STEM_TYPES:
        raise ValueError(f"stem_type must be '', 'deep' or 'deep_tiered'; got {stem_type!r}.")
    if stem_type and small_stem:
        raise ValueError("small_stem=True replaces the stem; it cannot be combined with stem_type.")
    if pad_channels_to is None:
        pad_channels_to = 8 if jax.default_backend() == "gpu" else 0
    pad = pad_channels_to if pad_channels_to > 1 and img_channels % pad_channels_to else 0
    if small_stem:
        first = ConvSpec("conv1", "bn1", img_channels, 64, 3, pad_channels_to=pad)
        return StemSpec((first,), act=True, max_pool=False)
    if not stem_type:
        first = ConvSpec("conv1", "bn1", img_channels, 64, 7, 2, pad_channels_to=pad)
        return StemSpec((first,), act=True, max_pool=True)
    first = stem_width if stem_type == "deep" else 3 * (stem_width // 4)
    convs = (
        ConvSpec("conv1.0", "conv1.1", img_channels, first, 3, 2, pad_channels_to=pad),
        ConvSpec("conv1.3", "conv1.4", first, stem_width, 3),
        ConvSpec("conv1.6", "bn1", stem_width, 2 * stem_width, 3),
    )
    return StemSpec(convs, act=True, max_pool=True)


def resnet_plan(
    stage_sizes: Sequence[int],
    block: str,
    groups: int,
    width_per_group: int,
    in_channels: int = 64,
    attn_layer: str = "",
) -> Stages:
    """torchvision's ResNet/ResNeXt/Wide ResNet stages: ``layerN`` of blocks ``layerN.j``;
    ``in_channels`` is the stem's output (64, or ``2 * stem_width`` for a deep stem);
    ``attn_layer='se'`` gives every block timm's squeeze-and-excitation (SE-ResNet, SE-ResNeXt)."""
    if attn_layer not in ATTN_LAYERS:
        raise ValueError(
            f"attn_layer must be '' or 'se' (timm's squeeze-and-excitation); got {attn_layer!r}."
        )
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"block must be 'basic' or 'bottleneck'; got {block!r}.")
    if block == "basic" and (groups != 1 or width_per_group != 64):
        raise ValueError("basic blocks support only groups=1 and width_per_group=64 (as torchvision).")
    stages, channels = [], in_channels
    for i, n in enumerate(stage_sizes):
        planes = 64 * 2**i
        blocks = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            if block == "basic":
                spec = BlockSpec(f"layer{i + 1}.{j}", channels, planes, stride, attn_layer=attn_layer)
            else:
                width = int(planes * (width_per_group / 64.0)) * groups
                spec = BlockSpec(f"layer{i + 1}.{j}", channels, planes * 4, stride, width, groups, attn_layer)
            blocks.append(spec)
            channels = spec.out_channels
        stages.append((f"layer{i + 1}", tuple(blocks)))
    return tuple(stages)


def resnetbase_stem(img_channels: int, out_channels: int, kernel_size: int) -> StemSpec:
    """labml.ai's annotated ResNet stem: a strided conv and BatchNorm, no activation, no pooling."""
    return StemSpec((ConvSpec("conv", "bn", img_channels, out_channels, kernel_size, 2),), False, False)


def resnetbase_plan(
    n_blocks: Sequence[int],
    n_channels: Sequence[int],
    bottlenecks: Optional[Sequence[int]] = None,
    strides: Optional[Sequence[int]] = None,
) -> Stages:
    """labml.ai's annotated ResNet stages ``stage1..``: blocks numbered across the network,
    ``blocks.0, ...``. ``strides`` are the first-block strides per stage (default ``(1, 2, 2, ...)``).
    """
    if len(n_blocks) != len(n_channels) or not n_blocks:
        raise ValueError(
            f"n_blocks and n_channels need one entry per stage; got {len(n_blocks)} and {len(n_channels)}."
        )
    if bottlenecks is not None and len(bottlenecks) != len(n_channels):
        raise ValueError(
            f"bottlenecks needs one width per stage ({len(n_channels)}); got {len(bottlenecks)}. "
            "Pass None for basic residual blocks."
        )
    if strides is None:
        strides = (1,) + (2,) * (len(n_channels) - 1)
    if len(strides) != len(n_channels):
        raise ValueError(
            f"strides needs one first-block stride per stage ({len(n_channels)}); got {strides}."
        )
    stages, channels, index = [], n_channels[0], 0
    for stage, (n, out) in enumerate(zip(n_blocks, n_channels)):
        blocks = []
        for j in range(n):
            width = None if bottlenecks is None else bottlenecks[stage]
            blocks.append(BlockSpec(f"blocks.{index}", channels, out, strides[stage] if j == 0 else 1, width))
            channels, index = out, index + 1
        stages.append((f"stage{stage + 1}", tuple(blocks)))
    return tuple(stages)


# ---------------------------------------------------------------------------------------------
# Presets of both APIs: name -> ResNet fields. Architectures as torchvision.models; resnet200 as in
# He et al. 2016 ("Identity Mappings in Deep Residual Networks"), which torchvision does not ship;
# the -D, -T and SE (squeeze-and-excitation) variants as timm.models.resnet, which names them the same.

_D = dict(stem_type="deep", stem_width=32, avg_down=True)
_T = dict(stem_type="deep_tiered", stem_width=32, avg_down=True)
_SE = dict(attn_layer="se")

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
    "seresnet50": dict(stage_sizes=(3, 4, 6, 3), **_SE),
    "seresnext50_32x4d": dict(stage_sizes=(3, 4, 6, 3), groups=32, width_per_group=4, **_SE),
    "seresnext101_32x8d": dict(stage_sizes=(3, 4, 23, 3), groups=32, width_per_group=8, **_SE),
    "seresnext26d_32x4d": dict(stage_sizes=(2, 2, 2, 2), groups=32, width_per_group=4, **_SE, **_D),
}
# The presets whose architecture torchvision ships (the others come from timm).
TORCHVISION_ARCHS = tuple(a for a, f in PRESETS.items() if "stem_type" not in f and "attn_layer" not in f)


def preset_source(arch: str) -> str:
    """``'torchvision'`` or ``'timm'``: where the preset ``arch`` comes from."""
    return "torchvision" if arch in TORCHVISION_ARCHS else "timm"


def preset_fields(arch: str, overrides: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    """The ResNet fields of the preset ``arch`` with ``overrides``, each checked: ``arch`` is a
    preset and every override one of the ``known`` fields."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(PRESETS)}.")
    unknown = set(overrides) - set(known)
    if unknown:
        raise TypeError(f"unknown ResNet field(s) {sorted(unknown)} for {arch}.")
    return {**PRESETS[arch], **overrides}


# ---------------------------------------------------------------------------------------------
# Pools, the squeeze-and-excitation gate, the channel-padded conv


def avg_pool_ceil(x: Array, stride: int) -> Array:
    """PyTorch's ``AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)``.

    On odd sizes ceil mode adds a last, partial window that averages only the pixels it covers.
    """
    if stride == 1:
        return x
    pads = [(0, -size % stride) for size in x.shape[1:3]]
    window = (stride, stride)
    return pooling.avg_pool(x, window, strides=window, padding=pads, count_include_pad=False)


def _max_pool_3x3_xla(x: Array) -> Array:
    return pooling.max_pool(x, (3, 3), strides=(2, 2), padding=torch_padding(3))


def max_pool_3x3(x: Array) -> Array:
    """PyTorch's ``MaxPool2d(3, 2, padding=1)``: explicit padding pads with -inf, as PyTorch does."""
    # Through a second name, which benchmarks.step_jax's max-pool experiment leaves in place
    # when it swaps this function for max_pool_3x3_elementwise.
    return _max_pool_3x3_xla(x)


@jax.custom_vjp
def max_pool_3x3_elementwise(x: Array) -> Array:
    """:func:`max_pool_3x3` with a backward pass made of elementwise ops and strided pads instead
    of XLA's ``select_and_scatter`` (an experiment for the GPU, ``benchmarks.train_step
    --compare-maxpool-elementwise``). The same values, and the same gradient: each window's
    gradient goes to its first maximum in row-major order, as in PyTorch and in XLA; where windows
    overlap, their (at most four) contributions to one pixel may add in another order."""
    return _max_pool_3x3_xla(x)


def _max_pool_3x3_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    y = _max_pool_3x3_xla(x)
    return y, (x, y)


def _max_pool_3x3_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array]:
    x, y = res
    n, h, w, c = x.shape
    oh, ow = y.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    span_h, span_w = 2 * (oh - 1) + 1, 2 * (ow - 1) + 1
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for di in range(3):
        for dj in range(3):
            # The window element at offset (di, dj) of every output position.
            xs = jax.lax.slice(xp, (0, di, dj, 0), (n, di + span_h, dj + span_w, c), (1, 2, 2, 1))
            hit = (xs == y) & ~taken  # the first maximum of each window takes the gradient
            taken = taken | hit
            back = jax.lax.pad(
                jnp.where(hit, g, zero),
                zero,
                ((0, 0, 0), (di, h + 2 - di - span_h, 1), (dj, w + 2 - dj - span_w, 1), (0, 0, 0)),
            )
            dxp = dxp + back
    return (dxp[:, 1 : 1 + h, 1 : 1 + w, :],)


max_pool_3x3_elementwise.defvjp(_max_pool_3x3_fwd, _max_pool_3x3_bwd)


def global_avg_pool(x: Array) -> Array:
    # Accumulate in at least float32: a bfloat16 sum over 49+ positions loses digits.
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))


def squeeze_excite(x: Array, fc1: Layer, fc2: Layer) -> Array:
    """``x * sigmoid(fc2(relu(fc1(mean(x)))))``: each channel rescaled by a gate computed from
    the whole image (Hu et al., "Squeeze-and-Excitation Networks"), which lets a block weigh its
    channels by global context that its 3x3 convolutions cannot see. ``fc1``/``fc2`` are 1x1
    convolutions with biases on the ``[batch, 1, 1, channels]`` mean, as timm's ``SEModule``."""
    s = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2), keepdims=True)
    s = fc2(jax.nn.relu(fc1(s.astype(x.dtype))))
    return x * jax.nn.sigmoid(s)


def conv_overrides(spec: ConvSpec) -> dict[str, Any]:
    """Conv-layer arguments beyond the factory's for ``spec``: the channel-padding convolution."""
    if spec.pad_channels_to > 1:
        return {"conv_general_dilated": channel_padded_conv(spec.pad_channels_to)}
    return {}


def channel_padded_conv(pad_to: int) -> Callable[..., Array]:
    """A ``conv_general_dilated`` for Flax's ``Conv`` (channels-last image, ``HWIO`` kernel)
    that zero-pads the input channels of image and kernel alike to a multiple of ``pad_to``.

    The result is exactly the unpadded convolution; the parameter keeps its true shape and name,
    and the padded slice gets no gradient. It exists for GPU stems: a 3-channel input leaves cuDNN
    on slow kernels. The kernel follows the image onto an explicit mesh as every conv here does.
    """

    def conv(lhs: Array, rhs: Array, *args: Any, **kwargs: Any) -> Array:
        extra = (-lhs.shape[-1]) % pad_to
        if extra:
            lhs = jnp.pad(lhs, [(0, 0)] * (lhs.ndim - 1) + [(0, extra)])
            rhs = jnp.pad(rhs, [(0, 0)] * (rhs.ndim - 2) + [(0, extra), (0, 0)])
        return sharding.conv_general_dilated(lhs, rhs, *args, **kwargs)

    return conv


# ---------------------------------------------------------------------------------------------
# BatchNorm

BN_VARIANCES = ("shifted", "two_pass")
# The options of batch_norm that the Linen and the NNX BatchNorm modules hold as fields.
BN_FIELDS = (
    "momentum",
    "epsilon",
    "variance",
    "axis_name",
    "unbiased_running_var",
    "dtype",
    "recompute",
    "fused",
)


def bn_fields(module: Any) -> dict[str, Any]:
    """The :func:`batch_norm` options (``BN_FIELDS``) that a BatchNorm module, Linen or NNX, holds."""
    return {name: getattr(module, name) for name in BN_FIELDS}


def fold_act(
    fused: bool, residual: Optional[Array], act: Optional[Callable[[Array], Array]]
) -> tuple[dict[str, Any], Callable[[Array], Array]]:
    """How a BatchNorm module ends a block with ``act(bn(x) + residual)``: the arguments that
    :func:`batch_norm` folds in, and what the module applies to its result. Unfused, the add and
    ``act`` follow the call as separate ops; fused, the call does both (``act`` must be ReLU)."""
    if not fused:

        def after(y: Array) -> Array:
            y = y + residual if residual is not None else y
            return act(y) if act is not None else y

        return {}, after
    if act is not None and act is not jax.nn.relu:
        raise ValueError(
            f"BatchNorm(fused=True) folds in only a ReLU (jax.nn.relu), got act={act!r}; "
            "use fused=False with other activations."
        )
    return {"residual": residual, "relu": act is not None}, lambda y: y


def batch_norm(
    x: Array,
    scale: Array,
    bias: Array,
    running_mean: Array,
    running_var: Array,
    *,
    train: bool,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    variance: str = "two_pass",
    axis_name: Optional[str] = None,
    unbiased_running_var: bool = True,
    dtype: Any = None,
    update_stats: bool = True,
    recompute: bool = False,
    residual: Optional[Array] = None,
    relu: bool = False,
    fused: bool = False,
) -> tuple[Array, Array, Array]:
    """PyTorch's BatchNorm2d over all axes but the last: ``(y, new_running_mean, new_running_var)``.

    Normalisation uses the biased batch variance (as both frameworks do); the running variance is
    updated with the *unbiased* one (``n / (n - 1)``), as PyTorch does. ``momentum`` follows
    Flax's convention (``new = momentum * old + (1 - momentum) * batch``), so 0.9 equals PyTorch's
    0.1. Statistics are computed in at least float32 whatever the dtype of ``x``. In eval mode,
    or with ``update_stats=False``, the running statistics come back unchanged.

    ``variance``: ``'two_pass'`` (default), ``mean((x - mean)^2)``, is robust whatever the mean.
    ``'shifted'`` is one pass over ``x``, ``E[(x - s)^2] - E[x - s]^2`` with the shift ``s`` the
    running mean (a constant to autodiff): unlike Flax's ``E[x^2] - E[x]^2``, float32
    cancellation stays small once the running mean tracks the batch mean, and it saves a read of
    every activation (the speed-up on a GPU is in BENCHMARKS.md).
    Its weak spot is the first steps from scratch, while the running mean (0 at init) is not yet
    a useful shift: cancellation then amplifies float32 rounding, so runs that should agree
    (e.g. on different process counts) drift apart more than with two-pass. Both are PyTorch's
    value at float64. ``axis_name`` averages the moments across a ``pmap`` axis (synchronised
    BatchNorm); under ``jax.jit`` over a sharded batch they are global anyway.

    ``recompute=True`` checkpoints the normalisation (``jax.checkpoint``): the backward pass keeps
    ``x`` in its own dtype and recomputes the float32 product, rather than storing float32
    copies. Values are unchanged (slower on a GPU in BENCHMARKS.md, so off by default).

    ``residual`` and ``relu`` fold a residual block's ending into the same call:
    ``y = relu(bn(x) + residual)``, computed as the separate ops would be (``bn(x)`` rounded to
    the output dtype, then the add and the ReLU). ``fused=True`` (an experiment for the GPU,
    ``benchmarks.train_step --compare-bn-fused``) makes the train-mode statistics, normalisation,
    add and ReLU one ``jax.custom_vjp`` whose backward is BatchNorm's closed form
    (:func:`_bn_train_fused`): it keeps only ``x``, the output ``y`` (whose sign is the ReLU's
    mask) and per-channel vectors, and makes ``dx`` in one elementwise pass after two per-channel
    sums. The same values as unfused, and the same gradients up to rounding.

    Args:
        x: Activations, channels last.
        scale: Per-channel scale (PyTorch's ``weight``).
        bias: Per-channel bias.
        running_mean: Running mean; its dtype is the statistics' dtype.
        running_var: Running (unbiased) variance.
        train: Normalise with the batch's statistics (True) or the running ones (False).
        momentum: Weight of the old running statistics (Flax's convention).
        epsilon: Added to the variance before the square root.
        variance: ``'two_pass'`` or ``'shifted'``, as above.
        axis_name: A ``pmap`` axis to average the batch moments over; None: this device's batch
            (global under ``jax.jit`` with a sharded batch).
        unbiased_running_var: Update the running variance with the unbiased batch variance, as
            PyTorch does; False uses the biased one, as Flax does.
        dtype: The output's dtype; None keeps ``x``'s.
        update_stats: In train mode, return updated running statistics; False returns them
            unchanged (e.g. a train-mode forward pass that must not move them).
        recompute: Recompute the normalisation in the backward pass, as above.
        residual: Added to the normalised ``x`` (in the output dtype) before ``relu``.
        relu: End with a ReLU.
        fused: In train mode, one custom-VJP pass as above (not with ``recompute``).

    Returns:
        ``(y, new_running_mean, new_running_var)``.
    """
    if variance not in BN_VARIANCES:
        raise ValueError(f"variance must be 'two_pass' or 'shifted'; got {variance!r}.")
    if fused and recompute:
        raise ValueError("batch_norm: fused=True and recompute=True exclude each other; choose one.")
    stat_dtype = running_mean.dtype
    compute_dtype = jnp.promote_types(jnp.promote_types(x.dtype, stat_dtype), jnp.float32)
    new_mean, new_var = running_mean, running_var
    out_dtype = dtype if dtype is not None else x.dtype
    fused_y = None
    if not train:
        mean, var = running_mean.astype(compute_dtype), running_var.astype(compute_dtype)
    else:
        if fused:
            fused_y, mean, var = _bn_train_fused(
                x, scale, bias, residual, running_mean, epsilon, relu, variance, axis_name, out_dtype
            )
            n = _values_per_channel(x, axis_name)
        else:
            mean, var, n = _batch_moments(x.astype(compute_dtype), running_mean, variance, axis_name)
        if update_stats:
            if isinstance(n, int) and n < 2:
                raise ValueError(
                    f"BatchNorm in train mode needs more than 1 value per channel, got input "
                    f"shape {x.shape}; use a larger batch or eval mode."
                )
            unbiased = var * (n / (n - 1)) if unbiased_running_var else var
            batch_mean, batch_var = jax.lax.stop_gradient((mean, unbiased))
            new_mean = momentum * running_mean + (1 - momentum) * batch_mean.astype(stat_dtype)
            new_var = momentum * running_var + (1 - momentum) * batch_var.astype(stat_dtype)
    if fused_y is not None:
        return fused_y, new_mean, new_var
    if recompute:
        y = jax.checkpoint(_normalize, static_argnums=(5, 6))(x, mean, var, scale, bias, epsilon, out_dtype)
    else:
        y = _normalize(x, mean, var, scale, bias, epsilon, out_dtype)
    return _add_relu(y, residual, relu), new_mean, new_var


def _normalize(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float, out_dtype: Any):
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` in ``mean``'s dtype, then ``out_dtype``."""
    mul = jax.lax.rsqrt(var + epsilon) * scale.astype(mean.dtype)
    y = x.astype(mean.dtype) * mul + (bias.astype(mean.dtype) - mean * mul)
    return y.astype(out_dtype)


def _add_relu(y: Array, residual: Optional[Array], relu: bool) -> Array:
    if residual is not None:
        y = y + residual
    return jax.nn.relu(y) if relu else y


def _values_per_channel(x: Array, axis_name: Optional[str]):
    n = math.prod(x.shape[:-1])
    return n * jax.lax.psum(1, axis_name) if axis_name is not None else n


def _batch_moments(xf: Array, running_mean: Array, variance: str, axis_name: Optional[str]):
    """``(mean, biased variance, values per channel)`` of ``xf`` over all axes but the last,
    averaged across ``axis_name`` when given; ``'shifted'`` shifts by ``running_mean``."""
    axes = tuple(range(xf.ndim - 1))
    pmean = (lambda t: jax.lax.pmean(t, axis_name)) if axis_name is not None else (lambda t: t)
    if variance == "two_pass":
        mean = pmean(jnp.mean(xf, axis=axes))
        var = pmean(jnp.mean(jnp.square(xf - mean), axis=axes))
    else:
        shift = jax.lax.stop_gradient(running_mean).astype(xf.dtype)
        centred = xf - shift
        m1, m2 = pmean((jnp.mean(centred, axis=axes), jnp.mean(jnp.square(centred), axis=axes)))
        mean = m1 + shift
        var = jnp.maximum(m2 - jnp.square(m1), 0.0)
    return mean, var, _values_per_channel(xf, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _bn_train_fused(x, scale, bias, residual, shift, epsilon, relu, variance, axis_name, out_dtype):
    """Train-mode ``(relu(bn(x) + residual), batch mean, biased batch variance)`` with
    BatchNorm's closed-form backward (``batch_norm(..., fused=True)``). ``shift`` is the running
    mean, the ``'shifted'`` variance's constant; it gets no gradient."""
    return _bn_fused_fwd(x, scale, bias, residual, shift, epsilon, relu, variance, axis_name, out_dtype)[0]


def _bn_fused_fwd(x, scale, bias, residual, shift, epsilon, relu, variance, axis_name, out_dtype):
    compute_dtype = jnp.promote_types(jnp.promote_types(x.dtype, shift.dtype), jnp.float32)
    mean, var, _ = _batch_moments(x.astype(compute_dtype), shift, variance, axis_name)
    y = _add_relu(_normalize(x, mean, var, scale, bias, epsilon, out_dtype), residual, relu)
    # The backward needs x, the output's sign (ReLU's mask; y is kept anyway, as the next
    # convolution's input) and per-channel vectors, nothing of the size of x in float32.
    # An empty array stands for the residual: whether there is one, and its dtype.
    marker = None if residual is None else jnp.zeros((0,), residual.dtype)
    saved = (x, y if relu else None, mean, jax.lax.rsqrt(var + epsilon), scale, marker, shift)
    return (y, mean, var), saved


def _bn_fused_bwd(epsilon, relu, variance, axis_name, out_dtype, saved, cotangents):
    x, y, mean, rstd, scale, marker, shift = saved
    g, g_mean, g_var = cotangents
    if relu:
        g = jnp.where(y > 0, g, jnp.zeros((), g.dtype))
    axes = tuple(range(x.ndim - 1))
    psum = (lambda t: jax.lax.psum(t, axis_name)) if axis_name is not None else (lambda t: t)
    n = _values_per_channel(x, axis_name)
    cd = mean.dtype
    gf, centred = g.astype(cd), x.astype(cd) - mean
    # Per-channel sums: this device's are the gradients of its bias and scale; their sums over
    # all devices of a pmap axis, with the batch statistics' own cotangents (zero when they only
    # update running statistics), carry the gradient through the batch mean and variance.
    d_bias, d_centred = jnp.sum(gf, axis=axes), jnp.sum(gf * centred, axis=axes)
    t_bias, t_centred, t_mean, t_var = psum((d_bias, d_centred, g_mean.astype(cd), g_var.astype(cd)))
    # dx = a * g + b * (x - mean) + c.
    sf = scale.astype(cd)
    a = sf * rstd
    b = (2 * t_var - sf * rstd**3 * t_centred) / n
    c = (t_mean - a * t_bias) / n
    dx = (a * gf + b * centred + c).astype(x.dtype)
    d_residual = None if marker is None else g.astype(marker.dtype)
    d_scale = (d_centred * rstd).astype(scale.dtype)
    return dx, d_scale, d_bias.astype(scale.dtype), d_residual, jnp.zeros_like(shift)


_bn_train_fused.defvjp(_bn_fused_fwd, _bn_fused_bwd)
