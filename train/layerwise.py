"""Layer-wise adaptive optimizers as the recipes' own implementations compute them: LAMB as
timm's ``timm.optim.Lamb``, LARS as the MLPerf ResNet-50 reference's ``LARSOptimizer``.

optax ships ``optax.lamb``, but a timm recipe run with it is a different optimizer. Where
``optax.lamb`` differs from ``timm.optim.Lamb`` (which this module follows):

* timm divides all gradients by ``max(global_norm / max_grad_norm, 1)`` inside the optimizer, with
  ``max_grad_norm=1.0`` by default (timm's train script never changes it); optax does not clip.
* timm scales by the trust ratio only the parameters it decays (weight decay != 0 in their
  group), unless ``always_adapt``: BatchNorm parameters and biases, in timm's no-decay group, get a
  plain Adam step. optax scales every parameter, and with ``weight_decay=0`` timm scales none.
* timm's ``lambc`` (``trust_clip``) caps the trust ratio at 1; optax has no such option.

Both add the weight decay to the Adam direction before the trust ratio (so the ratio is
``||w|| / ||adam + wd * w||``), both use bias-corrected moments and both take the ratio as 1
when either norm is 0; timm's ``eps`` is added to ``sqrt(v) / sqrt(1 - b2^t)``, as optax's is to
``sqrt(v_hat)`` (the same number up to rounding).

LARS, in mlcommons/training ``image_classification/tensorflow2/lars_optimizer.py``: for a
parameter not in its ``skip_list`` (``'batch_normalization', 'bias', 'bn'`` in its
``common.py``; here the parameters ``decay_mask`` excludes), the trust ratio is
``eta * ||w|| / (||g|| + wd * ||w|| + eps)`` (1 when ``||w||`` or ``||g||`` is 0), the gradient
becomes ``g + wd * w``, and momentum runs on the scaled step with the rate inside:
``m = momentum * m - lr * ratio * (g + wd * w)``, ``w += m`` (Nesterov: ``w += momentum * m -
lr * ratio * (g + wd * w)``). Skipped parameters get plain momentum SGD, no weight decay.
``optax.lars`` differs in its trust ratio, ``eta * ||w|| / (||g + wd * w|| + eps)`` (the norm
of the decayed gradient, not the sum of the two norms, and a 0 check on that norm). The
reference turns ``epsilon=0`` into Keras's ``1e-7`` (``epsilon or backend_config.epsilon()``),
and its runs pass 0: ``configs/imagenet_resnet50_lars.py`` sets ``lars_eps=1e-7``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class LambState(NamedTuple):
    count: jax.Array  # optimizer steps taken
    mu: PyTree  # first moment (exp_avg)
    nu: PyTree  # second moment (exp_avg_sq)


def _lerp(start: jax.Array, end: jax.Array, weight: float) -> jax.Array:
    """``torch.lerp``, with its two formulas (it picks by the weight, for accuracy)."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def trust_ratio(w_norm: jax.Array, u_norm: jax.Array) -> jax.Array:
    """``||w|| / ||u||``, or 1 where either norm is 0 (timm's and optax's convention)."""
    ok = (w_norm > 0) & (u_norm > 0)
    return jnp.where(ok, w_norm / jnp.where(ok, u_norm, 1.0), 1.0)


def timm_lamb_clip(max_grad_norm: float) -> optax.GradientTransformation:
    """timm's Lamb's own clipping: all gradients divided by ``max(global_norm / max_norm, 1)``
    (``clip_grad_norm_`` instead multiplies by ``max_norm / (norm + 1e-6)``)."""

    def update(grads, state, params=None):
        del params
        divisor = jnp.maximum(optax.tree.norm(grads) / max_grad_norm, 1.0)
        return jax.tree.map(lambda g: g / divisor.astype(g.dtype), grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def timm_lamb(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    mask: Any = True,
    max_grad_norm: float = 1.0,
    trust_clip: bool = False,
    always_adapt: bool = False,
) -> optax.GradientTransformation:
    """``timm.optim.Lamb`` (``bias_correction``, ``grad_averaging``, coupled weight decay).

    Args:
        learning_rate: A rate or a schedule of the step count.
        b1, b2, eps: timm's ``betas`` and ``eps``.
        weight_decay: Added to the update as ``wd * w`` for the parameters ``mask`` selects
            (timm's parameter group with weight decay); the others form timm's no-decay group.
        mask: True, or a function of the parameters giving a tree of Python bools.
        max_grad_norm: timm's global gradient-norm clipping; 0 turns it off.
        trust_clip: ``lambc``: the trust ratio at most 1.
        always_adapt: Scale every parameter by its trust ratio, decayed or not.
    """

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return LambState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update(grads, state, params):
        if max_grad_norm:
            grads, _ = timm_lamb_clip(max_grad_norm).update(grads, optax.EmptyState())
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: _lerp(m, g, 1.0 - b1), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.nu, grads)
        decayed = mask(params) if callable(mask) else jax.tree.map(lambda _: bool(mask), params)

        def leaf(p, m, v, decay):
            t = count.astype(p.dtype)
            bias1, bias2 = 1.0 - b1**t, 1.0 - b2**t
            u = (m / bias1) / (jnp.sqrt(v) / jnp.sqrt(bias2) + eps)
            if decay and weight_decay:
                u = u + weight_decay * p
            if (decay and weight_decay) or always_adapt:
                ratio = trust_ratio(jnp.linalg.norm(p), jnp.linalg.norm(u))
                u = u * (jnp.minimum(ratio, 1.0) if trust_clip else ratio)
            return -jnp.asarray(lr, p.dtype) * u

        updates = jax.tree.map(leaf, params, mu, nu, decayed)
        return updates, LambState(count, mu, nu)

    return optax.GradientTransformation(init, update)


class LarsState(NamedTuple):
    count: jax.Array  # optimizer steps taken
    momentum: PyTree  # the reference's momentum slot (it holds -lr * ratio * g, summed)


def mlperf_lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    mask: Any = True,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """The MLPerf reference's ``LARSOptimizer`` (module docstring).

    Args:
        learning_rate: A rate or a schedule of the step count.
        momentum: The momentum coefficient.
        weight_decay: Added to the gradient as ``wd * w``, and to the trust ratio's denominator as
            ``wd * ||w||``, for the parameters ``mask`` selects.
        trust_coefficient: ``eta`` (the reference's ``eeta``).
        eps: Added to the trust ratio's denominator.
        mask: True, or a function of the parameters giving a tree of Python bools: False for the
            reference's skip list (no trust ratio, no weight decay).
        nesterov: The reference's ``use_nesterov``.
    """

    def init(params):
        return LarsState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        adapted = mask(params) if callable(mask) else jax.tree.map(lambda _: bool(mask), params)

        def leaf(g, w, m, adapt):
            step = jnp.asarray(lr, w.dtype)
            if adapt:
                w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
                ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
                step = step * jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
                g = g + weight_decay * w
            m = momentum * m - g * step
            return (momentum * m - g * step if nesterov else m), m

        pairs = jax.tree.map(leaf, grads, params, state.momentum, adapted)
        is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
        updates = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
        moments = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
        return updates, LarsState(optax.safe_increment(state.count), moments)

    return optax.GradientTransformation(init, update)
