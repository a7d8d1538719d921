"""PyTorch's BatchNorm2d as one pure function, :func:`batch_norm`, that the Linen and the NNX
``BatchNorm`` modules both call: the running variance updated with the unbiased batch variance,
statistics in at least float32, optional synchronisation over a ``pmap`` axis, and an optional
fused ending (``relu(bn(x) + residual)``) with BatchNorm's closed-form backward.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


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
