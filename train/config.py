"""The config's defaults (``configs/default.py``, the one place they live), and the checks that
fail fast with one clear sentence instead of a traceback deep in JAX."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

from train import optim, parallel, schedules, steps
from train.data import eval_resize, registry
from train.data.augment import TRAIN_AUGMENTATIONS
from train.data.autoaugment import make_policy
from train.data.core import DatasetError
from train.data.erase import ERASE_MODES
from train.mixup import MixupOptions
from train.model import BASE_ARCH, DTYPES, architectures, check_overrides, resolve_dtype

# Every field train/ reads is defined here, with its comment and default (configs/ is not a
# package: it is run by its path, as --config=configs/default.py does).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"


class ConfigError(ValueError):
    """The config cannot work; the message names the field and how to fix it."""


def default_config() -> Any:
    """A fresh ``ConfigDict`` of ``configs/default.py``: every field with its default."""
    return runpy.run_path(str(DEFAULT_CONFIG))["get_config"]()


def with_defaults(saved: dict) -> Any:
    """``saved`` (a run's config.json) over ``default_config()``: a run written before a field
    existed reads that field's default. Free dicts (``model.overrides``) are taken whole."""

    def merge(defaults: Any, values: dict) -> None:
        for key, value in values.items():
            current = defaults[key] if key in defaults else None
            if isinstance(value, dict) and getattr(current, "is_type_safe", False):
                merge(current, value)
            else:
                with defaults.ignore_type():
                    defaults[key] = value

    config = default_config()
    merge(config, saved)
    return config


def _choice(config: Any, field: str, choices) -> None:
    value = config[field]
    if value not in choices:
        raise ConfigError(
            f"config.{field}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}."
        )


def _check_fine_tuning(config: Any) -> None:
    multiplier = float(config.backbone_lr_multiplier)
    if multiplier < 0:
        raise ConfigError(f"config.backbone_lr_multiplier must be >= 0; got {multiplier}.")
    if config.freeze_backbone and multiplier != 1.0:
        raise ConfigError(
            "config.freeze_backbone=True and config.backbone_lr_multiplier != 1 contradict each "
            "other; set one of them."
        )
    if config.init_from and config.init_from_torch:
        raise ConfigError("set config.init_from or its older name config.init_from_torch, not both.")


def _check_random_erase(config: Any) -> None:
    if not 0.0 <= config.random_erase_prob <= 1.0:
        raise ConfigError(
            f"config.random_erase_prob must be in [0, 1] (0: off); got {config.random_erase_prob}."
        )
    if config.random_erase_prob > 0:
        _choice(config, "random_erase_mode", ERASE_MODES)
        if not registry.get(config.dataset).random_erase:
            raise ConfigError(
                f"config.random_erase_prob is implemented for dataset='image_folder' and TFDS sets; "
                f"got dataset={config.dataset!r}."
            )
    for field, top in (("random_erase_scale", 1.0), ("random_erase_ratio", float("inf"))):
        lo, hi = config[field]
        if not 0 < lo <= hi <= top:
            raise ConfigError(
                f"config.{field} must be (low, high) with 0 < low <= high <= {top}; got {config[field]}."
            )


def _check_auto_augment(config: Any) -> None:
    try:
        make_policy(
            str(config.auto_augment or ""),
            int(config.ra_num_ops),
            int(config.ra_magnitude),
            int(config.ra_num_magnitude_bins),
            interpolation=str(config.interpolation),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.auto_augment and not registry.get(config.dataset).auto_augment:
        raise ConfigError(
            f"config.auto_augment is implemented for dataset='image_folder' and TFDS sets; got "
            f"dataset={config.dataset!r}."
        )


def _check_aug_repeats(config: Any) -> None:
    repeats = float(config.aug_repeats)
    if repeats < 0:
        raise ConfigError(f"config.aug_repeats must be >= 0 (0 or 1: off); got {repeats}.")
    if repeats > 1 and not registry.get(config.dataset).aug_repeats:
        raise ConfigError(
            f"config.aug_repeats is implemented for dataset='image_folder' and TFDS sets; got "
            f"dataset={config.dataset!r}."
        )
    mixing = (config.mixup_alpha > 0 or config.cutmix_alpha > 0) and config.mixup_prob > 0
    if repeats > 1 and mixing and (not repeats.is_integer() or config.batch_size % int(repeats)):
        raise ConfigError(
            f"config.aug_repeats={config.aug_repeats} with mixup/cutmix must be a whole number that "
            f"divides config.batch_size={config.batch_size}."
        )


def _check_ema(config: Any) -> None:
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config.ema_decay must be in [0, 1) (0: off); got {config.ema_decay}.")
    if int(config.ema_every_steps) < 0:
        raise ConfigError(
            f"config.ema_every_steps must be >= 0 (0: every step); got {config.ema_every_steps}."
        )
    if not config.ema_decay and (config.ema_every_steps or config.ema_warmup):
        raise ConfigError(
            "config.ema_every_steps and config.ema_warmup need config.ema_decay > 0 (the EMA is off)."
        )
    if config.ema_warmup and config.ema_every_steps:
        raise ConfigError(
            "config.ema_warmup is timm's schedule (config.ema_every_steps=0); torchvision's "
            f"(ema_every_steps={config.ema_every_steps}) has none: set one of them."
        )


def _check_schedule(config: Any) -> None:
    _choice(config, "lr_schedule", optim.SCHEDULES)
    _choice(config, "lr_warmup_method", schedules.WARMUP_METHODS)
    if not 0.0 <= config.lr_warmup_decay <= 1.0:
        raise ConfigError(f"config.lr_warmup_decay must be in [0, 1]; got {config.lr_warmup_decay}.")
    for field in ("warmup_lr", "min_lr"):
        if config[field] < 0:
            raise ConfigError(f"config.{field} must be >= 0 (0: off); got {config[field]}.")
    if config.warmup_lr and config.lr_warmup_decay:
        raise ConfigError(
            "config.warmup_lr (an absolute start rate) and config.lr_warmup_decay (a factor of the "
            "peak) both set the warm-up's start; set one of them."
        )
    if config.min_lr and config.lr_schedule != "cosine":
        raise ConfigError(
            f"config.min_lr applies to lr_schedule='cosine' only; got lr_schedule={config.lr_schedule!r} "
            "(the polynomial schedule ends at config.end_learning_rate)."
        )
    if config.lr_schedule == "step" and (int(config.lr_step_size) < 1 or not 0 < config.lr_gamma <= 1):
        raise ConfigError(
            f"lr_schedule='step' needs config.lr_step_size >= 1 (epochs) and config.lr_gamma in (0, 1]; "
            f"got {config.lr_step_size} and {config.lr_gamma}."
        )


def _check_grad_accum(config: Any, device_count: int | None) -> None:
    k = int(config.grad_accum_steps)
    if k < 0 or k != config.grad_accum_steps:
        raise ConfigError(
            f"config.grad_accum_steps must be a whole number >= 0 (0 or 1: off); "
            f"got {config.grad_accum_steps}."
        )
    if k <= 1:
        return
    if config.dtype == "float16":
        raise ConfigError(
            "config.grad_accum_steps > 1 does not support dtype='float16' (loss scaling); use bfloat16."
        )
    per_device = int(config.batch_size) // (device_count or 1)
    if per_device % k:
        raise ConfigError(
            f"config.grad_accum_steps={k} must divide the per-device batch ({config.batch_size} over "
            f"{device_count or 1} devices = {per_device} rows)."
        )


def validate_config(
    config: Any, *, device_count: int | None = None, process_count: int | None = None
) -> None:
    """Raise ``ConfigError`` for settings that cannot work on ``device_count`` devices."""
    _choice(config, "parallelism", ("jit", "pmap"))
    try:
        parallel.check_mesh_axis_types(config.mesh_axis_types, config.parallelism)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _choice(config, "optimizer", optim.OPTIMIZERS)
    _check_schedule(config)
    _choice(config, "dtype", ("auto", *DTYPES))
    if config.dtype != "auto":  # 'auto' needs no check, and resolving it would start a backend
        try:
            resolve_dtype(config.dtype)  # float64 without 64-bit JAX
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _choice(config, "train_augment", TRAIN_AUGMENTATIONS)
    _choice(config, "rng_impl", ("", "threefry2x32", "rbg", "unsafe_rbg"))
    if config.model.arch not in architectures():
        raise ConfigError(
            f"config.model.arch={config.model.arch!r} is unknown; choose one of: "
            f"{', '.join(architectures())}."
        )
    try:
        check_overrides(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "image_size"):
        if int(config[field]) <= 0:
            raise ConfigError(f"config.{field} must be positive; got {config[field]}.")
    for field in ("num_epochs", "checkpoint_every_steps", "keep_checkpoints", "warmup_epochs"):
        if config[field] < 0:
            raise ConfigError(f"config.{field} must be >= 0; got {config[field]}.")
    if config.num_train_steps < -1 or config.num_train_steps == 0:
        raise ConfigError(
            f"config.num_train_steps must be > 0 (a step count) or -1 (use num_epochs); got "
            f"{config.num_train_steps}."
        )
    for field in ("peak_tflops", "profile_num_steps", "num_slices"):
        if config[field] < 0:
            raise ConfigError(f"config.{field} must be >= 0 (0: off or automatic); got {config[field]}.")
    if config.profile_num_steps and config.profile_start_step < 1:
        raise ConfigError(
            "config.profile_start_step must be >= 1 (the first traced step); got "
            f"{config.profile_start_step}."
        )
    if config.debug_step_delay_s < 0:
        raise ConfigError(f"config.debug_step_delay_s must be >= 0; got {config.debug_step_delay_s}.")
    if config.num_train_steps <= 0 and config.num_epochs <= 0 and not config.eval_only:
        raise ConfigError("nothing to train: set config.num_train_steps > 0 or num_epochs > 0.")
    _choice(config, "loss", steps.LOSSES)
    for field in ("drop_rate", "drop_path_rate"):
        if not 0.0 <= config.model[field] < 1.0:
            raise ConfigError(f"config.model.{field} must be in [0, 1); got {config.model[field]}.")
        if config.model[field] and config.model.arch == BASE_ARCH:
            raise ConfigError(f"config.model.{field} needs a ResNet or ResNetV2 arch, not 'resnet_base'.")
    for field in ("label_smoothing", "bce_target_threshold"):
        if not 0.0 <= config[field] < 1.0:
            raise ConfigError(f"config.{field} must be in [0, 1); got {config[field]}.")
    for field in ("grad_clip_norm", "lamb_max_grad_norm"):
        if config[field] < 0:
            raise ConfigError(f"config.{field} must be >= 0 (0: off); got {config[field]}.")
    if len(config.opt_betas) != 2 or not all(0.0 <= b < 1.0 for b in config.opt_betas):
        raise ConfigError(f"config.opt_betas must be two numbers in [0, 1); got {tuple(config.opt_betas)}.")
    if config.learning_rate < 0 or config.weight_decay < 0:
        raise ConfigError("config.learning_rate and config.weight_decay must be >= 0.")
    _check_fine_tuning(config)
    _check_ema(config)
    try:
        MixupOptions.from_config(config, num_classes=1)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_random_erase(config)
    _check_auto_augment(config)
    _check_aug_repeats(config)
    message = eval_resize.check_config(config)
    if message:
        raise ConfigError(message)
    try:
        registry.get(config.dataset).check_config(config)  # the source's own checks: class_subset
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    _check_grad_accum(config, device_count)
    for field in ("batch_size", "eval_batch_size"):
        value = int(config[field])
        if device_count and value % device_count:
            nearest = max(device_count, value // device_count * device_count)
            raise ConfigError(
                f"config.{field}={value} is not divisible by the {device_count} devices; use a "
                f"multiple of {device_count} (e.g. {nearest})."
            )
        if process_count and value % process_count:
            raise ConfigError(f"config.{field}={value} is not divisible by the {process_count} processes.")
