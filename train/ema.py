"""Exponential moving average (EMA) of the weights and BatchNorm statistics, kept as timm's
``ModelEmaV3`` or torchvision's reference recipe keeps it (``config.ema_*``; docs/training.md).

The EMA is ``state.ema = {'params', 'batch_stats'}`` in the ``TrainState`` (None when off). It is
updated inside the jitted train step, after the optimizer update, by ``wrap_train_step``; which
steps update it, and with what decay, is a function of the step number alone, so a resumed run
continues it bitwise. It is replicated and saved with the rest of the state.

Both references average the parameters and the buffers (BatchNorm's running statistics) with
``ema <- decay * ema + (1 - decay) * model``; they differ in when and with what decay:

* ``ema_every_steps=0``, timm: ``ModelEmaV3.update(model, step=n)`` after the n-th optimizer
  step, as timm's ``train.py`` calls it. ``get_decay(n)`` is 0 at n = 1 (a copy of the model),
  then ``ema_decay``; with ``ema_warmup`` (``--model-ema-warmup``) it is
  ``1 - (1 + (n - 1) / gamma) ** -power`` (``warmup_gamma`` 1, ``warmup_power`` 2/3) capped at
  ``ema_decay`` and floored at ``min_decay`` 0: a plain mean at first, a longer memory later.
* ``ema_every_steps=N > 0``, torchvision: ``ExponentialMovingAverage`` (an ``AveragedModel``
  with ``use_buffers=True``) as ``references/classification/train.py`` drives it
  (``--model-ema-steps N``): updated after the optimizer step of batch ``i`` of each epoch when
  ``i % N == 0``, with the decay adjusted to the run, ``alpha = min(1, (1 - ema_decay) *
  batch_size * N / epochs)``, ``decay = 1 - alpha`` (the global batch; pycls's adjustment, so
  that one decay suits recipes of other lengths). ``AveragedModel`` copies the model at its
  first update (``n_averaged == 0``), and the script resets ``n_averaged`` after every update of
  the learning-rate warm-up epochs: so those updates and the first one after them copy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from train.steps import Batch, Metrics, PyTree, StepFn, TrainState


@dataclasses.dataclass(frozen=True)
class EmaSchedule:
    """When the EMA is updated and with what decay, from the optimizer step count alone.

    Attributes:
        decay: The decay of an averaging update (torchvision's after its adjustment).
        every_steps: 0: timm's, every step; N: torchvision's, batches ``i % N == 0`` of an epoch.
        warmup: timm's decay warm-up (``every_steps=0`` only).
        steps_per_epoch: torchvision: the batch index is ``(n - 1) % steps_per_epoch``.
        copy_through_step: torchvision: updates at steps ``n <= copy_through_step`` copy.
        warmup_gamma: timm's ``warmup_gamma``.
        warmup_power: timm's ``warmup_power``.
        min_decay: timm's ``min_decay``.
    """

    decay: float
    every_steps: int = 0
    warmup: bool = False
    steps_per_epoch: int = 1
    copy_through_step: int = 1
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    min_decay: float = 0.0

    @classmethod
    def from_config(cls, config: Any, steps_per_epoch: int, total_steps: int) -> EmaSchedule | None:
        """The schedule of ``config.ema_*`` (None when ``ema_decay`` is 0) for a run of
        ``total_steps`` steps of ``steps_per_epoch``."""
        if not config.ema_decay:
            return None
        every = int(config.ema_every_steps)
        if every == 0:
            return cls(decay=float(config.ema_decay), warmup=bool(config.ema_warmup))
        epochs = config.num_epochs if config.num_train_steps <= 0 else total_steps / steps_per_epoch
        return cls(
            decay=torchvision_decay(config.ema_decay, config.batch_size, every, epochs),
            every_steps=every,
            steps_per_epoch=steps_per_epoch,
            # Updates of the warm-up epochs (epoch < warmup_epochs) copy, and so does the first
            # one after them: batch 0 of epoch ceil(warmup_epochs).
            copy_through_step=math.ceil(config.warmup_epochs) * steps_per_epoch + 1,
        )

    def at(self, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(update, decay, 1 - decay)`` after optimizer step ``step`` (1-based): whether the
        EMA changes, and the weights of the EMA and of the model (0 and 1: a copy)."""
        dtype = jnp.result_type(float)  # float64 under 64-bit JAX, else float32
        step = jnp.asarray(step)
        if self.every_steps == 0:
            update = jnp.ones((), bool)
            if self.warmup:
                n = (step - 1).astype(dtype)
                decay = 1 - (1 + n / self.warmup_gamma) ** -self.warmup_power
                decay = jnp.maximum(jnp.minimum(decay, self.decay), self.min_decay)
                one_minus = 1 - decay
            else:  # constants in Python's float64, as timm's are
                decay, one_minus = jnp.asarray(self.decay, dtype), jnp.asarray(1 - self.decay, dtype)
            copy = step <= 1
        else:
            update = ((step - 1) % self.steps_per_epoch) % self.every_steps == 0
            decay, one_minus = jnp.asarray(self.decay, dtype), jnp.asarray(1 - self.decay, dtype)
            copy = step <= self.copy_through_step
        decay = jnp.where(copy, jnp.zeros((), dtype), decay)
        one_minus = jnp.where(copy, jnp.ones((), dtype), one_minus)
        return update, decay, one_minus


def torchvision_decay(decay: float, batch_size: int, every_steps: int, epochs: float) -> float:
    """torchvision's adjusted decay: ``1 - min(1, (1 - decay) * batch_size * every_steps / epochs)``
    (``batch_size`` global: its world size times the per-GPU batch)."""
    alpha = min(1.0, (1.0 - decay) * batch_size * every_steps / epochs)
    return 1.0 - alpha


def model_variables(state: TrainState) -> dict[str, PyTree]:
    """What the EMA averages: the parameters and the BatchNorm statistics."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def init(state: TrainState) -> TrainState:
    """``state`` with an EMA equal to its model (timm's and torchvision's copy at creation)."""
    return state.replace(ema=jax.tree.map(jnp.copy, model_variables(state)))


def with_ema(create_state: Any) -> Any:
    """``create_state`` (``() -> TrainState``) whose states carry an EMA."""

    def create() -> TrainState:
        return init(create_state())

    return create


def average(ema: PyTree, model: PyTree, update: jax.Array, decay: jax.Array, one_minus: jax.Array) -> PyTree:
    """``decay * ema + (1 - decay) * model`` per leaf where ``update``, else ``ema``; a copy of
    ``model`` where ``decay`` is 0."""

    def leaf(e: jax.Array, m: jax.Array) -> jax.Array:
        m = m.astype(e.dtype)
        new = e * decay.astype(e.dtype) + m * one_minus.astype(e.dtype)
        new = jnp.where(decay == 0, m, new)
        return jnp.where(update, new, e)

    return jax.tree.map(leaf, ema, model)


def wrap_train_step(train_step: StepFn, schedule: EmaSchedule | None) -> StepFn:
    """``train_step`` followed by the EMA update of ``schedule`` (unchanged when None). The step
    number after the update decides, so drivers (jit, pmap) and resumes need nothing more."""
    if schedule is None:
        return train_step

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        new, metrics = train_step(state, batch)
        update, decay, one_minus = schedule.at(new.step)
        ema = average(state.ema, model_variables(new), update, decay, one_minus)
        return new.replace(ema=ema), metrics

    return step


def as_model(state: TrainState) -> TrainState:
    """``state`` with the EMA in place of the model's variables: what the eval step evaluates
    (the same structure, so the compiled eval step serves both)."""
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


EMA_PREFIX = "ema_"


def prefixed(result: Mapping[str, Any]) -> dict[str, Any]:
    """An EMA eval's metrics as ``ema_loss``, ``ema_accuracy``, ... (its example count is the
    model's)."""
    return {f"{EMA_PREFIX}{k}": v for k, v in result.items() if k != "num_examples"}
