"""Optimizers (optax) built from a config; the learning-rate schedules are in
``train/schedules.py`` (re-exported here).

* ``optimizer``: ``'sgd'`` (momentum, optional Nesterov, decoupled-from-loss L2 weight decay),
  ``'lars'`` (the MLPerf ResNet-50 reference's LARS; ``train/layerwise.py`` says where
  ``optax.lars`` differs), ``'adamw'`` (``torch.optim.AdamW``'s decoupled weight decay, with
  ``opt_betas`` and ``opt_eps``), ``'lamb'`` or ``'lambc'`` (``timm.optim.Lamb``, its
  trust ratio capped at 1 for ``'lambc'``, its built-in clipping at ``lamb_max_grad_norm``; see
  ``train/layerwise.py`` for where ``optax.lamb`` differs). BatchNorm parameters and biases
  are excluded from weight decay (and from trust-ratio scaling) unless
  ``weight_decay_on_bn_and_bias``.
* ``grad_clip_norm`` > 0 scales the gradients to at most this global norm first, as
  ``torch.nn.utils.clip_grad_norm_`` does before ``optimizer.step()``. With ``freeze_backbone``
  the norm is the head's alone: PyTorch's frozen parameters (``requires_grad=False``) have no
  gradient for ``clip_grad_norm_(model.parameters())`` to count, as timm's ``Lamb`` has none for
  its own clipping either.
* fine-tuning: ``freeze_backbone`` or ``backbone_lr_multiplier`` (everything but ``fc``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from train.layerwise import mlperf_lars, timm_lamb, timm_lamb_clip
from train.schedules import SCHEDULES, create_lr_schedule, peak_learning_rate  # noqa: F401

OPTIMIZERS = ("sgd", "lars", "adamw", "lamb", "lambc")


def decay_mask(params: Any) -> Any:
    """True for convolution and dense kernels (rank >= 2), False for BatchNorm and biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def head_labels(params: Any) -> Any:
    """``'head'`` for the classifier (ResNet's ``fc``, ResNetV2's ``head``), ``'backbone'`` for
    every other parameter."""
    return {
        k: jax.tree.map(lambda _, k=k: "head" if k in ("fc", "head") else "backbone", v)
        for k, v in params.items()
    }


def clip_by_global_norm(
    max_norm: float, counted: Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: the gradients times ``min(1, max_norm / (norm + 1e-6))``.
    (``optax.clip_by_global_norm`` divides by the norm itself, which differs by about 1e-6
    relative from PyTorch whenever it clips.)

    ``counted``, a function of the gradients' tree giving a tree of Python bools, picks the
    gradients that ``clip_grad_norm_`` is given: only they enter the norm and are scaled (None:
    all of them)."""

    def update(updates, state, params=None):
        del params
        picked = jax.tree.map(lambda _: True, updates) if counted is None else counted(updates)
        norm = optax.tree.norm(jax.tree.map(lambda g, c: g if c else jnp.zeros_like(g), updates, picked))
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return jax.tree.map(lambda g, c: g * coef.astype(g.dtype) if c else g, updates, picked), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer; with ``freeze_backbone`` or ``backbone_lr_multiplier`` the backbone gets
    zero updates (and no optimizer state) or its updates scaled (``optax.multi_transform``);
    ``grad_clip_norm`` clips the gradients first: of all parameters, or of the head's alone when
    the backbone is frozen (the gradients a PyTorch run has)."""
    tx = _optimizer(config, schedule)
    freeze = bool(config.freeze_backbone)
    multiplier = float(config.backbone_lr_multiplier)
    # timm's Lamb clips the global norm of the gradients it holds: a frozen backbone has none.
    lamb_clip = config.optimizer in ("lamb", "lambc") and float(config.lamb_max_grad_norm) > 0
    if lamb_clip and freeze:
        tx = optax.chain(timm_lamb_clip(float(config.lamb_max_grad_norm)), tx)
    if freeze or multiplier != 1.0:
        backbone = optax.set_to_zero() if freeze else optax.chain(tx, optax.scale(multiplier))
        tx = optax.multi_transform({"head": tx, "backbone": backbone}, head_labels)
    if lamb_clip and not freeze:
        tx = optax.chain(timm_lamb_clip(float(config.lamb_max_grad_norm)), tx)
    if config.grad_clip_norm:
        # Masked rather than moved into the head's branch: the optimizer state keeps its tree.
        head = lambda grads: jax.tree.map(lambda label: label == "head", head_labels(grads))  # noqa: E731
        clip = clip_by_global_norm(float(config.grad_clip_norm), counted=head if freeze else None)
        tx = optax.chain(clip, tx)
    return tx


def _optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    kind = config.optimizer
    wd = float(config.weight_decay)
    mask = True if config.weight_decay_on_bn_and_bias else decay_mask
    if kind == "sgd":
        sgd = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
        if not wd:
            return sgd
        # L2 on the gradient (not AdamW-style decoupled decay): the classic ResNet recipe.
        return optax.chain(optax.add_decayed_weights(wd, mask=mask), sgd)
    if kind == "lars":
        return mlperf_lars(
            schedule,
            momentum=float(config.momentum),
            weight_decay=wd,
            trust_coefficient=float(config.lars_trust_coefficient),
            eps=float(config.lars_eps),
            mask=mask,
            nesterov=bool(config.nesterov),
        )
    if kind == "adamw":
        b1, b2 = (float(b) for b in config.opt_betas)
        return optax.adamw(schedule, b1=b1, b2=b2, eps=float(config.opt_eps), weight_decay=wd, mask=mask)
    if kind in ("lamb", "lambc"):
        b1, b2 = (float(b) for b in config.opt_betas)
        return timm_lamb(
            schedule,
            b1=b1,
            b2=b2,
            eps=float(config.opt_eps),
            weight_decay=wd,
            mask=mask,
            max_grad_norm=0.0,  # clipped in create_optimizer, over all the gradients timm's would see
            trust_clip=kind == "lambc",
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {kind!r}.")
