"""train.steps' losses against PyTorch's and timm's own: ``loss='softmax'`` as
``torch.nn.CrossEntropyLoss(label_smoothing=)`` and ``loss='bce'`` as timm's
``BinaryCrossEntropy``, at float64, on int labels and soft targets; the train step with soft
targets; and the config's one-line errors."""

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
from train import steps  # noqa: E402
from train.config import ConfigError, default_config, validate_config  # noqa: E402
from train.model import build_model  # noqa: E402

timm = import_reference("timm")
from timm.loss import BinaryCrossEntropy  # noqa: E402

B, C = 6, 5


def _logits_and_labels(kind, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (B, C))
    if kind == "int":
        return logits, rng.integers(0, C, B)
    return logits, rng.dirichlet(np.full(C, 0.3), B)  # soft: mixup-like, with values near 0 and 1


def _ours(fn, logits, labels, **kw):
    return float(jnp.mean(fn(jnp.asarray(logits), jnp.asarray(labels), **kw)))


@pytest.mark.parametrize("kind", ["int", "soft"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_softmax_equals_torch_cross_entropy(kind, smoothing, x64):
    logits, labels = _logits_and_labels(kind)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
        torch.from_numpy(logits), torch.from_numpy(labels)
    )
    loss = steps.make_loss("softmax", label_smoothing=smoothing)
    assert rel(_ours(loss, logits, labels), ref.item()) < 1e-14


@pytest.mark.parametrize("kind", ["int", "soft"])
@pytest.mark.parametrize(
    "smoothing, threshold, sum_classes",
    [(0.0, 0.0, False), (0.1, 0.0, False), (0.1, 0.2, False), (0.3, 0.0, True)],
)
def test_bce_equals_timm_binary_cross_entropy(kind, smoothing, threshold, sum_classes, x64):
    logits, labels = _logits_and_labels(kind, seed=1)
    timm_loss = BinaryCrossEntropy(
        smoothing=smoothing, target_threshold=threshold or None, sum_classes=sum_classes
    )
    ref = timm_loss(torch.from_numpy(logits), torch.from_numpy(labels))
    loss = steps.make_loss(
        "bce", label_smoothing=smoothing, bce_target_threshold=threshold, bce_sum=sum_classes
    )
    assert rel(_ours(loss, logits, labels), ref.item()) < 1e-14


def test_bce_gradient_equals_timm(x64):
    logits, labels = _logits_and_labels("soft", seed=2)
    t = torch.from_numpy(logits).requires_grad_()
    BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(t, torch.from_numpy(labels)).backward()
    loss = steps.make_loss("bce", label_smoothing=0.1, bce_target_threshold=0.2)
    grad = jax.grad(lambda z: jnp.mean(loss(z, jnp.asarray(labels))))(jnp.asarray(logits))
    assert rel(grad, t.grad.numpy()) < 1e-14


def test_train_step_takes_soft_targets_and_reports_timm_bce():
    model = build_model({"arch": "resnet_base", "overrides": {"n_blocks": (1,), "n_channels": (8,)}}, C, 3)
    key = jax.random.key(0, impl="rbg")
    state = steps.create_train_state(key, model, optax.sgd(0.1), (1, 8, 8, 3))
    rng = np.random.default_rng(3)
    image = rng.normal(size=(B, 8, 8, 3)).astype(np.float32)
    soft = rng.dirichlet(np.ones(C), B).astype(np.float32)
    step = steps.make_train_step(model, optax.sgd(0.1), loss="bce", bce_target_threshold=0.2)
    _, metrics = jax.jit(step)(state, {"image": image, "label": soft})
    logits, _ = model.apply(state.variables, image, train=True, mutable=["batch_stats"])
    ref = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2)(
        torch.from_numpy(np.array(logits)), torch.from_numpy(soft)
    )
    np.testing.assert_allclose(float(metrics["loss"]), ref.item(), rtol=1e-5)
    top1 = np.mean(np.asarray(logits).argmax(-1) == soft.argmax(-1))
    assert float(metrics["accuracy"]) == pytest.approx(top1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss", "focal", "config.loss='focal' is not valid; choose one of: softmax, bce."),
        ("bce_target_threshold", 1.5, "config.bce_target_threshold must be in [0, 1); got 1.5."),
    ],
)
def test_bad_loss_fields_are_one_line_errors(field, value, message):
    c = default_config()
    c[field] = value
    with pytest.raises(ConfigError) as e:
        validate_config(c, device_count=1, process_count=1)
    assert str(e.value) == message
