"""train.optim's ``grad_clip_norm`` and ``optimizer='adamw'`` against PyTorch's own
(``torch.nn.utils.clip_grad_norm_``, ``torch.optim.AdamW`` with timm's no-decay group for
BatchNorm and biases) at float64, and the config's one-line errors."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_jax.parity import rel  # noqa: E402
from resnet_jax.torch_reference import import_reference  # noqa: E402
from train import optim  # noqa: E402
from train.config import ConfigError, default_config, validate_config  # noqa: E402

SHAPES = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}, "fc": {"kernel": (4, 3)}}


def _tree(rng, scale=1.0):
    return jax.tree.map(lambda s: rng.normal(0, scale, s), SHAPES, is_leaf=lambda s: isinstance(s, tuple))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_grad_clip_equals_torch_clip_grad_norm(max_norm, x64):
    grads = _tree(np.random.default_rng(0))
    ours, _ = optim.clip_by_global_norm(max_norm).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
    leaves = [torch.from_numpy(g.copy()).requires_grad_() for g in jax.tree.leaves(grads)]
    for t in leaves:
        t.grad = t.detach().clone()
    torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    for a, t in zip(jax.tree.leaves(ours), leaves):
        assert rel(a, t.grad.numpy()) < 1e-15
    if max_norm > 1e2:  # nothing to clip: the gradients unchanged, bit for bit
        assert all(np.array_equal(a, g) for a, g in zip(jax.tree.leaves(ours), jax.tree.leaves(grads)))


def test_adamw_with_clipping_equals_torch_for_three_steps(x64):
    c = default_config()
    c.optimizer, c.weight_decay, c.opt_betas, c.opt_eps, c.grad_clip_norm = (
        "adamw",
        0.05,
        (0.8, 0.99),
        1e-7,
        2.0,
    )
    lr = 3e-3
    tx = optim.create_optimizer(c, optax.constant_schedule(lr))
    rng = np.random.default_rng(1)
    params = _tree(rng)
    grads = [_tree(rng, scale) for scale in (3.0, 0.1, 1.0)]  # clipped, not clipped, clipped

    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)

    flat = jax.tree.leaves(params)
    tp = [torch.from_numpy(a.copy()).requires_grad_() for a in flat]
    groups = [  # timm's param_groups_weight_decay: no decay for 1-D parameters (BatchNorm, biases)
        {"params": [t for t in tp if t.ndim > 1], "weight_decay": 0.05},
        {"params": [t for t in tp if t.ndim <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.8, 0.99), eps=1e-7)
    for g in grads:
        for t, a in zip(tp, jax.tree.leaves(g)):
            t.grad = torch.from_numpy(a.copy())
        torch.nn.utils.clip_grad_norm_(tp, 2.0)
        opt.step()
    for a, t in zip(jax.tree.leaves(p), tp):
        assert rel(a, t.detach().numpy()) < 1e-13


@pytest.mark.parametrize("kind, decay_all", [("lamb", False), ("lambc", True)])
def test_lamb_equals_timm_lamb_for_five_steps(kind, decay_all, x64):
    """timm's Lamb with timm's parameter groups (no decay and so no trust ratio for BatchNorm and
    biases), its built-in clipping at max_grad_norm=1 triggering on some steps, a scheduled rate;
    with decay_all every parameter is decayed, including a zero one (trust ratio 1)."""
    import_reference("timm")
    from timm.optim import Lamb

    c = default_config()
    c.optimizer, c.weight_decay, c.opt_betas, c.opt_eps = kind, 0.02, (0.85, 0.99), 1e-6
    c.weight_decay_on_bn_and_bias = decay_all
    schedule = optax.linear_schedule(0.05, 0.01, 5)
    tx = optim.create_optimizer(c, schedule)
    rng = np.random.default_rng(2)
    params = _tree(rng, 2.0)
    params["bn"]["bias"] = np.zeros(4)
    scales = (3.0, 0.05, 1.0, 0.02, 0.5)  # global norms about 29, 0.5, 10, 0.2, 5
    grads = [_tree(rng, scale) for scale in scales]

    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)

    tp = [torch.from_numpy(a.copy()).requires_grad_() for a in jax.tree.leaves(params)]
    if decay_all:
        groups = [{"params": tp, "weight_decay": 0.02}]
    else:
        groups = [
            {"params": [t for t in tp if t.ndim > 1], "weight_decay": 0.02},
            {"params": [t for t in tp if t.ndim <= 1], "weight_decay": 0.0},
        ]
    opt = Lamb(groups, lr=0.05, betas=(0.85, 0.99), eps=1e-6, trust_clip=kind == "lambc")
    for i, g in enumerate(grads):
        for group in opt.param_groups:
            # the rate the optimizer reads: the schedule at its int32 step count
            group["lr"] = float(schedule(jnp.asarray(i, jnp.int32)))
        for t, a in zip(tp, jax.tree.leaves(g)):
            t.grad = torch.from_numpy(a.copy())
        opt.step()
    diff = max(np.max(np.abs(np.asarray(a) - t.detach().numpy())) for a, t in zip(jax.tree.leaves(p), tp))
    assert diff < 1e-12


def _mlperf_lars_reference(params, grads, lrs, momentum, wd, eeta, eps, nesterov):
    """The MLPerf ResNet-50 reference's LARSOptimizer._resource_apply_dense (mlcommons/training
    image_classification/tensorflow2/lars_optimizer.py), transcribed to NumPy on a flat dict of
    named variables, with its skip_list from common.py matched against the names."""
    skip_list = ["batch_normalization", "bias", "bn"]
    var = {k: v.copy() for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in params.items()}
    for g_step, lr in zip(grads, lrs):
        for name in var:
            grad, scaled_lr = g_step[name], lr
            if not any(s in name for s in skip_list):  # compute_lr
                w_norm, g_norm = np.linalg.norm(var[name]), np.linalg.norm(grad)
                trust_ratio = (
                    eeta * w_norm / (g_norm + wd * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
                )
                scaled_lr = lr * trust_ratio
                grad = grad + wd * var[name]
            mom[name] = mom[name] * momentum - grad * scaled_lr
            if nesterov:
                var[name] = var[name] + mom[name] * momentum - grad * scaled_lr
            else:
                var[name] = var[name] + mom[name]
    return var


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_equals_the_mlperf_reference_for_four_steps(nesterov, x64):
    """Kernels get the reference's trust ratio eta*||w|| / (||g|| + wd*||w|| + eps) and weight
    decay, BatchNorm parameters and biases plain momentum; a zero kernel (fc, as a zero-initialised
    head) takes ratio 1 on its first step."""
    c = default_config()
    c.optimizer, c.weight_decay, c.momentum, c.nesterov = "lars", 2e-4, 0.9, nesterov
    c.lars_trust_coefficient, c.lars_eps = 0.001, 1e-7
    schedule = optax.linear_schedule(2.0, 10.0, 4)
    tx = optim.create_optimizer(c, schedule)
    rng = np.random.default_rng(3)
    params = _tree(rng)
    params["fc"]["kernel"] = np.zeros(SHAPES["fc"]["kernel"])
    grads = [_tree(rng, scale) for scale in (1.0, 0.01, 3.0, 0.3)]

    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)

    named = lambda tree: {f"{a}/{b}": v for a, d in tree.items() for b, v in d.items()}  # noqa: E731
    lrs = [float(schedule(jnp.asarray(i, jnp.int32))) for i in range(4)]  # the rates tx reads
    want = _mlperf_lars_reference(
        named(params), [named(g) for g in grads], lrs, 0.9, 2e-4, 0.001, 1e-7, nesterov
    )
    got = named(jax.tree.map(np.asarray, p))
    assert max(np.max(np.abs(got[k] - want[k])) for k in want) < 1e-12
    assert np.abs(got["fc/kernel"]).max() > 0  # the zero kernel moved


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "optimizer",
            "adam",
            "config.optimizer='adam' is not valid; choose one of: sgd, lars, adamw, lamb, lambc.",
        ),
        ("grad_clip_norm", -1.0, "config.grad_clip_norm must be >= 0 (0: off); got -1.0."),
        ("opt_betas", (0.9, 1.0), "config.opt_betas must be two numbers in [0, 1); got (0.9, 1.0)."),
    ],
)
def test_bad_optimizer_fields_are_one_line_errors(field, value, message):
    c = default_config()
    c[field] = value
    with pytest.raises(ConfigError) as e:
        validate_config(c, device_count=1, process_count=1)
    assert str(e.value) == message
