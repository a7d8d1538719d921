"""Learning-rate schedules and optimizers (optax) built from a config.

* ``learning_rate`` is the peak rate; with ``lr_base_batch_size > 0`` it is scaled linearly,
  ``learning_rate * batch_size / lr_base_batch_size`` (the "0.1 x batch/256" rule).
* ``lr_schedule``: ``'cosine'`` (linear warm-up then cosine to 0), ``'polynomial'`` (warm-up
  then ``(1 - t)^lr_decay_power`` to ``end_learning_rate``, the LARS/MLPerf schedule) or
  ``'constant'`` (after warm-up).
* ``optimizer``: ``'sgd'`` (momentum, optional Nesterov, decoupled-from-loss L2 weight decay)
  or ``'lars'`` (``optax.lars``). BatchNorm parameters and biases are excluded from weight decay
  (and from LARS trust-ratio scaling) unless ``weight_decay_on_bn_and_bias``.
* fine-tuning: ``freeze_backbone`` or ``backbone_lr_multiplier`` (everything but ``fc``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "polynomial", "constant")
OPTIMIZERS = ("sgd", "lars")


def peak_learning_rate(config: Any) -> float:
    lr = float(config.learning_rate)
    if config.get("lr_base_batch_size", 0):
        lr *= config.batch_size / config.lr_base_batch_size
    return lr


def create_lr_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The schedule over ``total_steps`` with ``warmup_epochs * steps_per_epoch`` of warm-up."""
    peak = peak_learning_rate(config)
    warmup = round(float(config.get("warmup_epochs", 0)) * steps_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    kind = config.get("lr_schedule", "cosine")
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif kind == "polynomial":
        after = optax.polynomial_schedule(
            peak,
            float(config.get("end_learning_rate", 0.0)),
            power=float(config.get("lr_decay_power", 2.0)),
            transition_steps=decay_steps,
        )
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}; got {kind!r}.")
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for convolution and dense kernels (rank >= 2), False for BatchNorm and biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def head_labels(params: Any) -> Any:
    """``'head'`` for the classifier (``fc``), ``'backbone'`` for every other parameter."""
    return {k: jax.tree.map(lambda _, k=k: "head" if k == "fc" else "backbone", v) for k, v in params.items()}


def create_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer; with ``freeze_backbone`` or ``backbone_lr_multiplier`` the backbone gets
    zero updates (and no optimizer state) or its updates scaled (``optax.multi_transform``)."""
    tx = _optimizer(config, schedule)
    freeze = bool(config.get("freeze_backbone", False))
    multiplier = float(config.get("backbone_lr_multiplier", 1.0))
    if not freeze and multiplier == 1.0:
        return tx
    backbone = optax.set_to_zero() if freeze else optax.chain(tx, optax.scale(multiplier))
    return optax.multi_transform({"head": tx, "backbone": backbone}, head_labels)


def _optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    kind = config.get("optimizer", "sgd")
    wd = float(config.get("weight_decay", 0.0))
    mask = True if config.get("weight_decay_on_bn_and_bias", False) else decay_mask
    if kind == "sgd":
        sgd = optax.sgd(schedule, momentum=config.get("momentum", 0.9) or None, nesterov=config.nesterov)
        if not wd:
            return sgd
        # L2 on the gradient (not AdamW-style decoupled decay): the classic ResNet recipe.
        return optax.chain(optax.add_decayed_weights(wd, mask=mask), sgd)
    if kind == "lars":
        return optax.lars(
            schedule,
            weight_decay=wd,
            weight_decay_mask=mask,
            trust_coefficient=float(config.get("lars_trust_coefficient", 0.001)),
            eps=float(config.get("lars_eps", 0.0)),
            trust_ratio_mask=mask,
            momentum=float(config.get("momentum", 0.9)),
            nesterov=bool(config.get("nesterov", False)),
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {kind!r}.")
