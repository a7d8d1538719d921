"""Learning-rate schedules (optax) built from a config: torchvision's and timm's recipes.

* ``learning_rate`` is the peak rate; with ``lr_base_batch_size > 0`` it is scaled linearly,
  ``learning_rate * batch_size / lr_base_batch_size`` (the "0.1 x batch/256" rule).
* Warm-up over ``warmup_epochs``: ``lr_warmup_method='linear'`` ramps from a start rate to the
  peak (torchvision's ``LinearLR``, timm's warm-up), ``'constant'`` holds the start rate
  (torchvision's ``ConstantLR``). The start rate is ``warmup_lr`` when > 0 (timm's absolute
  ``--warmup-lr``), else ``lr_warmup_decay`` x peak (torchvision's ``--lr-warmup-decay``; the
  default 0 ramps from 0).
* Then ``lr_schedule``: ``'cosine'`` (to ``min_lr``: timm's ``--min-lr``, torchvision's
  ``--lr-min``), ``'polynomial'`` (``(1 - t)^lr_decay_power`` to ``end_learning_rate``, the
  LARS/MLPerf schedule), ``'step'`` (x ``lr_gamma`` every ``lr_step_size`` epochs,
  torchvision's ``StepLR``) or ``'constant'``.
* ``warmup_prefix`` (default True, as torchvision's ``SequentialLR``): the decay starts when the
  warm-up ends and spans the rest of the run. False is timm's default: the decay spans the whole
  run from step 0 and the warm-up replaces its first part.
* ``sched_on_updates`` (default True): the rate changes every optimizer step. False: once per
  epoch, as torchvision's recipes and timm (without ``--sched-on-updates``) step their
  schedulers: the schedule is laid out in epochs and epoch ``e`` uses its value at ``e``.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "polynomial", "constant", "step")
WARMUP_METHODS = ("linear", "constant")


def peak_learning_rate(config: Any) -> float:
    lr = float(config.learning_rate)
    if config.lr_base_batch_size:
        lr *= config.batch_size / config.lr_base_batch_size
    return lr


def create_lr_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The schedule over ``total_steps`` with ``warmup_epochs * steps_per_epoch`` of warm-up; per
    epoch (``sched_on_updates=False``), the same laid out over whole epochs, each epoch's rate
    held for its steps."""
    if config.sched_on_updates:
        return _schedule(config, steps_per_epoch, total_steps)
    per_epoch = _schedule(config, 1, max(math.ceil(total_steps / steps_per_epoch), 1))
    return lambda step: per_epoch(step // steps_per_epoch)


def _schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    peak = peak_learning_rate(config)
    warmup = round(float(config.warmup_epochs) * steps_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))
    prefix = bool(config.warmup_prefix)
    decay_steps = max(total_steps - warmup, 1) if prefix else max(total_steps, 1)
    after = _decay(config, peak, decay_steps, steps_per_epoch)
    if warmup == 0:
        return after
    start = float(config.warmup_lr) if config.warmup_lr else peak * float(config.lr_warmup_decay)
    method = config.lr_warmup_method
    if method == "linear":
        ramp = optax.linear_schedule(start, peak, warmup)
    elif method == "constant":
        ramp = optax.constant_schedule(start)
    else:
        raise ValueError(f"lr_warmup_method must be one of {WARMUP_METHODS}; got {method!r}.")
    if prefix:
        return optax.join_schedules([ramp, after], [warmup])
    # timm's warmup_prefix=False: the decay is read at the step itself, not at step - warmup.
    return lambda step: jnp.where(step < warmup, ramp(step), after(step))


def _decay(config: Any, peak: float, decay_steps: int, steps_per_epoch: int) -> optax.Schedule:
    kind = config.lr_schedule
    if kind == "cosine":
        # alpha = 0 leaves optax's arithmetic exactly as without a minimum.
        alpha = float(config.min_lr) / peak if peak else 0.0
        return optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
    if kind == "polynomial":
        return optax.polynomial_schedule(
            peak,
            float(config.end_learning_rate),
            power=float(config.lr_decay_power),
            transition_steps=decay_steps,
        )
    if kind == "step":
        return optax.exponential_decay(
            peak, int(config.lr_step_size) * steps_per_epoch, float(config.lr_gamma), staircase=True
        )
    if kind == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(f"lr_schedule must be one of {SCHEDULES}; got {kind!r}.")
