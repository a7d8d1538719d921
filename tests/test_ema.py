"""train.ema against the references it imitates, at float64, fed the same trajectories of
parameters and BatchNorm buffers: torchvision's ExponentialMovingAverage (``AveragedModel`` with
its EMA average and ``use_buffers=True``) driven as its reference ``train.py`` drives it, and
timm's ``ModelEmaV3`` with and without its warm-up; then the EMA inside the jitted train step."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_jax.torch_reference import import_reference  # noqa: E402
from train import checkpoint, ema, steps  # noqa: E402
from train.config import ConfigError, default_config, validate_config  # noqa: E402
from train.model import build_model  # noqa: E402
from train.periodic import eval_summary  # noqa: E402

timm = import_reference("timm")
from timm.utils.model_ema import ModelEmaV3  # noqa: E402


def _torch_model() -> torch.nn.Module:
    """Parameters and BatchNorm buffers (running mean and variance, and an int counter)."""
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).double()


def _draw(module: torch.nn.Module, rng: np.random.Generator) -> dict:
    """Give ``module`` new random floating values (a step of training) and return them as the
    ``{'params', 'batch_stats'}`` tree train.ema averages, named by the state_dict keys."""
    tree = {"params": {}, "batch_stats": {}}
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if not value.is_floating_point():
                value.add_(1)  # num_batches_tracked: an int buffer, not averaged here
                continue
            new = rng.normal(size=tuple(value.shape))
            if "running_var" in name:
                new = np.abs(new)
            value.copy_(torch.from_numpy(new))
            part = "batch_stats" if "running" in name else "params"
            tree[part][name] = jnp.asarray(new)
    return tree


def _assert_ema_equal(reference: torch.nn.Module, tree: dict) -> None:
    flat = {**tree["params"], **tree["batch_stats"]}
    compared = 0
    for name, value in reference.state_dict().items():
        if value.is_floating_point():
            np.testing.assert_allclose(np.asarray(flat[name]), value.numpy(), rtol=1e-13, atol=1e-15)
            compared += 1
    assert compared == len(flat) == 6


def _config(**fields):
    c = default_config()
    for k, v in fields.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_torchvision_schedule_matches_averaged_model_as_its_reference_script_drives_it(warmup_epochs):
    steps_per_epoch, epochs, every, batch, decay = 5, 3, 2, 8, 0.99
    with jax.enable_x64(True):
        schedule = ema.EmaSchedule.from_config(
            _config(
                ema_decay=decay,
                ema_every_steps=every,
                num_epochs=epochs,
                batch_size=batch,
                warmup_epochs=warmup_epochs,
            ),
            steps_per_epoch,
            steps_per_epoch * epochs,
        )
        # references/classification/train.py: the decay adjustment, and utils.py's
        # ExponentialMovingAverage (AveragedModel with this average and use_buffers=True).
        alpha = min(1.0, (1.0 - decay) * (1 * batch * every / epochs))
        adjusted = 1.0 - alpha
        at = jax.jit(schedule.at)  # as in the train step: the step number is traced

        def ema_avg(avg_model_param, model_param, num_averaged):
            return adjusted * avg_model_param + (1 - adjusted) * model_param

        rng = np.random.default_rng(0)
        model = _torch_model()
        tree = _draw(model, rng)
        reference = torch.optim.swa_utils.AveragedModel(model, avg_fn=ema_avg, use_buffers=True)
        averaged = jax.tree.map(jnp.copy, tree)
        updates = 0
        # train_one_epoch: after the optimizer step of batch i, update when i % model_ema_steps
        # == 0, and reset n_averaged (copy at the next update) in the warm-up epochs.
        for epoch in range(epochs):
            for i in range(steps_per_epoch):
                tree = _draw(model, rng)
                if i % every == 0:
                    reference.update_parameters(model)
                    updates += 1
                    if epoch < warmup_epochs:
                        reference.n_averaged.fill_(0)
                averaged = ema.average(averaged, tree, *at(np.int32(epoch * steps_per_epoch + i + 1)))
                _assert_ema_equal(reference.module, averaged)
        assert updates == 9 and 0 < schedule.decay < 1
        # The average is not a copy of the last model: the comparison above had weight.
        assert not np.allclose(averaged["params"]["0.bias"], tree["params"]["0.bias"])


@pytest.mark.parametrize("warmup", [False, True])
def test_timm_schedule_matches_model_ema_v3(warmup):
    with jax.enable_x64(True):
        schedule = ema.EmaSchedule.from_config(_config(ema_decay=0.8, ema_warmup=warmup), 5, 15)
        at = jax.jit(schedule.at)  # as in the train step: the step number is traced
        rng = np.random.default_rng(1)
        model = _torch_model()
        averaged = _draw(model, rng)
        reference = ModelEmaV3(model, decay=0.8, use_warmup=warmup)
        decays = []
        # timm's train.py: num_updates += 1 after each optimizer step, then update(step=num_updates).
        for n in range(1, 16):
            tree = _draw(model, rng)
            reference.update(model, step=n)
            decays.append(reference.get_decay(n))
            averaged = ema.average(averaged, tree, *at(np.int32(n)))
            _assert_ema_equal(reference.module, averaged)
        assert decays[0] == 0.0 and decays[-1] == 0.8
        assert (0 < decays[1] < 0.8) == warmup  # the warm-up had effect, and reached the cap


def test_ema_in_the_jitted_train_step_is_timms_over_the_trajectory_of_the_run():
    """Updated after each optimizer update, from the new parameters and BatchNorm statistics."""
    tiny = {
        "arch": "resnet_base",
        "overrides": {"n_blocks": (1,), "n_channels": (4,), "first_kernel_size": 3},
    }
    with jax.enable_x64(True):
        model = build_model(tiny, 5, 3, dtype=jnp.float64)
        tx = optax.sgd(0.1, momentum=0.9)
        create = functools.partial(
            steps.create_train_state, jax.random.key(0, impl="rbg"), model, tx, (1, 8, 8, 3)
        )
        schedule = ema.EmaSchedule.from_config(_config(ema_decay=0.7, ema_warmup=True), 10, 10)
        state = jax.device_get(jax.jit(ema.with_ema(create))())
        train_step = jax.jit(ema.wrap_train_step(steps.make_train_step(model, tx), schedule))
        jax.tree.map(np.testing.assert_array_equal, state.ema, ema.model_variables(state))

        # timm's EMA over the same trajectory: one torch tensor per array of the state.
        holder = torch.nn.Module()
        for i, leaf in enumerate(jax.tree.leaves(ema.model_variables(state))):
            holder.register_parameter(f"v{i}", torch.nn.Parameter(torch.from_numpy(np.array(leaf)), False))
        reference = ModelEmaV3(holder, decay=0.7, use_warmup=True)
        rng = np.random.default_rng(2)
        for n in range(1, 4):
            batch = {"image": rng.normal(size=(8, 8, 8, 3)), "label": rng.integers(0, 5, 8).astype(np.int32)}
            state, _ = train_step(state, batch)
            with torch.no_grad():
                for i, leaf in enumerate(jax.tree.leaves(ema.model_variables(state))):
                    getattr(holder, f"v{i}").copy_(torch.from_numpy(np.array(leaf)))
            reference.update(holder, step=n)
            for i, leaf in enumerate(jax.tree.leaves(state.ema)):
                np.testing.assert_allclose(
                    np.asarray(leaf), getattr(reference.module, f"v{i}").numpy(), rtol=1e-12
                )
        assert not np.allclose(state.ema["params"]["fc"]["kernel"], state.params["fc"]["kernel"])


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"ema_decay": 1.0}, ["config.ema_decay must be in [0, 1)", "got 1.0"]),
        ({"ema_decay": -0.1}, ["config.ema_decay must be in [0, 1)"]),
        ({"ema_decay": 0.9, "ema_every_steps": -2}, ["config.ema_every_steps must be >= 0"]),
        ({"ema_warmup": True}, ["need config.ema_decay > 0"]),
        ({"ema_every_steps": 32}, ["need config.ema_decay > 0"]),
        ({"ema_decay": 0.9, "ema_every_steps": 32, "ema_warmup": True}, ["config.ema_warmup is timm's"]),
    ],
)
def test_bad_ema_fields_are_one_line_naming_the_field(fields, words):
    with pytest.raises(ConfigError) as e:
        validate_config(_config(**fields))
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_checkpoint_with_and_without_an_ema_differ_from_the_other_state():
    weights = {"params": {"w": np.zeros(2)}, "batch_stats": {"m": np.zeros(2)}}
    without = {"step": np.zeros(()), **weights}
    with_ema = {**without, "ema": weights}
    assert checkpoint.state_differences(without, with_ema) == ["ema is not in the checkpoint"]
    assert checkpoint.state_differences(with_ema, without) == ["ema is in the checkpoint only"]
    assert checkpoint.state_differences(with_ema, with_ema) == []


def test_eval_line_shows_the_ema_beside_the_model():
    m = {"loss": 0.5, "accuracy": 0.9, "top5_accuracy": 1.0, "num_examples": 10}
    line = eval_summary({**m, **ema.prefixed({**m, "accuracy": 0.95, "loss": 0.25})}, num_classes=3)
    assert line == "accuracy 90.00%  loss 0.5000  (10 examples);  EMA accuracy 95.00%  loss 0.2500"
    assert eval_summary(m, num_classes=3) == "accuracy 90.00%  loss 0.5000  (10 examples)"
