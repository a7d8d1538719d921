"""The profile summaries of issue 47: PyTorch's step by op kind and phase (``benchmarks/profile_torch.py``)
and XLA's instructions by phase (``benchmarks/profile_ops.py``), on tiny real steps."""

import jax
import jax.numpy as jnp
import pytest
import torch

from benchmarks import profile_ops, profile_torch


def test_torch_step_is_split_by_kind_and_phase():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    got = profile_torch.summarize(step, steps=2)
    phases = got["phase_category_ms_per_step"]
    # PyTorch's own operator names put the convolution in both passes, the SGD update apart.
    assert phases["forward"]["convolution"] > 0 and phases["backward"]["convolution"] > 0
    assert phases["optimizer"]["optimizer"] > 0 and phases["forward"]["optimizer"] == 0
    assert phases["forward"]["matmul"] > 0 and phases["backward"]["batchnorm_elementwise"] > 0
    total = sum(sum(c.values()) for c in phases.values())
    assert (
        total
        == pytest.approx(got["cpu_time_ms_per_step"])
        == pytest.approx(sum(got["category_ms_per_step"].values()))
    )


def test_xla_instructions_get_their_phase_from_their_op_name():
    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    step = jax.jit(lambda w, x: w - 0.1 * jax.grad(loss)(w, x))
    table = profile_ops.parse_hlo(step.lower(jnp.ones((4, 4)), jnp.ones((2, 4))).compile().as_text())
    phases = {profile_ops.phase("matmul", info) for info in table.values() if info["has_dot"]}
    assert {"forward", "backward"} <= phases  # x @ w, and its transpose for the gradient
    assert (
        profile_ops.phase("optimizer", None) == "optimizer"
        and profile_ops.phase("copy_other", None) == "other"
    )
