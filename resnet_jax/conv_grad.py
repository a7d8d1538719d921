"""Convolutions on XLA:CPU: 1x1 convolutions as matrix products, and the weight gradient as
matrix products where XLA:CPU's own is slow (issue 47).

jax 0.10's XLA:CPU gives convolutions and dots to YNNPACK, which runs ResNet's layers' weight
gradients several times, and their forward passes about twice, as slow as XLA's own Eigen
kernels (BENCHMARKS.md, section 5). So ``import resnet_jax`` asks XLA:CPU to leave YNNPACK out
when it can (:func:`resnet_jax.platform.xla_cpu_without_ynnpack_on_import`: only before JAX
starts a backend, and never over the user's own choice). Where YNNPACK still runs convolutions,
that is, when JAX had started first or the user chose so (:func:`ynn_convolutions` asks the
compiler), the weight gradient is the same sum written as one matrix product per kernel tap: for
tap ``(i, j)``, the input window that tap sees (a strided slice of the padded input,
``[batch*h*w, in]``) times the output gradient (``[batch*h*w, out]``), contracted over their
rows; XLA:CPU runs those on its matmul kernels, much faster than YNNPACK's weight gradient.

A 1x1 convolution without padding is a matmul outright (the strided pixels times the kernel),
and XLA:CPU's matmul runs it faster than either library's convolution does; JAX derives its
gradients as matmuls too. So on a CPU those layers are written as one, forward included,
with or without YNNPACK.

The per-tap weight gradient is a custom VJP, so JAX's forward-mode autodiff (``jax.jvp``,
``jax.jacfwd``, Hessian products) cannot go through it; without YNNPACK (the default after
``import resnet_jax``) nothing blocks it. A custom JVP whose kernel term reverse mode
transposes into the same matmuls was tried and kept about half the gain (BENCHMARKS.md, section
5). Any of this is only put in where JAX's default backend is the CPU, so programs traced for a
GPU or a TPU are XLA's own throughout.

:func:`conv` applies it where it is exact to rearrange: NHWC input, HWIO kernel, no dilation,
one feature group, explicit non-negative padding, JAX's default backend the CPU, and no
explicit-axis mesh (whose typed shardings the reshapes would have to carry; the caller,
``sharding.conv_general_dilated``, checks that). Elsewhere the forward pass and the gradients
are XLA's own. Only summation orders change, so float32 results move by rounding alone
(``tests/test_conv_grad.py`` holds them to PyTorch's in float64).

The choice between platforms is made where the program is lowered
(``jax.lax.platform_dependent``): a program compiled for a GPU or a TPU keeps XLA's own
convolutions, even when it is traced on a CPU host (``train.aot``).
``RESNET_JAX_CPU_CONV_GRAD=0`` (or ``off``) turns all of this off, the flag at import included;
``=taps`` forces the per-tap weight gradient. It is read when a function is traced, and JAX
reuses a function's trace, so set it before the first call (best: in the environment, before
Python starts).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

ENV_VAR = "RESNET_JAX_CPU_CONV_GRAD"
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _mode() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "taps" if value == "taps" else "auto"


def enabled() -> bool:
    """Whether this module rewrites CPU convolutions at all (``$RESNET_JAX_CPU_CONV_GRAD`` is not
    0/off/false)."""
    return _mode() != "off"


@functools.lru_cache(maxsize=None)
def ynn_convolutions() -> bool:
    """Whether XLA:CPU in this process runs convolutions through YNNPACK (``__ynn_fusion``).

    jax 0.10's XLA:CPU does by default, and there its weight gradient (and, less so, the forward
    pass) is several times slower than Eigen's (BENCHMARKS.md, section 5); ``import resnet_jax``
    turns YNNPACK off where it can (``resnet_jax.platform``). Decided once per process by
    compiling one small convolution, so it sees the flags XLA really started with (YNNPACK
    leaves convolutions of fewer than 32 channels to Eigen, so the probe has 64)."""
    x = jax.ShapeDtypeStruct((1, 8, 8, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    conv = jax.jit(lambda x, w: _xla(x, w, (1, 1), ((1, 1), (1, 1)), None))  # the CPU: see conv()
    return "__ynn_fusion" in conv.lower(x, w).compile().as_text()


def weight_grad_as_taps() -> bool:
    """Whether 3x3 (and 7x7) convolutions take the per-tap weight gradient: where XLA:CPU's own
    is slow, that is, where its convolutions are YNNPACK's (or ``$RESNET_JAX_CPU_CONV_GRAD=taps``)."""
    mode = _mode()
    return mode == "taps" or (mode == "auto" and ynn_convolutions())


def _plain_pairs(padding: Any) -> Optional[tuple[tuple[int, int], ...]]:
    if isinstance(padding, str) or len(padding) != 2:
        return None
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    return pairs if all(lo >= 0 and hi >= 0 for lo, hi in pairs) else None


def _ones(value: Optional[Sequence[int]]) -> bool:
    return value is None or all(int(v) == 1 for v in value)


def conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **other: Any,
) -> Optional[jax.Array]:
    """``lax.conv_general_dilated(...)`` with the CPU weight gradient, or None where it does not
    apply (the caller then calls XLA's convolution itself)."""
    pairs = None if isinstance(padding, str) else _plain_pairs(padding)
    numbers = (
        lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) if dimension_numbers else None
    )
    if not (
        enabled()
        and lhs.ndim == 4
        and numbers == _NHWC
        and pairs is not None
        and _ones(lhs_dilation)
        and _ones(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and all(value is None for value in other.values())  # e.g. NNX's out_sharding
        and jax.default_backend() == "cpu"
    ):
        return None
    strides = tuple(int(s) for s in window_strides)
    if rhs.shape[:2] == (1, 1) and pairs == ((0, 0), (0, 0)):
        return _pointwise(lhs, rhs, strides, precision)
    return _conv(lhs, rhs, strides, pairs, precision) if weight_grad_as_taps() else None


def _pointwise(x: jax.Array, w: jax.Array, strides: tuple[int, ...], precision: Any) -> jax.Array:
    """A 1x1 convolution: on XLA:CPU the matmul of the (strided) pixels by the kernel, whose
    gradients JAX derives as matmuls too; elsewhere XLA's convolution."""

    def matmul(x, w):
        # As rows times the kernel: a 4-D dot_general led XLA:CPU to write the output gradients
        # transposed for the weight gradient's dot (BENCHMARKS.md, section 5).
        pixels = x[:, :: strides[0], :: strides[1], :]
        rows = pixels.reshape(-1, pixels.shape[-1])
        out = lax.dot_general(rows, w[0, 0], (((1,), (0,)), ((), ())), precision=precision)
        return out.reshape(*pixels.shape[:3], w.shape[-1])

    def xla(x, w):
        return _xla(x, w, strides, ((0, 0), (0, 0)), precision)

    return lax.platform_dependent(x, w, cpu=matmul, default=xla)


def _xla(x: jax.Array, w: jax.Array, strides: tuple[int, ...], padding: tuple, precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
    return _xla(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
    return _xla(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
    x, w = residuals
    (dx,) = jax.vjp(lambda x_: _xla(x_, w, strides, padding, precision), x)[1](dy)

    def xla_weight_grad(x, dy):
        return jax.vjp(lambda w_: _xla(x, w_, strides, padding, precision), w)[1](dy)[0]

    def cpu_weight_grad(x, dy):
        return weight_grad_taps(x, dy, w.shape[:2], strides, padding, precision).astype(w.dtype)

    # Chosen where the program is lowered: XLA:CPU gets the matmuls, other platforms XLA's own.
    return dx, lax.platform_dependent(x, dy, cpu=cpu_weight_grad, default=xla_weight_grad)


_conv.defvjp(_conv_fwd, _conv_bwd)


def weight_grad_taps(
    x: jax.Array,
    dy: jax.Array,
    kernel_hw: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """``dW[i, j] = window(i, j)^T @ dy`` for each kernel tap: the weight gradient (``HWIO``,
    float32 or wider) of an NHWC convolution without dilation or groups."""
    out_c = dy.shape[-1]
    rows = dy.reshape(-1, out_c)
    accumulate = jnp.promote_types(dy.dtype, jnp.float32)
    taps = [
        lax.dot_general(
            window.reshape(-1, window.shape[-1]),
            rows,
            (((0,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=accumulate,
        )
        for _, window in tap_windows(x, kernel_hw, strides, padding, dy.shape[1:3])
    ]
    return jnp.stack(taps).reshape(*kernel_hw, x.shape[-1], out_c)


def tap_windows(x, kernel_hw, strides, padding, out_hw):
    """``((i, j), window)`` per tap: the ``[batch, out_h, out_w, in]`` strided slice of the padded
    input that tap ``(i, j)`` sees."""
    (kh, kw), (sh, sw), (out_h, out_w) = kernel_hw, strides, out_hw
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    batch, in_c = x.shape[0], x.shape[-1]
    return [
        (
            (i, j),
            lax.slice(
                xp,
                (0, i, j, 0),
                (batch, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, in_c),
                (1, sh, sw, 1),
            ),
        )
        for i in range(kh)
        for j in range(kw)
    ]
