"""Gradient accumulation (train/accum.py, ``grad_accum_steps``) against PyTorch's own: k forward
and backward passes in train mode, each loss divided by k, then one ``optimizer.step()``, at
float64 on a tiny ResNet whose weights are copied from the PyTorch twin."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import resnet_jax
from resnet_jax.convert import torch_to_flax
from resnet_jax.torch_reference import TorchResNetBase, randomize_batchnorm
from train import steps
from train.config import ConfigError, default_config, validate_config

K, B, SIZE = 2, 4, 16
# labml's ResNetBase with one 8-channel stage (its pooled features are the logits): the
# smallest network with a residual block and three BatchNorms, quick to compile.
ARCH = dict(n_blocks=(1,), n_channels=(8,), first_kernel_size=3)
CLASSES = 8


def _torch_accumulated(tmodel, x, y, lr, momentum):
    """A PyTorch loop with accumulation: micro-batch j is rows j, j + K, ... (train/accum.py)."""
    opt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum)
    tmodel.train()
    opt.zero_grad()
    for j in range(K):
        loss = torch.nn.functional.cross_entropy(tmodel(x[j::K]), y[j::K]) / K
        loss.backward()
    opt.step()


def test_two_micro_batches_equal_pytorch_accumulation(x64):
    torch.manual_seed(0)
    tmodel = randomize_batchnorm(TorchResNetBase(**ARCH).double(), seed=1)
    fmodel = resnet_jax.ResNetBase(**ARCH, dtype=jnp.float64, param_dtype=jnp.float64)
    variables = torch_to_flax(tmodel.state_dict(), fmodel)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (B,), generator=gen)

    tx = optax.sgd(0.1, momentum=0.9)
    params = jax.tree.map(jnp.asarray, variables["params"])
    state = steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]),
        opt_state=tx.init(params),
    )
    batch = {"image": jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), "label": jnp.asarray(y.numpy())}
    new_state, metrics = jax.jit(steps.make_train_step(fmodel, tx, grad_accum_steps=K))(state, batch)

    _torch_accumulated(tmodel, x, y, 0.1, 0.9)
    want = torch_to_flax(tmodel.state_dict(), fmodel)
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
        {"params": new_state.params, "batch_stats": new_state.batch_stats},
        want,
    )
    assert max(jax.tree.leaves(diffs)) < 1e-10, diffs
    # The running statistics moved twice: one update would leave them elsewhere.
    moved = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.batch_stats, want["batch_stats"]
        )
    )
    assert min(moved) > 1e-3


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"grad_accum_steps": 3, "batch_size": 64},
            "config.grad_accum_steps=3 must divide the per-device batch (64 over 2 devices = 32 rows).",
        ),
        (
            {"grad_accum_steps": 2, "dtype": "float16"},
            "config.grad_accum_steps > 1 does not support dtype='float16' (loss scaling); use bfloat16.",
        ),
        (
            {"grad_accum_steps": -1},
            "config.grad_accum_steps must be a whole number >= 0 (0 or 1: off); got -1.",
        ),
    ],
)
def test_bad_grad_accum_steps_are_one_line_errors(fields, message):
    c = default_config()
    for k, v in fields.items():
        c[k] = v
    with pytest.raises(ConfigError) as e:
        validate_config(c, device_count=2, process_count=1)
    assert str(e.value) == message


def test_micro_batches_mix_first_and_draw_drop_path_keyed_on_step_and_index():
    """With mixup and drop path: the whole batch is mixed first (row i with row B-1-i, across
    micro-batches), then micro-batch j runs with the step's dropout key folded with j, BatchNorm
    statistics carried from one to the next: the loss and statistics equal that sequence written
    out with the model and train/mixup.py directly."""
    from train import build
    from train.mixup import MixupOptions, mix_in_step
    from train.model import build_model

    config = default_config()
    config.model.drop_path_rate, config.mixup_alpha, config.grad_accum_steps = 0.5, 1.0, K
    config.model.overrides.stage_sizes, config.rng_impl = (1,), "rbg"  # quick to compile
    model = build_model(config.model, 5, 3)
    key, mixup = build.dropout_rng(config), MixupOptions.from_config(config, 5)
    tx = optax.sgd(0.0)
    state = steps.create_train_state(jax.random.key(0, impl="rbg"), model, tx, (1, 8, 8, 3))
    state = state.replace(step=jnp.int32(3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(B, 8, 8, 3)).astype(np.float32), "label": np.arange(B) % 5}
    step = jax.jit(steps.make_train_step(model, tx, dropout_rng=key, mixup=mixup, grad_accum_steps=K))
    new_state, metrics = step(state, batch)

    mixed = jax.jit(lambda step, x, y: mix_in_step(mixup, step, x, y, None))
    images, targets = mixed(state.step, batch["image"], batch["label"])
    apply = jax.jit(
        lambda v, x, k: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})
    )
    stats, losses = state.batch_stats, []
    for j in range(K):
        micro_key = jax.random.fold_in(jax.random.fold_in(key, 3), j)
        logits, updates = apply({"params": state.params, "batch_stats": stats}, images[j::K], micro_key)
        stats = updates["batch_stats"]
        losses.append(float(jnp.mean(steps.soft_cross_entropy(logits, targets[j::K]))))
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-6)
    for got, want in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(stats)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
