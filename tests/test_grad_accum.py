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


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


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
