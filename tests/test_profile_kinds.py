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


def test_an_inference_program_is_all_forward_pass():
    """cpu_inference --profile: no autodiff names, so nothing may be taken for the optimizer."""

    def forward(w, x):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(y * 2.0 + 1.0)

    table = profile_ops.parse_hlo(
        jax.jit(forward).lower(jnp.ones((3, 3, 2, 4)), jnp.ones((1, 8, 8, 2))).compile().as_text()
    )
    named = {op: info for op, info in table.items() if info["op_name"]}
    assert any(info["has_conv"] for info in named.values())
    as_step = {profile_ops.categorize(op, info, set()) for op, info in named.items()}
    as_inference = {profile_ops.categorize(op, info, set(), forward_only=True) for op, info in named.items()}
    assert "optimizer" in as_step  # the training-step rule misreads an inference program
    assert "optimizer" not in as_inference and "convolution" in as_inference
    assert {profile_ops.phase(c, None, forward_only=True) for c in as_inference} == {"forward"}


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_layers_times_pytorchs_own_gradients_of_the_same_layer(x64, stride):
    """benchmarks.conv_layers --compare-torch: PyTorch's three parts compute what XLA's do."""
    from benchmarks import conv_layers

    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 9, 9, 3), jnp.float64)
    w = jax.random.normal(k[1], (3, 3, 3, 5), jnp.float64)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), [(1, 1)] * 2, dimension_numbers=conv_layers.NHWC
        )

    y, vjp = jax.vjp(conv, x, w)
    dy = jax.random.normal(k[2], y.shape, jnp.float64)
    dx, dw = vjp(dy)
    parts = conv_layers._torch_parts(x, w, dy, stride, 1)
    (fwd, *a_f), (in_grad, *a_i), (w_grad, *a_w) = (
        parts[p] for p in ("torch_forward", "torch_input_grad", "torch_weight_grad")
    )
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    assert fwd(*a_f).dtype == torch.float64
    assert abs(to_nhwc(fwd(*a_f)) - y).max() < 1e-12
    assert abs(to_nhwc(in_grad(*a_i)[0]) - dx).max() < 1e-12
    assert abs(w_grad(*a_w)[1].numpy().transpose(2, 3, 1, 0) - dw).max() < 1e-12


def test_cpu_elementwise_pins_each_side_to_the_cores_asked(tmp_path):
    """benchmarks.cpu_elementwise: the one-core child really has one core, and PyTorch sized its
    thread pool to it (else the scaling it reports would be meaningless)."""
    import json
    import os

    from benchmarks import cpu_elementwise

    out = tmp_path / "e.json"
    cpu_elementwise.main(["--shape=2,4,4,8", "--rounds=1", "--cores=1,all", f"--output={out}"])
    one, every = json.loads(out.read_text())["rows"]
    assert one["cores"] == 1 and one["torch_threads"] == 1
    assert every["cores"] == len(os.sched_getaffinity(0))
    assert all(v > 0 for row in (one, every) for k, v in row.items() if k.endswith("_ms"))
