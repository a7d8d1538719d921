"""train/schedules.py against the schedulers the recipes use, read step by step (or epoch by
epoch) from a torch optimizer: torchvision's ``LinearLR``/``ConstantLR`` warm-up then
``CosineAnnealingLR``/``StepLR`` via ``SequentialLR``, and timm's ``CosineLRScheduler`` and
``StepLRScheduler``, per epoch and per update; plus today's defaults bit for bit."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.torch_reference import import_reference
from train import optim
from train.config import ConfigError, default_config, validate_config

timm = import_reference("timm")
torch = pytest.importorskip("torch")
from timm.scheduler import CosineLRScheduler, StepLRScheduler  # noqa: E402

LR, SPE = 0.5, 4  # peak, steps per epoch


def _config(**fields):
    c = default_config()
    c.learning_rate = LR
    for k, v in fields.items():
        c[k] = v
    validate_config(c, device_count=1, process_count=1)
    return c


def _ours(config, total_steps):
    schedule = optim.create_lr_schedule(config, SPE, total_steps)
    return np.broadcast_to(np.asarray(schedule(jnp.arange(total_steps))), (total_steps,))


def _torch_lrs(make, n, per_step=None):
    """The rate a torch optimizer holds at each of ``n`` steps of ``make(optimizer)``; the
    scheduler is stepped as ``per_step(scheduler, i)`` after step ``i`` (default ``.step()``)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = make(opt)
    out = []
    for i in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        (per_step or (lambda s, i: s.step()))(sched, i)
    return np.array(out)


def _timm_epoch_end(sched, i):
    """timm's train loop: ``step(epoch + 1)`` after an epoch's last update."""
    if (i + 1) % SPE == 0:
        sched.step((i + 1) // SPE)


def _timm_update(sched, i):
    """timm's train loop with --sched-on-updates: ``step_update(num_updates)`` after each."""
    sched.step_update(i + 1)


def _assert_close(ours, ref):
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-13, atol=1e-16)


def test_torchvision_v2_warmup_and_cosine_per_epoch(x64):
    """torchvision's V2 recipe: LinearLR(start_factor=lr_warmup_decay) for the warm-up epochs,
    then CosineAnnealingLR(T_max=epochs - warmup, eta_min=lr_min), stepped per epoch."""
    epochs, warm = 10, 3
    ref = _torch_lrs(
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warm),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warm, eta_min=1e-4),
            ],
            milestones=[warm],
        ),
        epochs,
    )
    c = _config(warmup_epochs=warm, lr_warmup_decay=0.01, min_lr=1e-4, sched_on_updates=False)
    _assert_close(_ours(c, epochs * SPE), np.repeat(ref, SPE))  # held within each epoch


def test_torchvision_constant_warmup_and_step_per_epoch(x64):
    epochs, warm = 12, 2
    ref = _torch_lrs(
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.ConstantLR(opt, factor=0.1, total_iters=warm),
                torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.2),
            ],
            milestones=[warm],
        ),
        epochs,
    )
    c = _config(
        lr_schedule="step",
        lr_step_size=3,
        lr_gamma=0.2,
        warmup_epochs=warm,
        lr_warmup_method="constant",
        lr_warmup_decay=0.1,
        sched_on_updates=False,
    )
    _assert_close(_ours(c, epochs * SPE), np.repeat(ref, SPE))


def test_linear_warmup_and_cosine_per_step_equal_torch_stepped_per_step(x64):
    epochs, warm = 6, 2
    total, ramp = epochs * SPE, warm * SPE
    ref = _torch_lrs(
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=ramp),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - ramp, eta_min=0.01),
            ],
            milestones=[ramp],
        ),
        total,
    )
    c = _config(warmup_epochs=warm, lr_warmup_decay=0.25, min_lr=0.01)
    _assert_close(_ours(c, total), ref)


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("on_updates", [False, True])
def test_timm_cosine_with_warmup_lr_and_min_lr(prefix, on_updates, x64):
    """timm's CosineLRScheduler as its scheduler factory builds it (RSB: warmup_lr, min_lr),
    per epoch (``step(epoch + 1)`` after each epoch) or per update (``step_update``)."""
    epochs, warm = 9, 3
    unit = SPE if on_updates else 1
    t_initial = epochs - warm if prefix else epochs  # timm adds a prefixed warm-up to the run
    ref = _torch_lrs(
        lambda opt: CosineLRScheduler(
            opt,
            t_initial=t_initial * unit,
            lr_min=1e-6,
            warmup_t=warm * unit,
            warmup_lr_init=1e-4,
            warmup_prefix=prefix,
            t_in_epochs=not on_updates,
        ),
        epochs * SPE,
        _timm_update if on_updates else _timm_epoch_end,
    )
    c = _config(
        warmup_epochs=warm, warmup_lr=1e-4, min_lr=1e-6, warmup_prefix=prefix, sched_on_updates=on_updates
    )
    _assert_close(_ours(c, epochs * SPE), ref)


@pytest.mark.parametrize("prefix", [False, True])
def test_timm_step_scheduler_per_epoch(prefix, x64):
    epochs, warm = 11, 2
    ref = _torch_lrs(
        lambda opt: StepLRScheduler(
            opt, decay_t=3, decay_rate=0.5, warmup_t=warm, warmup_lr_init=1e-3, warmup_prefix=prefix
        ),
        epochs * SPE,
        _timm_epoch_end,
    )
    c = _config(
        lr_schedule="step",
        lr_step_size=3,
        lr_gamma=0.5,
        warmup_epochs=warm,
        warmup_lr=1e-3,
        warmup_prefix=prefix,
        sched_on_updates=False,
    )
    _assert_close(_ours(c, epochs * SPE), ref)


@pytest.mark.parametrize("kind", ["cosine", "polynomial", "constant"])
def test_default_schedules_are_unchanged_bit_for_bit(kind):
    """The schedules as built before warm-up factors, minimum rates and per-epoch stepping."""
    c = _config(lr_schedule=kind, warmup_epochs=1.5, end_learning_rate=0.01)
    total, warm = 10 * SPE, 6
    after = {
        "cosine": optax.cosine_decay_schedule(LR, total - warm),
        "polynomial": optax.polynomial_schedule(LR, 0.01, power=2.0, transition_steps=total - warm),
        "constant": optax.constant_schedule(LR),
    }[kind]
    before = optax.join_schedules([optax.linear_schedule(0.0, LR, warm), after], [warm])
    steps = jnp.arange(total + 2)
    schedule = optim.create_lr_schedule(c, SPE, total)
    assert np.array_equal(np.asarray(schedule(steps)), np.asarray(before(steps)))


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"lr_warmup_method": "cosine"},
            "config.lr_warmup_method='cosine' is not valid; choose one of: linear, constant.",
        ),
        ({"lr_warmup_decay": 1.5}, "config.lr_warmup_decay must be in [0, 1]; got 1.5."),
        (
            {"warmup_lr": 1e-4, "lr_warmup_decay": 0.01},
            "config.warmup_lr (an absolute start rate) and config.lr_warmup_decay (a factor of the "
            "peak) both set the warm-up's start; set one of them.",
        ),
        (
            {"min_lr": 1e-5, "lr_schedule": "step"},
            "config.min_lr applies to lr_schedule='cosine' only; got lr_schedule='step' (the "
            "polynomial schedule ends at config.end_learning_rate).",
        ),
        (
            {"lr_schedule": "step", "lr_step_size": 0},
            "lr_schedule='step' needs config.lr_step_size >= 1 (epochs) and config.lr_gamma in (0, 1]; "
            "got 0 and 0.1.",
        ),
    ],
)
def test_bad_schedule_fields_are_one_line_errors(fields, message):
    c = default_config()
    for k, v in fields.items():
        c[k] = v
    with pytest.raises(ConfigError) as e:
        validate_config(c, device_count=1, process_count=1)
    assert str(e.value) == message
