"""Gradient accumulation (``grad_accum_steps``, timm's ``--grad-accum-steps``): one optimizer
update from k micro-batches, as a PyTorch loop does with k forward/backward passes (each loss
divided by k) before one ``optimizer.step()``.

The micro-batches are taken in turn by ``jax.lax.scan``, so only one micro-batch's activations
are alive at a time. On a CPU the scan is unrolled (``unroll=True``): XLA:CPU runs convolutions
inside a loop body on a much slower path than the same convolutions outside one
(jax-ml/jax#12868), and memory is rarely what a CPU run lacks. Unrolling changes neither the
order of the micro-batches nor that of the gradients' sums. Each micro-batch's forward
normalises with its own BatchNorm statistics and updates the running statistics, k times per
step, as k PyTorch forwards in train mode do.

Micro-batch ``j`` holds the rows ``i`` with ``i % k == j``. Every device's contiguous shard of the
batch (under jit over a mesh, or its own batch under pmap) then holds an equal share of each
micro-batch, so splitting moves no data between devices, and both drivers form the same
micro-batches from the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def split(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """``[B, ...]`` arrays -> ``[k, B / k, ...]``, micro-batch ``j`` the rows ``j, j + k, ...``."""

    def one(x):
        if x.shape[0] % k:
            raise ValueError(
                f"grad_accum_steps={k} does not divide the batch of {x.shape[0]} rows (per device)."
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return {name: one(x) for name, x in batch.items()}


def merge(x: jax.Array) -> jax.Array:
    """The inverse of :func:`split` for one array: ``[k, B / k, ...]`` -> ``[B, ...]``."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def accumulated_value_and_grad(
    grad_fn: Callable[..., tuple[tuple[jax.Array, tuple[jax.Array, PyTree]], PyTree]],
    k: int,
    params: PyTree,
    batch_stats: PyTree,
    batch: Mapping[str, jax.Array],
    rngs: dict,
    *,
    unroll: bool = False,
) -> tuple[tuple[jax.Array, tuple[jax.Array, PyTree]], PyTree]:
    """``grad_fn`` (``jax.value_and_grad`` of the step's ``loss_fn(params, batch_stats, batch,
    rngs)`` with ``(logits, batch_stats)`` as aux) over k micro-batches, in the same form: the
    mean loss, all rows' logits in batch order, the running statistics after k updates, and the
    mean gradient. Dropout keys are folded with the micro-batch index. ``unroll``: the loop
    unrolled in the compiled program (for XLA:CPU), the same computation."""
    micro = split(batch, k)

    def body(carry, xs):
        stats, grad_sum = carry
        j, mb = xs
        mb_rngs = rngs
        if rngs:
            mb_rngs = {"rngs": {name: jax.random.fold_in(key, j) for name, key in rngs["rngs"].items()}}
        (loss, (logits, stats)), grads = grad_fn(params, stats, mb, mb_rngs)
        return (stats, jax.tree.map(jnp.add, grad_sum, grads)), (loss, logits)

    init = (batch_stats, jax.tree.map(jnp.zeros_like, params))
    (stats, grad_sum), (losses, logits) = jax.lax.scan(body, init, (jnp.arange(k), micro), unroll=unroll)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return (jnp.mean(losses), (merge(logits), stats)), grads
