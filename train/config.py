"""Config checks that fail fast with one clear sentence instead of a traceback deep in JAX."""

from __future__ import annotations

from typing import Any

from train import input_pipeline, optim, steps
from train.model import DTYPES, architectures, resolve_dtype


class ConfigError(ValueError):
    """The config cannot work; the message names the field and how to fix it."""


def _choice(config: Any, field: str, choices) -> None:
    value = config.get(field)
    if value not in choices:
        raise ConfigError(
            f"config.{field}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}."
        )


def _check_fine_tuning(config: Any) -> None:
    multiplier = float(config.get("backbone_lr_multiplier", 1.0))
    if multiplier < 0:
        raise ConfigError(f"config.backbone_lr_multiplier must be >= 0; got {multiplier}.")
    if config.get("freeze_backbone") and multiplier != 1.0:
        raise ConfigError(
            "config.freeze_backbone=True and config.backbone_lr_multiplier != 1 contradict each "
            "other; set one of them."
        )
    if config.get("init_from") and config.get("init_from_torch"):
        raise ConfigError("set config.init_from or its older name config.init_from_torch, not both.")
    subset = tuple(config.get("class_subset", ()) or ())
    if subset:
        if config.dataset != input_pipeline.DIGITS:
            raise ConfigError(
                f"config.class_subset is supported for dataset={input_pipeline.DIGITS!r} only; "
                f"got dataset={config.dataset!r}."
            )
        if len(set(subset)) != len(subset) or not all(0 <= int(c) <= 9 for c in subset) or len(subset) < 2:
            raise ConfigError(f"config.class_subset must be 2 or more distinct digits 0-9; got {subset}.")


def validate_config(
    config: Any, *, device_count: int | None = None, process_count: int | None = None
) -> None:
    """Raise ``ConfigError`` for settings that cannot work on ``device_count`` devices."""
    _choice(config, "parallelism", ("jit", "pmap"))
    axis_types = config.get("mesh_axis_types", "auto")  # runs saved before the field: auto
    if axis_types not in steps.MESH_AXIS_TYPES:
        raise ConfigError(
            f"config.mesh_axis_types={axis_types!r} is not valid; "
            f"choose one of: {', '.join(steps.MESH_AXIS_TYPES)}."
        )
    if axis_types == "explicit" and config.parallelism != "jit":
        raise ConfigError(
            "config.mesh_axis_types='explicit' needs config.parallelism='jit': pmap has no mesh. "
            "Set --config.parallelism=jit, or leave mesh_axis_types at 'auto'."
        )
    _choice(config, "optimizer", optim.OPTIMIZERS)
    _choice(config, "lr_schedule", optim.SCHEDULES)
    _choice(config, "dtype", ("auto", *DTYPES))
    if config.dtype != "auto":  # 'auto' needs no check, and resolving it would start a backend
        try:
            resolve_dtype(config.dtype)  # float64 without 64-bit JAX
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _choice(config, "train_augment", input_pipeline.TRAIN_AUGMENTATIONS)
    _choice(config, "rng_impl", ("", "threefry2x32", "rbg", "unsafe_rbg"))
    if config.model.arch not in architectures():
        raise ConfigError(
            f"config.model.arch={config.model.arch!r} is unknown; choose one of: "
            f"{', '.join(architectures())}."
        )
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "image_size"):
        if int(config.get(field)) <= 0:
            raise ConfigError(f"config.{field} must be positive; got {config.get(field)}.")
    for field in ("num_epochs", "checkpoint_every_steps", "keep_checkpoints", "warmup_epochs"):
        if config.get(field) < 0:
            raise ConfigError(f"config.{field} must be >= 0; got {config.get(field)}.")
    if config.num_train_steps < -1 or config.num_train_steps == 0:
        raise ConfigError(
            f"config.num_train_steps must be > 0 (a step count) or -1 (use num_epochs); got "
            f"{config.num_train_steps}."
        )
    if config.get("debug_step_delay_s", 0.0) < 0:
        raise ConfigError(f"config.debug_step_delay_s must be >= 0; got {config.debug_step_delay_s}.")
    if config.num_train_steps <= 0 and config.num_epochs <= 0 and not config.eval_only:
        raise ConfigError("nothing to train: set config.num_train_steps > 0 or num_epochs > 0.")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"config.label_smoothing must be in [0, 1); got {config.label_smoothing}.")
    if config.learning_rate < 0 or config.weight_decay < 0:
        raise ConfigError("config.learning_rate and config.weight_decay must be >= 0.")
    _check_fine_tuning(config)
    for field in ("batch_size", "eval_batch_size"):
        value = int(config.get(field))
        if device_count and value % device_count:
            nearest = max(device_count, value // device_count * device_count)
            raise ConfigError(
                f"config.{field}={value} is not divisible by the {device_count} devices; use a "
                f"multiple of {device_count} (e.g. {nearest})."
            )
        if process_count and value % process_count:
            raise ConfigError(f"config.{field}={value} is not divisible by the {process_count} processes.")
