"""The arithmetic and initialisation that the Linen and the NNX modules share: PyTorch's padding,
initialisers and pools, the squeeze-and-excitation gate, weight standardisation, and the input
checks. Pure functions of arrays; neither API's modules are imported here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax.linen import pooling  # pure functions, shared by both APIs

from resnet_jax import conv_grad, sharding

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
    """PyTorch's ``MaxPool2d(3, 2, padding=1)``: explicit padding pads with -inf, as PyTorch does.

    Where JAX's default backend is the CPU, its derivatives are :func:`max_pool_3x3_first_max`'s
    (elementwise ops; XLA:CPU's ``select_and_scatter`` is much slower, BENCHMARKS.md section 5),
    chosen where the program is lowered, so GPU and TPU programs keep XLA's own.
    ``RESNET_JAX_CPU_CONV_GRAD=0`` (``resnet_jax.conv_grad``) turns that off with the rest."""
    # Through a second name, which benchmarks.step_jax's max-pool experiment leaves in place
    # when it swaps this function for max_pool_3x3_elementwise.
    if conv_grad.enabled() and jax.default_backend() == "cpu":
        return jax.lax.platform_dependent(x, cpu=max_pool_3x3_first_max, default=_max_pool_3x3_xla)
    return _max_pool_3x3_xla(x)


def _first_max_taps(x: Array, y: Array) -> list[tuple[tuple[int, int], Array, Callable[[Array], Array]]]:
    """Per window offset ``(di, dj)``: where that element is its window's first maximum
    (row-major, as PyTorch and XLA choose), and the strided slice that takes that element of a
    (padded) array."""
    n, h, w, c = x.shape
    oh, ow = y.shape[1:3]
    span_h, span_w = 2 * (oh - 1) + 1, 2 * (ow - 1) + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    taps = []
    for di in range(3):
        for dj in range(3):

            def take(a: Array, di: int = di, dj: int = dj) -> Array:
                return jax.lax.slice(a, (0, di, dj, 0), (n, di + span_h, dj + span_w, c), (1, 2, 2, 1))

            hit = (take(xp) == y) & ~taken
            taken = taken | hit
            taps.append(((di, dj), hit, take))
    return taps


@jax.custom_jvp
def max_pool_3x3_first_max(x: Array) -> Array:
    """:func:`max_pool_3x3` whose derivative is written with elementwise ops: the tangent of each
    window's output is the tangent of its first maximum (a select per window offset of strided
    slices). Reverse mode transposes it into strided pads and adds, the same gradient as XLA's
    ``select_and_scatter`` and PyTorch's (where windows overlap, up to four contributions to one
    pixel may add in another order); forward mode works too."""
    return _max_pool_3x3_xla(x)


@max_pool_3x3_first_max.defjvp
def _max_pool_3x3_first_max_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    y = _max_pool_3x3_xla(x)
    tp = jnp.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)))
    zero = jnp.zeros((), t.dtype)
    dy = sum(jnp.where(hit, take(tp), zero) for _, hit, take in _first_max_taps(x, y))
    return y, dy


def max_pool_3x3_valid(x: Array) -> Array:
    """``MaxPool2d(3, 2, padding=0)``: BiT's stem pool, after its own zero padding."""
    return pooling.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


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
    h, w = x.shape[1:3]
    span_h, span_w = 2 * (y.shape[1] - 1) + 1, 2 * (y.shape[2] - 1) + 1
    zero = jnp.zeros((), g.dtype)
    dxp = jnp.zeros((x.shape[0], h + 2, w + 2, x.shape[3]), g.dtype)
    for (di, dj), hit, _ in _first_max_taps(x, y):
        # Each window's first maximum takes the gradient, put back where offset (di, dj) took it.
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


def conv_overrides(spec: Any) -> dict[str, Any]:
    """Conv-layer arguments beyond the factory's for a ``layers.Conv``: the channel-padding and
    weight-standardising convolutions, and a bias initialised as PyTorch's."""
    out: dict[str, Any] = {}
    conv = sharding.conv_general_dilated
    if spec.pad_channels_to > 1:
        conv = channel_padded_conv(spec.pad_channels_to, conv)
    if spec.standardize:
        conv = weight_standardized_conv(spec.standardize, conv)
    if conv is not sharding.conv_general_dilated:
        out["conv_general_dilated"] = conv
    if spec.bias:
        fan_in = spec.in_channels * spec.kernel_size**2 // spec.groups
        out.update(use_bias=True, bias_init=torch_linear_bias_init(fan_in))
    return out


def end_block(y: Array, residual: Optional[Array] = None, act: Optional[Layer] = None) -> Array:
    """``act(y + residual)``, each part optional: how a norm layer ends a block."""
    y = y + residual if residual is not None else y
    return act(y) if act is not None else y


def channel_padded_conv(
    pad_to: int, inner: Callable[..., Array] = sharding.conv_general_dilated
) -> Callable[..., Array]:
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
        return inner(lhs, rhs, *args, **kwargs)

    return conv


def weight_standardized_conv(
    epsilon: float, inner: Callable[..., Array] = sharding.conv_general_dilated
) -> Callable[..., Array]:
    """A ``conv_general_dilated`` that standardises the ``HWIO`` kernel per output channel first:
    ``(w - mean) / sqrt(var + epsilon)`` over its height, width and inputs (biased variance), as
    timm's ``StdConv2d`` (Qiao et al., "Weight Standardization"). BiT uses it with GroupNorm, so
    that no layer depends on the batch, which lets it train and transfer at any batch size."""

    def conv(lhs: Array, rhs: Array, *args: Any, **kwargs: Any) -> Array:
        wf = rhs.astype(jnp.promote_types(rhs.dtype, jnp.float32))
        mean = jnp.mean(wf, axis=(0, 1, 2), keepdims=True)
        var = jnp.mean(jnp.square(wf - mean), axis=(0, 1, 2), keepdims=True)
        w = ((wf - mean) * jax.lax.rsqrt(var + epsilon)).astype(rhs.dtype)
        return inner(lhs, w, *args, **kwargs)

    return conv
