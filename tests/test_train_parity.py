"""``python -m train.parity``: this program's train step (``train.build.build_steps``) against the
same recipe built from PyTorch's, timm's and torchvision's own components, at float64, step by
step; and the one-line refusal of a config field it does not check yet.

Small on purpose: the digits config's network (ResNet-18 blocks, two stages, 3x3 stem) at 16 px;
``rng_impl='rbg'`` compiles the initialisation in seconds on a CPU. The references run at
ImageNet sizes are in docs/training.md (Recipes), not here.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from train import parity
from train.config import default_config

ROOT = Path(__file__).resolve().parent.parent


def test_cli_sgd_with_mixup_cutmix_drop_path_dropout_and_smoothing_equals_pytorch(tmp_path):
    """SGD (Nesterov, weight decay off BatchNorm and biases) under a warm-up and cosine from timm's
    scheduler; per-row mixup or cutmix through timm's ``Mixup``; timm's ``DropPath`` and dropout
    given our masks; ``CrossEntropyLoss`` on smoothed soft targets. Hyphenated flags, --json."""
    out = tmp_path / "rows.json"
    args = [
        "--config=configs/default.py", "--config.mixup_alpha=0.8", "--config.cutmix_alpha=1.0",
        "--config.mixup_mode=elem", "--config.label_smoothing=0.1", "--config.model.drop_path_rate=0.3",
        "--config.model.drop_rate=0.2", "--config.rng_impl=rbg", "--steps=3", "--image-size=16",
        "--batch=8", f"--json={out}",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "train.parity", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("PASS")
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["reference"] == "timm" and len(rows) == 3
    assert result["max_diff"] < 1e-10
    for r in rows:
        assert max(r["loss_diff"], r["lr_diff"], r["params_diff"], r["batch_stats_diff"]) < 1e-10
        # The second block's drop path (the first one's rate is 0, as timm's) and the head's dropout.
        assert r["masks"] == 2 and r["masks_match"] and r["dropped"] > 0
        assert any(lam != 1.0 for lam in r["lam"])  # rows were mixed
    # The warm-up step (rate 0), then the peak: a float64 run's rates are float64 (they were
    # float32 under optax's warm-up ramp, which the parameters' difference showed).
    assert [r["learning_rate"] for r in rows[:2]] == [0.0, 0.1]


def _config(**fields):
    config = default_config()
    config.rng_impl = "rbg"
    for name, value in fields.items():
        node = config
        *parents, leaf = name.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@pytest.mark.parametrize(
    "backbone",
    [
        {"backbone_lr_multiplier": 0.1},
        # PyTorch's clip_grad_norm_ then sees only the head's gradients (the frozen parameters
        # have none), so the norm clipped is the head's alone.
        {"freeze_backbone": True},
    ],
    ids=["backbone_at_a_tenth", "frozen_backbone"],
)
def test_adamw_bce_grad_clip_cutmix_minmax_and_backbone_multiplier_equal_pytorch(backbone):
    """``torch.optim.AdamW``, timm's ``BinaryCrossEntropy`` (target threshold) on cutmix targets
    (timm's ``rand_bbox_minmax`` boxes, per pair), ``clip_grad_norm_`` (a small norm, so it clips),
    the backbone at a tenth of the rate or frozen (``requires_grad=False`` in PyTorch), and timm's
    polynomial schedule."""
    config = _config(
        optimizer="adamw", learning_rate=0.01, weight_decay=0.05, loss="bce", bce_target_threshold=0.2,
        cutmix_minmax=(0.2, 0.8), mixup_mode="pair", grad_clip_norm=0.02, lr_schedule="polynomial",
        end_learning_rate=1e-4, warmup_epochs=0.0, num_epochs=4, **backbone,
    )  # fmt: skip
    with jax.enable_x64(True):
        result = parity.run_parity(config, steps=3, image_size=16, batch=8)
    assert result["ok"], parity.format_table(result)
    assert result["max_diff"] < 1e-10
    assert all(len(r["lam"]) == 4 and r["masks"] == 0 for r in result["rows"])  # 4 pairs, no masks
    norms = [r["torch_clipped_norm"] for r in result["rows"]]
    assert all(n > 0.02 for n in norms), norms  # clipped every step
    if "freeze_backbone" in backbone:  # the head's norm, below that of every gradient (ours)
        assert all(r["torch_clipped_norm"] < r["grad_norm"] for r in result["rows"]), result["rows"]
    assert result["rows"][2]["learning_rate"] < result["rows"][0]["learning_rate"] == 0.01


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"model.overrides.attn_layer": "se"},
            "config.model.overrides.attn_layer: not yet checked by train.parity; it checks stage_sizes, "
            "small_stem, zero_init_residual, bn_variance, bn_recompute, bn_fused.",
        ),
    ],
)
def test_an_unchecked_setting_is_refused_in_one_line(fields, message):
    with jax.enable_x64(True):
        with pytest.raises(parity.Unsupported) as e:
            parity.run_parity(_config(**fields))
    assert str(e.value) == message


def test_a_field_unknown_to_the_check_is_refused_when_set():
    """A field another ingredient adds (here a stand-in) is refused when it is not at its default,
    and passes at its default: nothing is silently left out of the comparison."""
    config = _config()
    with config.unlocked():
        config.new_ingredient = 0.5
    assert parity.unsupported(config) == (
        "config.new_ingredient=0.5: not yet checked by train.parity"
        " (its PyTorch side has no counterpart yet)."
    )
    assert parity.unsupported(_config()) is None


def test_lamb_timm_warmup_min_lr_grad_accum_drop_path_and_ema_warmup_equal_pytorch():
    """timm's ``Lamb`` (its own clipping at ``max_grad_norm``) under timm's ``CosineLRScheduler``
    (an absolute ``warmup_lr_init``, ``lr_min``, ``warmup_prefix=False``), two backward passes of
    loss / 2 on the rows 0, 2 and 1, 3 before each step, each with its own drop-path and dropout
    masks (drawn inside our micro-batches' scan), and timm's ``ModelEmaV3`` with its decay
    warm-up: parameters, BatchNorm statistics and the EMA within 1e-10 of PyTorch's."""
    config = _config(
        optimizer="lamb", learning_rate=0.01, weight_decay=0.02, opt_eps=1e-6, lamb_max_grad_norm=0.5,
        warmup_epochs=1.0, warmup_lr=0.001, min_lr=0.002, warmup_prefix=False, num_epochs=4,
        grad_accum_steps=2, ema_decay=0.9, ema_warmup=True, **{"model.drop_path_rate": 0.5},
        **{"model.drop_rate": 0.5},
    )  # fmt: skip
    with jax.enable_x64(True):
        result = parity.run_parity(config, steps=3, image_size=16, batch=4)
    assert result["ok"], parity.format_table(result)
    rows = result["rows"]
    assert max(max(r["params_diff"], r["batch_stats_diff"], r["ema_diff"]) for r in rows) < 1e-10
    # Per micro-batch: the second block's drop path and the head's dropout, as timm asked for them.
    assert all(r["masks"] == 4 and r["masks_match"] for r in rows), rows
    assert sum(r["dropped"] for r in rows) > 0
    # The warm-up's start rate, then the cosine read at steps 1 and 2 of 4 (no prefix), from the
    # peak 0.01 to min_lr 0.002.
    expected = [0.001, 0.002 + 0.004 * (1 + math.cos(math.pi / 4)), 0.006]
    assert all(abs(r["learning_rate"] - e) < 1e-15 for r, e in zip(rows, expected)), rows
