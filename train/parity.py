"""``python -m train.parity --config=CONFIG``: a config's training recipe, step by step, in this
program and in PyTorch, at float64.

``resnet_jax.parity`` checks the model; this checks the recipe around it. From the same initial
weights (ours, converted to a PyTorch state_dict) and the same random batches, it runs
``--steps`` training steps twice: once with this program's own train step, built by
``train.build.build_steps`` (``train/steps.py``, ``train/optim.py``, ``train/mixup.py``) and
jitted; once in PyTorch from real components (``train/parity_torch.py``: torchvision's or
timm's model, ``torch.optim``, timm's schedulers, losses and ``Mixup``,
``clip_grad_norm_``). Our step's random draws (mixup/cutmix, drop path, dropout) are recorded
while it is traced and given to the PyTorch components, so both sides compute the same thing.

Each step prints the loss, the learning rate, and the largest absolute difference of the
parameters and of the BatchNorm statistics; the exit status is 1 when any exceeds 1e-10, and 2
(one line) for a config field this check does not know yet. The batches are random normalised
images (``--image_size``, ``--channels``) and labels (``--num_classes``), so the config's data
fields do not enter; the schedule counts ``--steps_per_epoch`` steps per epoch.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import numpy as np

TOLERANCE = 1e-10

# The fields the PyTorch side reproduces (train/parity_torch.py; values it does not have are
# refused by `unsupported`), and those that cannot change a train step given its batch: data
# and augmentation on the host (the batches here are random), evaluation, the loop,
# checkpoints and devices. A field in neither list is refused when it differs from its default
# in configs/default.py, so a new ingredient is never silently left out of the comparison.
CHECKED = (
    "optimizer", "momentum", "nesterov", "learning_rate", "lr_base_batch_size", "lr_schedule",
    "warmup_epochs", "end_learning_rate", "lr_decay_power", "weight_decay",
    "weight_decay_on_bn_and_bias", "opt_betas", "opt_eps", "grad_clip_norm", "lamb_max_grad_norm",
    "grad_accum_steps", "ema_decay",
    "ema_every_steps", "ema_warmup",
    "lars_trust_coefficient", "lars_eps", "lr_warmup_method", "lr_warmup_decay", "warmup_lr",
    "warmup_prefix", "min_lr", "sched_on_updates", "lr_step_size", "lr_gamma", "loss",
    "label_smoothing", "bce_target_threshold", "bce_sum", "mixup_alpha", "cutmix_alpha",
    "mixup_prob", "mixup_switch_prob", "mixup_mode", "correct_lam", "cutmix_minmax",
    "freeze_backbone", "backbone_lr_multiplier", "num_epochs", "num_train_steps", "seed",
    "rng_impl", "model.arch", "model.overrides", "model.drop_rate", "model.drop_path_rate",
    # set by this tool: --batch, float64, jit
    "batch_size", "dtype", "parallelism", "mesh_axis_types",
)  # fmt: skip
NOT_IN_THE_STEP = (
    "dataset", "data_dir", "manual_dir", "download", "train_split", "eval_split", "image_key",
    "label_key", "image_size", "train_augment", "crop_padding", "crop_area_range",
    "crop_aspect_ratio_range", "crop_min_object_covered", "random_flip", "jpeg_reduced_decode",
    "random_erase_prob", "random_erase_mode", "random_erase_scale", "random_erase_ratio",
    "aug_repeats", "eval_crop_fraction", "normalize_mean", "normalize_std", "class_subset",
    "cache", "shuffle_buffer_size", "prefetch_to_device", "grain_worker_count",
    "grain_worker_buffer_size", "synthetic_num_classes", "synthetic_channels",
    "synthetic_num_examples", "synthetic_num_eval_examples", "eval_batch_size",
    "compilation_cache_dir", "aot_executable", "log_every_steps", "eval_every_steps",
    "eval_at_end", "checkpoint_every_steps", "save_checkpoints", "keep_checkpoints", "eval_only",
    "restore_step", "progress_bar", "init_from", "init_from_torch", "new_head", "debug_nan_step",
    "debug_step_delay_s", "distributed.enabled", "distributed.coordinator_address",
    "distributed.num_processes", "distributed.process_id", "distributed.cpu_collectives",
    "auto_augment", "ra_num_ops", "ra_magnitude", "ra_num_magnitude_bins", "eval_image_size",
    "eval_resize_size", "interpolation", "init_from_ema",
)  # fmt: skip


class Unsupported(ValueError):
    """A config this check does not cover yet; the message is one line naming the field."""


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key in config.keys():
        value, name = config[key], prefix + key
        if hasattr(value, "keys") and name != "model.overrides":
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def unsupported(config: Any) -> str | None:
    """One line naming the first field whose value the PyTorch side does not reproduce yet, or
    None when every field is covered."""
    from train import parity_schedules, parity_torch
    from train.config import default_config

    defaults = _flat(default_config())
    note = "not yet checked by train.parity"
    for name, value in _flat(config).items():
        if name in NOT_IN_THE_STEP:
            continue
        if name not in CHECKED and (name not in defaults or _plain(value) != _plain(defaults[name])):
            return f"config.{name}={_plain(value)!r}: {note} (its PyTorch side has no counterpart yet)."
    choices = {"optimizer": parity_torch.OPTIMIZERS, "lr_schedule": parity_torch.SCHEDULES}
    choices["loss"] = parity_torch.LOSSES
    for name, table in choices.items():
        if config[name] not in table:
            return f"config.{name}={config[name]!r}: {note}; it checks {', '.join(table)}."
    for key in dict(config.model.overrides or {}):
        if key not in parity_torch.MODEL_OVERRIDES:
            return (
                f"config.model.overrides.{key}: {note}; it checks {', '.join(parity_torch.MODEL_OVERRIDES)}."
            )
    problem = parity_schedules.refusal(config)
    if problem:
        return f"{problem}: {note}."
    return None


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return tuple(map(_plain, value)) if isinstance(value, (list, tuple)) else value


def _info(num_classes: int, image_size: int, channels: int):
    from train.data.core import DatasetInfo

    # Normalised float batches: the statistics are unused (only uint8 pixels are normalised).
    return DatasetInfo(
        name="random", num_classes=num_classes, image_shape=(image_size, image_size, channels),
        num_train_examples=0, num_eval_examples=0, class_names=tuple(map(str, range(num_classes))),
        mean=(0.0,) * channels, std=(1.0,) * channels,
    )  # fmt: skip


@contextlib.contextmanager
def _recording_draws(out: dict[str, Any]):
    """While our step is traced: the mixup draws (``train.mixup.draw``'s result) and every
    ``jax.random.bernoulli`` mask (the model's drop path and dropout), as traced values that the
    jitted step then returns beside its own outputs.

    A mask drawn inside ``jax.lax.scan`` (``grad_accum_steps``: one forward per micro-batch,
    ``train/accum.py``) is a value of the scan's body: the scan is run with a body that also
    returns the masks it drew, stacked over the micro-batches, and they are listed micro-batch by
    micro-batch, the order of the PyTorch side's forwards."""
    import jax

    from train import mixup

    real_draw, real_bernoulli, real_scan = mixup.draw, jax.random.bernoulli, jax.lax.scan
    masks: list[list] = [out.setdefault("masks", [])]  # the innermost scan's list last

    def draw(*args, **kwargs):
        out["mix"] = real_draw(*args, **kwargs)
        return out["mix"]

    def bernoulli(key, p=0.5, shape=None, **kwargs):
        mask = real_bernoulli(key, p, shape, **kwargs)
        masks[-1].append((p, mask))
        return mask

    def scan(f, init, xs=None, length=None, **kwargs):
        def body(carry, x):
            masks.append([])
            try:
                carry, y = f(carry, x)
            finally:
                drawn = masks.pop()
            return carry, (y, [(jax.numpy.asarray(p), m) for p, m in drawn])

        carry, (ys, drawn) = real_scan(body, init, xs, length, **kwargs)
        count = jax.tree.leaves((xs, ys))[0].shape[0] if length is None else length
        masks[-1].extend((p[j], m[j]) for j in range(count) for p, m in drawn)
        return carry, ys

    mixup.draw, jax.random.bernoulli, jax.lax.scan = draw, bernoulli, scan
    try:
        yield out
    finally:
        mixup.draw, jax.random.bernoulli, jax.lax.scan = real_draw, real_bernoulli, real_scan


def _our_side(config: Any, info: Any, steps_per_epoch: int, total_steps: int):
    """(initial state, jitted ``step(state, batch) -> (state, metrics, draws)``, schedule)."""
    import jax
    import jax.numpy as jnp

    from train import build

    parts = build.build_steps(config, info, steps_per_epoch, total_steps)

    def step(state, batch):
        draws: dict[str, Any] = {}
        with _recording_draws(draws):
            state, metrics = parts.train_step(state, batch)
        mix = {k: jnp.asarray(v) for k, v in draws["mix"]._asdict().items()} if "mix" in draws else {}
        masks = [(jnp.asarray(p, jnp.float64), m) for p, m in draws.get("masks", [])]
        return state, metrics, {"mix": mix, "masks": masks}

    return jax.jit(parts.create_state)(), jax.jit(step), parts.schedule


def _torch_masks(draws: dict[str, Any]):
    from train.parity_torch import Masks

    masks = [(float(p), np.asarray(m)) for p, m in draws["masks"]]
    return Masks([pm for pm in masks if pm[1].ndim == 4], [pm for pm in masks if pm[1].ndim == 2])


def run_parity(
    config: Any,
    *,
    steps: int = 3,
    image_size: int = 64,
    batch: int = 8,
    num_classes: int = 10,
    channels: int = 3,
    steps_per_epoch: int = 1,
    reference: str = "auto",
) -> dict[str, Any]:
    """``steps`` train steps of ``config``'s recipe in this program and in PyTorch, at float64
    (needs ``jax_enable_x64``). Returns ``{'rows': [...], 'ok': bool, ...}``, one row per step;
    raises :class:`Unsupported` for a config it does not cover."""
    import jax
    import torch

    from train.config import ConfigError, validate_config

    if not jax.config.jax_enable_x64:
        raise RuntimeError("train.parity runs at float64: enable jax_enable_x64 first.")
    config = config.copy_and_resolve_references()
    config.batch_size, config.dtype, config.parallelism = batch, "float64", "jit"
    config.mesh_axis_types = "auto"
    # Repeated augmentation orders the data, which the random batches here replace; its check
    # against the batch size (a recipe's 2016 or 1024 rows) would refuse a small --batch.
    config.aug_repeats = 0.0
    validate_config(config, device_count=1)  # the program's own one-line errors first
    problem = unsupported(config)
    if problem:
        raise Unsupported(problem)
    if config.model.arch == "resnet_base":
        raise ConfigError("config.model.arch='resnet_base' has no torchvision or timm twin; name a preset.")
    size = dict(image_size=image_size, batch=batch, num_classes=num_classes, channels=channels)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm's one-hot targets take the default dtype
    try:
        with jax.default_matmul_precision("highest"):  # no reduced-precision passes on a GPU
            return _compare(config, steps, size, steps_per_epoch, reference)
    finally:
        torch.set_default_dtype(default_dtype)


def _compare(config: Any, steps: int, size: dict, steps_per_epoch: int, reference: str) -> dict[str, Any]:
    """Both sides built, stepped and compared (:func:`run_parity`)."""
    import jax
    import torch

    from resnet_jax.convert import flax_to_torch
    from train import optim, parity_ema
    from train import parity_torch as pt
    from train.config import ConfigError

    image_size, batch, num_classes, channels = (
        size[k] for k in ("image_size", "batch", "num_classes", "channels")
    )
    total = (
        config.num_train_steps if config.num_train_steps > 0 else round(config.num_epochs * steps_per_epoch)
    )
    total = int(total)
    try:
        reference = pt.pick_reference(config, channels, reference)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    info = _info(num_classes, image_size, channels)
    state, step_fn, schedule = _our_side(config, info, steps_per_epoch, total)

    model = pt.build_model(config, num_classes, channels, reference)
    try:
        pt.load_weights(model, flax_to_torch(state.variables))
    except RuntimeError as e:  # strict: another layout than ours (an override it builds otherwise)
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"{reference}'s {config.model.arch} does not take this model's weights: {detail}"
        ) from None
    if config.freeze_backbone:  # as PyTorch's fine-tuning tutorial freezes: no gradients
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))
    opt = pt.make_optimizer(model, config, optim.peak_learning_rate(config))
    scheduler = pt.make_scheduler(opt, config, steps_per_epoch, total)
    mixup = pt.make_mixup(config, num_classes)
    loss_fn = pt.LOSSES[config.loss](config, mixed=mixup is not None)
    torch_ema = parity_ema.make(model, config, steps_per_epoch, total)
    model.train()
    accum = max(int(config.grad_accum_steps), 1)

    rng = np.random.default_rng(config.seed)
    rows = []
    for i in range(steps):
        images = rng.normal(size=(batch, image_size, image_size, channels))
        labels = rng.integers(0, num_classes, batch)
        state, metrics, draws = step_fn(state, {"image": images, "label": labels})
        draws = jax.tree.map(np.asarray, draws)

        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        target = torch.from_numpy(labels)
        if mixup is not None:
            x, target = pt.mix(mixup, draws["mix"], x, target)
        lr = opt.param_groups[0]["lr"]  # a head group (fc): the schedule's rate itself
        opt.zero_grad()
        loss = 0.0
        with pt.given_masks(_torch_masks(draws)) as masks:
            # grad_accum_steps: k backward passes of loss / k on the rows j, j + k, ... (the
            # micro-batches of train/accum.py), then one optimizer step.
            for j in range(accum):
                part = loss_fn(model(x[j::accum]), target[j::accum]) / accum
                part.backward()
                loss = loss + part.detach()
        clipped_norm = None  # the norm PyTorch clips: of the gradients it has (not a frozen backbone's)
        if config.grad_clip_norm:
            clipped_norm = float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(config.grad_clip_norm))
            )
        opt.step()
        scheduler.after(i + 1)
        if torch_ema is not None:
            torch_ema.after(i + 1, model)

        ours = flax_to_torch(jax.tree.map(np.asarray, state.variables))
        theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        params = {k: _diff(ours[k], theirs[k]) for k in dict(model.named_parameters())}
        stats = {k: _diff(ours[k], theirs[k]) for k in theirs if "running_" in k}
        ema_diff = 0.0
        if torch_ema is not None:  # the EMA's parameters and BatchNorm statistics
            our_ema = flax_to_torch(jax.tree.map(np.asarray, dict(state.ema)))
            their_ema = torch_ema.state_dict()
            ema_diff = max(_diff(our_ema[k], their_ema[k]) for k in [*params, *stats])
        our_lr = float(schedule(np.int32(i)))  # the count type of the optimizer's state
        ours_asked = [p for p, _ in draws["masks"]]
        rows.append(
            {
                "step": i,
                "loss": float(metrics["loss"]),
                "torch_loss": float(loss.detach()),
                "loss_diff": abs(float(metrics["loss"]) - float(loss.detach())),
                "learning_rate": our_lr,
                "grad_norm": float(metrics["grad_norm"]),  # ours, before clipping
                "torch_clipped_norm": clipped_norm,
                "lr_diff": abs(our_lr - lr),
                "params_diff": max(params.values()),
                "worst_param": max(params, key=params.get),
                "batch_stats_diff": max(stats.values(), default=0.0),
                "ema_diff": ema_diff,
                "masks": len(ours_asked),
                "dropped": int(sum((m == 0).sum() for _, m in draws["masks"])),
                "masks_match": [float(p) for p in ours_asked] == masks.asked,
                "lam": [float(v) for v in np.atleast_1d(draws["mix"].get("lam", []))],
            }
        )
    worst = max(
        max(r["loss_diff"], r["lr_diff"], r["params_diff"], r["batch_stats_diff"], r["ema_diff"])
        for r in rows
    )
    ok = worst <= TOLERANCE and all(r["masks_match"] for r in rows)
    setup = dict(arch=config.model.arch, reference=reference, image_size=image_size, batch=batch)
    return {**setup, "steps": steps, "rows": rows, "max_diff": worst, "tolerance": TOLERANCE, "ok": ok}


def _diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def format_table(result: dict[str, Any]) -> str:
    """The rows of :func:`run_parity` as a table, then PASS or FAIL."""
    lines = [
        f"{result['arch']}  float64  batch {result['batch']}  {result['image_size']}x{result['image_size']}  "
        f"reference={result['reference']}  (max |ours - PyTorch|, tolerance {result['tolerance']:.0e})",
        f"{'step':>4}{'loss':>14}{'|d loss|':>11}{'lr':>12}{'|d lr|':>11}{'|d params|':>12}"
        f"{'|d BN stats|':>14}{'|d EMA|':>10}  draws",
    ]
    for r in result["rows"]:
        draws = f"{r['masks']} masks ({r['dropped']} dropped)" if r["masks"] else "-"
        if r["lam"]:
            draws += (
                f", lam {', '.join(f'{v:.3f}' for v in r['lam'][:4])}{' ...' if len(r['lam']) > 4 else ''}"
            )
        if not r["masks_match"]:
            draws += ", timm asked other keep probabilities"
        lines.append(
            f"{r['step']:>4}{r['loss']:>14.8f}{r['loss_diff']:>11.1e}{r['learning_rate']:>12.4e}"
            f"{r['lr_diff']:>11.1e}{r['params_diff']:>12.1e}{r['batch_stats_diff']:>14.1e}"
            f"{r['ema_diff']:>10.1e}  {draws}"
        )
    lines.append("PASS" if result["ok"] else f"FAIL (worst parameter: {result['rows'][-1]['worst_param']})")
    return "\n".join(lines)


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py).")
    flags.DEFINE_integer("steps", 3, "Training steps compared.")
    flags.DEFINE_integer("image_size", 64, "Height and width of the random images.")
    flags.DEFINE_integer("batch", 8, "Images per step (config.batch_size).")
    flags.DEFINE_integer("num_classes", 10, "Classes of the random labels (the classifier's size).")
    flags.DEFINE_integer("channels", 3, "Channels of the random images.")
    flags.DEFINE_integer("steps_per_epoch", 1, "Steps per epoch, for the learning-rate schedule.")
    flags.DEFINE_enum("reference", "auto", ["auto", "torchvision", "timm"], "The PyTorch model's library.")
    flags.DEFINE_string("json", None, "Write the result (its rows) as JSON to this file.")
    flags.mark_flags_as_required(["config"])
    return config


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    from resnet_jax.platform import skip_absent_tpu

    skip_absent_tpu()
    import jax

    from train.config import ConfigError

    jax.config.update("jax_enable_x64", True)
    FLAGS = flags.FLAGS
    try:
        result = run_parity(
            _CONFIG.value,
            steps=FLAGS.steps,
            image_size=FLAGS.image_size,
            batch=FLAGS.batch,
            num_classes=FLAGS.num_classes,
            channels=FLAGS.channels,
            steps_per_epoch=FLAGS.steps_per_epoch,
            reference=FLAGS.reference,
        )
    except (Unsupported, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_table(result), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)
    sys.exit(0 if result["ok"] else 1)


def run() -> None:
    """The ``resnet-jax-train-parity`` console script: ``python -m train.parity`` from anywhere."""
    global _CONFIG
    from absl import app

    from train.cli import help_lists_flags_of, parse_flags

    _CONFIG = _flags()
    help_lists_flags_of(__name__)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
