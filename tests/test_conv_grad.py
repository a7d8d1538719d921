"""The CPU convolutions of ``resnet_jax.conv_grad`` and ``resnet_jax.platform``: PyTorch's own
convolution gradients as the reference (float64), in both CPU modes (the per-tap weight gradient
where YNNPACK runs convolutions, XLA's own where Eigen does); XLA's kept where the program is for
another platform or the switch is off; and the flag ``import resnet_jax`` gives XLA:CPU."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from resnet_jax import conv_grad, sharding

NHWC = ("NHWC", "HWIO", "NHWC")
# (kernel, stride, padding): ResNet's 1x1 and 3x3 convolutions, stride 1 and 2, and the 7x7 stem;
# the last has the asymmetric padding of a "SAME" stride-2 convolution.
SHAPES = [(1, 1, (0, 0)), (1, 2, (0, 0)), (3, 1, (1, 1)), (3, 2, (1, 1)), (7, 2, (3, 3)), (3, 2, (0, 1))]


def _conv(x, w, stride, pad):
    return sharding.conv_general_dilated(x, w, (stride, stride), [pad, pad], dimension_numbers=NHWC)


@pytest.fixture(params=["taps", "eigen"])
def mode(request, monkeypatch):
    """Either CPU mode: the per-tap weight gradient (YNNPACK's convolutions), or XLA's own
    (Eigen's); 1x1 convolutions are matmuls in both."""
    if request.param == "taps":
        monkeypatch.setenv(conv_grad.ENV_VAR, "taps")
    else:
        monkeypatch.setattr(conv_grad, "ynn_convolutions", lambda: False)
    return request.param


@pytest.mark.parametrize("kernel, stride, pad", SHAPES)
def test_gradients_are_pytorchs_in_float64(kernel, stride, pad, x64, mode):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.normal(size=(2, 13, 11, 5))
    w = rng.normal(size=(kernel, kernel, 5, 6))
    y, vjp = jax.vjp(lambda x, w: _conv(x, w, stride, pad), jnp.asarray(x), jnp.asarray(w))
    dy = rng.normal(size=y.shape)
    dx, dw = vjp(jnp.asarray(dy))

    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
    # PyTorch pads symmetrically: pad the input itself for the asymmetric case.
    padded = torch.nn.functional.pad(tx, (pad[0], pad[1], pad[0], pad[1]))
    ty = torch.nn.functional.conv2d(padded, tw, stride=stride)
    ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(
        np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dw), tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-12, atol=1e-12)


def test_forward_mode_is_xlas_with_the_switch_off(monkeypatch, x64):
    rng = np.random.default_rng(0)
    x, w, dx, dw = (jnp.asarray(rng.normal(size=s)) for s in [(2, 9, 9, 4), (3, 3, 4, 6)] * 2)
    monkeypatch.setenv(conv_grad.ENV_VAR, "taps")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x, w: _conv(x, w, 2, (1, 1)), (x, w), (dx, dw))
    monkeypatch.setenv(conv_grad.ENV_VAR, "off")
    ours = jax.jvp(lambda x, w: _conv(x, w, 2, (1, 1)), (x, w), (dx, dw))
    xla = jax.jvp(
        lambda x, w: lax.conv_general_dilated(x, w, (2, 2), [(1, 1)] * 2, dimension_numbers=NHWC),
        (x, w),
        (dx, dw),
    )
    np.testing.assert_array_equal(ours[1], xla[1])


def _convolutions(text: str) -> int:
    return text.count("stablehlo.convolution")


def _grad(x, w):
    return jax.grad(lambda x, w: jnp.sum(_conv(x, w, 2, (1, 1)) ** 2), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("ynn", [True, False])
def test_weight_gradient_is_matmuls_only_where_ynnpack_convolves(monkeypatch, ynn):
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
    monkeypatch.setattr(conv_grad, "ynn_convolutions", lambda: ynn)
    # With YNNPACK's convolutions, forward and input gradient stay convolutions and the weight
    # gradient is matmuls; with Eigen's, all three are XLA's. (A new function each time: JAX
    # reuses a function's trace, and the choice is made while tracing.)
    assert _convolutions(jax.jit(lambda x, w: _grad(x, w)).lower(x, w).as_text()) == (2 if ynn else 3)
    monkeypatch.setenv(conv_grad.ENV_VAR, "taps")
    assert _convolutions(jax.jit(lambda x, w: _grad(x, w)).lower(x, w).as_text()) == 2
    monkeypatch.setenv(conv_grad.ENV_VAR, "0")
    assert _convolutions(jax.jit(lambda x, w: _grad(x, w)).lower(x, w).as_text()) == 3  # XLA's own


def test_cpu_program_has_no_pointwise_convolution():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((1, 1, 4, 8))

    def grad(x, w):
        return jax.grad(lambda x, w: jnp.sum(_conv(x, w, 2, (0, 0)) ** 2), argnums=(0, 1))(x, w)

    # A 1x1 convolution is a matmul of the (strided) pixels, forward and both gradients.
    assert _convolutions(jax.jit(grad).lower(x, w).as_text()) == 0
    assert _convolutions(jax.export.export(jax.jit(grad), platforms=["tpu"])(x, w).mlir_module()) == 3


def test_program_for_another_platform_keeps_xlas_weight_gradient(monkeypatch):
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
    monkeypatch.setenv(conv_grad.ENV_VAR, "taps")
    exported = jax.export.export(jax.jit(_grad), platforms=["tpu"])(x, w)
    assert _convolutions(exported.mlir_module()) == 3


def test_where_it_does_not_apply_xla_convolves(monkeypatch):
    monkeypatch.setenv(conv_grad.ENV_VAR, "taps")
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 2, 8))
    # Grouped (ResNeXt) and dilated convolutions, and string padding, are XLA's alone.
    assert (
        conv_grad.conv(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=NHWC, feature_group_count=2) is None
    )
    w = jnp.ones((3, 3, 4, 8))
    assert conv_grad.conv(x, w, (1, 1), [(2, 2), (2, 2)], rhs_dilation=(2, 2), dimension_numbers=NHWC) is None
    assert conv_grad.conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC) is None
    assert conv_grad.conv(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=NHWC) is not None
    out = lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=NHWC)
    np.testing.assert_array_equal(conv_grad.conv(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=NHWC), out)


_PROBE = """
import json, os, sys
if sys.argv[1] == "jax-first":
    import jax; jax.numpy.zeros(1)  # a backend started before resnet_jax is imported
import resnet_jax
from resnet_jax import conv_grad
flags = os.environ.get("XLA_FLAGS")
print(json.dumps([flags, conv_grad.ynn_convolutions(), conv_grad.weight_grad_as_taps()]))
"""


def _fresh_process(order: str, **env: str) -> list:
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", conv_grad.ENV_VAR)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, order],
        env={**clean, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_gives_xla_cpu_eigens_convolutions_unless_told_otherwise():
    from resnet_jax import platform

    user = "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    # A fresh process: the flag is appended to the user's others, XLA:CPU compiles convolutions
    # without YNNPACK, and the weight gradient is XLA's own.
    assert _fresh_process("import-first", XLA_FLAGS="--xla_cpu_enable_fast_math=false") == [
        f"--xla_cpu_enable_fast_math=false {platform.CPU_XLA_FLAG}",
        False,
        False,
    ]
    # The user's own YNNPACK choice stands, and then the weight gradient is the per-tap matmuls.
    assert _fresh_process("import-first", XLA_FLAGS=user) == [user, True, True]
    # Too late (JAX started first) or switched off: nothing appended, YNNPACK's convolutions seen.
    assert _fresh_process("jax-first") == [None, True, True]
    assert _fresh_process("import-first", **{conv_grad.ENV_VAR: "0"}) == [None, True, False]


def test_pointwise_weight_gradient_takes_the_output_gradient_as_it_is():
    """A 1x1 convolution is rows times the kernel: then XLA:CPU's weight-gradient dot contracts
    both operands' leading axis, and no elementwise producer has to write its output transposed
    for it (a 4-D dot_general did, 36 times in a ResNet-50 step; BENCHMARKS.md section 5)."""
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((1, 1, 16, 32))

    def loss(x, w):
        return jnp.sum(jax.nn.relu(_conv(jax.nn.relu(x * 2.0 + 1.0), w, 1, (0, 0)) * 3.0 - 1.0) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    dots = [line for line in text.splitlines() if " dot(" in line]
    assert dots and not any("lhs_contracting_dims={0}, rhs_contracting_dims={1}" in d for d in dots)
