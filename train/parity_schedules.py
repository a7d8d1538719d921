"""The learning-rate schedules of ``python -m train.parity``'s PyTorch side, as a PyTorch user
configures them from the config's fields (``train/schedules.py`` is ours):

* timm's schedulers (``CosineLRScheduler``, ``PolyLRScheduler``, ``StepLRScheduler``) with
  ``warmup_t``, ``warmup_lr_init`` (``warmup_lr``, or ``lr_warmup_decay`` x the peak),
  ``lr_min`` (``min_lr``), ``warmup_prefix`` and ``t_in_epochs`` (``not sched_on_updates``):
  stepped per update as timm's ``--sched-on-updates`` does, or per epoch (``step(epoch)``) as
  timm's ``train.py`` does without it.
* torchvision's: ``LinearLR`` (``start_factor=lr_warmup_decay``) or ``ConstantLR`` (``factor=``)
  then ``CosineAnnealingLR`` (``eta_min=min_lr``), ``StepLR`` or a constant rate, joined by
  ``SequentialLR`` at the end of the warm-up, stepped once per epoch as torchvision's reference
  script steps it (or per update with ``sched_on_updates``). Used for torchvision's warm-up
  flags (``lr_warmup_method='constant'``, or ``lr_warmup_decay > 0``); ``LinearLR`` cannot start
  from 0, timm's warm-up does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from resnet_jax.torch_reference import import_reference


def refusal(config: Any) -> str | None:
    """Why the PyTorch side cannot build this config's schedule (one line), or None."""
    if not _torchvision_style(config):
        return None
    flags = "torchvision's warm-up flags"
    if not config.warmup_prefix:
        return f"config.warmup_prefix=False with {flags} (SequentialLR starts the decay after it)"
    if config.lr_schedule == "polynomial":
        return f"config.lr_schedule='polynomial' with {flags} (torch's PolynomialLR ends at 0)"
    if config.min_lr and float(config.backbone_lr_multiplier) != 1.0:
        return f"config.min_lr with config.backbone_lr_multiplier and {flags} (eta_min is not scaled)"
    return None


def _torchvision_style(config: Any) -> bool:
    return not config.warmup_lr and (config.lr_warmup_method == "constant" or bool(config.lr_warmup_decay))


class Stepper:
    """A scheduler and when to step it: ``after(n)`` is called after optimizer update ``n``."""

    def __init__(self, scheduler: Any, kind: str, steps_per_epoch: int, per_update: bool):
        self.scheduler, self.kind, self.spe, self.per_update = scheduler, kind, steps_per_epoch, per_update

    def after(self, n: int) -> None:
        if self.kind == "timm":
            if self.per_update:
                self.scheduler.step_update(num_updates=n)
            elif n % self.spe == 0:  # timm's train.py: lr_scheduler.step(epoch + 1) after an epoch
                self.scheduler.step(n // self.spe)
        elif self.per_update or n % self.spe == 0:
            self.scheduler.step()


def make(opt: torch.optim.Optimizer, config: Any, steps_per_epoch: int, total_steps: int) -> Stepper:
    """The config's schedule on ``opt`` (whose groups hold the peak rate and their ``lr_scale``),
    already at step 0's rates."""
    per_update = bool(config.sched_on_updates)
    # Per epoch, the schedule is laid out in epochs: one scheduler step is one epoch.
    unit = 1 if per_update else steps_per_epoch
    total = total_steps if per_update else max(math.ceil(total_steps / steps_per_epoch), 1)
    warmup = min(round(float(config.warmup_epochs) * steps_per_epoch / unit), max(total - 1, 0))
    step_size = int(config.lr_step_size) * steps_per_epoch // unit
    if _torchvision_style(config):
        for group in opt.param_groups:  # torch's schedulers scale each group's own rate
            group["lr"] = group["lr"] * group["lr_scale"]
        scheduler = _torchvision(opt, config, warmup, total, step_size)
        return Stepper(scheduler, "torch", steps_per_epoch, per_update)
    scheduler = _timm(opt, config, warmup, total, step_size, per_update)
    if per_update:
        scheduler.step_update(num_updates=0)
    else:
        scheduler.step(0)
    return Stepper(scheduler, "timm", steps_per_epoch, per_update)


def _timm(opt, config: Any, warmup: int, total: int, step_size: int, per_update: bool):
    sched = import_reference("timm.scheduler")
    peak = opt.param_groups[0]["lr"]
    prefix = bool(config.warmup_prefix)
    common = dict(
        warmup_t=warmup,
        warmup_lr_init=float(config.warmup_lr) or float(config.lr_warmup_decay) * peak,
        warmup_prefix=prefix,
        t_in_epochs=not per_update,
    )
    decay = max(total - warmup, 1) if prefix else max(total, 1)
    kind = config.lr_schedule
    if kind == "cosine":
        return sched.CosineLRScheduler(opt, t_initial=decay, lr_min=float(config.min_lr), **common)
    if kind == "polynomial":
        return sched.PolyLRScheduler(
            opt,
            t_initial=decay,
            power=float(config.lr_decay_power),
            lr_min=float(config.end_learning_rate),
            **common,
        )
    if kind == "step":
        return sched.StepLRScheduler(opt, decay_t=step_size, decay_rate=float(config.lr_gamma), **common)
    # constant: a step schedule that never steps down
    return sched.StepLRScheduler(opt, decay_t=total + 1, decay_rate=1.0, **common)


def _torchvision(opt, config: Any, warmup: int, total: int, step_size: int):
    lrs = torch.optim.lr_scheduler
    kind = config.lr_schedule
    if kind == "cosine":
        main = lrs.CosineAnnealingLR(opt, T_max=max(total - warmup, 1), eta_min=float(config.min_lr))
    elif kind == "step":
        main = lrs.StepLR(opt, step_size=step_size, gamma=float(config.lr_gamma))
    else:  # constant
        main = lrs.ConstantLR(opt, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    decay = float(config.lr_warmup_decay)
    if config.lr_warmup_method == "linear":
        ramp = lrs.LinearLR(opt, start_factor=decay, total_iters=warmup)
    else:
        ramp = lrs.ConstantLR(opt, factor=decay, total_iters=warmup)
    return lrs.SequentialLR(opt, schedulers=[ramp, main], milestones=[warmup])
