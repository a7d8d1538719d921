"""Everything a run needs, built from its config: ``build_run(config, workdir) -> Run``, then
``restore_or_init(run) -> (state, start_step)``.

Where to change things: the data in ``train/data/`` (the augmentation: ``train/data/augment.py``
says where), the model in
``train/model.py``, the optimizer and schedule in ``train/optim.py``, the train step in
``train/steps.py``, the sharding (jit over a mesh, or pmap) in ``train/parallel.py``, the checkpoint policy in
``train/checkpoint.py`` and ``train/periodic.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from train import checkpoint as checkpoint_lib
from train import ema, executables, optim, parallel, paths, steps
from train import metrics as metrics_lib
from train.class_names import save_class_names
from train.config import ConfigError, validate_config, with_defaults
from train.data import registry
from train.data.core import DatasetInfo
from train.distributed import CompiledOnFirstCall
from train.init_from import import_weights
from train.mixup import MixupOptions
from train.model import build_model, create_model

CONFIG_FILE = "config.json"
DATASET_INFO_FILE = "dataset_info.json"


@dataclasses.dataclass
class Run:
    """A training run's parts; ``train_step`` and ``eval_step`` compile at their first call."""

    config: Any
    workdir: str
    dataset: Any
    driver: Any
    model: Any
    tx: Any
    schedule: Any
    create_state: Any  # () -> TrainState, the fresh initial state (used abstractly for restores)
    ckpt: checkpoint_lib.Checkpointer
    writer: metrics_lib.MetricWriter
    train_step: CompiledOnFirstCall
    eval_step: CompiledOnFirstCall
    steps_per_epoch: int
    total_steps: int

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def _step_counts(config: Any, dataset: Any) -> tuple[int, int]:
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size, jax.process_count())
    examples = dataset.info.num_train_examples
    fitted = examples // jax.device_count() * jax.device_count()  # a batch of all of them
    if steps_per_epoch < 1 and fitted and dataset.steps_per_epoch(fitted, jax.process_count()) >= 1:
        # A small folder of one's own photos: a batch of all of them, rather than no run at all.
        if jax.process_index() == 0:
            print(
                f"config.batch_size={config.batch_size} is more than the {examples} training images: "
                f"training with batch_size={fitted}, one step per epoch.",
                flush=True,
            )
        config.batch_size = fitted
        steps_per_epoch = dataset.steps_per_epoch(config.batch_size, jax.process_count())
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {dataset.info.num_train_examples} "
            f"training examples of {dataset.info.name}."
        )
    if config.num_train_steps > 0:
        return steps_per_epoch, int(config.num_train_steps)
    return steps_per_epoch, round(config.num_epochs * steps_per_epoch)


def build_run(config: Any, workdir: str) -> Run:
    """Data, model, optimizer, compiled steps, checkpointer and metric writer for ``config``."""
    workdir = paths.resolve(workdir)  # gs://bucket/run stays a URL
    if paths.Path(workdir).exists() and not paths.Path(workdir).is_dir():
        raise ConfigError(
            f"--workdir {workdir} is a file; give a directory, or a path where one can be made."
        )
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    dataset = registry.create_dataset(config)
    info = dataset.info
    try:
        driver = parallel.make_driver(
            config.parallelism, mesh_axis_types=config.mesh_axis_types, num_slices=int(config.num_slices)
        )
    except ValueError as e:  # num_slices against the devices' slices
        raise ConfigError(f"config.{e}" if str(e).startswith("num_slices") else str(e)) from None
    load = _saved_executables(config, driver)  # read (or refused) before anything is written
    steps_per_epoch, total_steps = _step_counts(config, dataset)
    if jax.process_index() == 0:
        print(
            f"{info.num_train_examples:,} training images in {info.num_classes} classes; "
            f"{info.num_eval_examples:,} for evaluation ({info.name}).",
            flush=True,
        )
    parts = build_steps(config, info, steps_per_epoch, total_steps)
    refuse_other_config(workdir, config, parts.create_state)  # before anything is written
    save_run_info(workdir, config, info)
    ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
    eval_step = driver.eval_step(parts.eval_step)
    train_step = driver.train_step(parts.train_step)
    return Run(
        config=config,
        workdir=workdir,
        dataset=dataset,
        driver=driver,
        model=parts.model,
        tx=parts.tx,
        schedule=parts.schedule,
        create_state=parts.create_state,
        ckpt=ckpt,
        writer=writer,
        train_step=CompiledOnFirstCall(train_step, "train_step", load),
        eval_step=CompiledOnFirstCall(eval_step, "eval_step", load),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def _saved_executables(config: Any, driver: Any) -> Callable[[str, Any], Any] | None:
    """``config.aot_executable``'s loader for ``CompiledOnFirstCall``, or None without one."""
    path = config.aot_executable
    if not path:
        return None
    if config.parallelism != "jit":
        raise ConfigError(
            "config.aot_executable needs config.parallelism='jit' (train.aot compiles the jit driver's "
            "steps)."
        )
    payload = executables.read(path)
    devices = list(driver.mesh.devices.flat)
    return lambda name, lowered: executables.load(payload, name, lowered, devices, path)


@dataclasses.dataclass
class Steps:
    """A run's model, optimizer and pure steps, before a driver (jit or pmap) wraps them."""

    model: Any
    dtype: Any
    tx: Any
    schedule: Any
    create_state: Any  # () -> TrainState
    train_step: Any  # pure (state, batch) -> (state, metrics)
    eval_step: Any  # pure (state, batch) -> sums


def build_steps(
    config: Any, info: Any, steps_per_epoch: int, total_steps: int, *, platform: str | None = None
) -> Steps:
    """The model, optimizer and pure train/eval steps for ``config`` and its ``DatasetInfo``.

    ``python -m train`` and ``train.aot`` both build their steps here, so the program compiled
    for a TPU ahead of time is the one the run executes.

    Args:
        config: The run's ``ml_collections`` config (``train/config.py``).
        info: The dataset's ``DatasetInfo`` (classes, image shape, normalisation statistics).
        steps_per_epoch: Optimizer steps per epoch, for the learning-rate schedule.
        total_steps: Optimizer steps of the whole run, for the schedule.
        platform: The backend that resolves ``dtype='auto'`` (e.g. ``'tpu'`` when compiling ahead
            of time); None means the current default backend.

    Returns:
        A :class:`Steps`: the model, its compute dtype, optimizer, schedule, a state factory and
        the pure train and eval steps, not yet wrapped by a driver.
    """
    axis_name = parallel.PMAP_AXIS if config.parallelism == "pmap" else None
    model, dtype = create_model(config, info, axis_name, platform=platform)
    # A float64 run is the twin of the float32 run with its seed: same initial values, cast.
    float32_twin = None
    if dtype == jnp.float64:
        float32_twin = build_model(config.model, info.num_classes, info.image_shape[-1], axis_name=axis_name)
    schedule = optim.create_lr_schedule(config, steps_per_epoch, total_steps)
    if dtype == jnp.float64:
        schedule = _counted_in_float64(schedule)
    tx = optim.create_optimizer(config, schedule)
    create_state = functools.partial(
        steps.create_train_state,
        jax.random.key(config.seed, impl=config.rng_impl or None),
        model,
        tx,
        (1, *info.image_shape),
        dynamic_scale=dtype == jnp.float16,
        init_model=float32_twin,
    )
    ema_schedule = ema.EmaSchedule.from_config(config, steps_per_epoch, total_steps)
    if ema_schedule is not None:
        create_state = ema.with_ema(create_state)
    input_stats = (info.mean, info.std)  # normalises uint8 batches on the device
    eval_step = steps.make_eval_step(model, axis_name=axis_name, input_stats=input_stats)
    train_step = steps.make_train_step(
        model,
        tx,
        label_smoothing=config.label_smoothing,
        loss=config.loss,
        bce_target_threshold=config.bce_target_threshold,
        bce_sum=config.bce_sum,
        dropout_rng=dropout_rng(config),
        axis_name=axis_name,
        lr_schedule=schedule,
        input_stats=input_stats,
        mixup=MixupOptions.from_config(config, info.num_classes),
        grad_accum_steps=int(config.grad_accum_steps),
        grad_accum_unroll=(platform or jax.default_backend()) == "cpu",
    )
    train_step = ema.wrap_train_step(train_step, ema_schedule)  # the EMA after the update
    return Steps(model, dtype, tx, schedule, create_state, train_step, eval_step)


def _counted_in_float64(schedule: Any) -> Any:
    """The schedule of a float64 run, evaluated on its step count as a float64: optax's warm-up
    ramp divides the int32 count into float32 (0.1 became 0.10000000149 there), which made the
    float64 twin's learning rates float32 ones (found by ``python -m train.parity``)."""
    return lambda count: schedule(jnp.asarray(count, jnp.float64))


def dropout_rng(config: Any) -> jax.Array | None:
    """The key of the model's dropout and drop path (None when both rates are 0): the seed's,
    folded apart from the initialisation's."""
    if not (config.model.drop_rate or config.model.drop_path_rate):
        return None
    return jax.random.fold_in(jax.random.key(config.seed, impl=config.rng_impl or None), 1)


def restore_or_init(run: Run) -> tuple[Any, int]:
    """The newest readable checkpoint (or ``config.restore_step``), else a fresh state, placed on
    the devices; and the step it is at. Damaged checkpoints are set aside with a warning."""
    config, ckpt = run.config, run.ckpt
    restore_step = None if config.restore_step < 0 else int(config.restore_step)
    try:
        restored = ckpt.restore(jax.eval_shape(run.create_state), restore_step) if ckpt.all_steps() else None
    except checkpoint_lib.CheckpointMismatchError as e:
        raise ConfigError(f"{e} Rerun with the config it was saved with, or use a new --workdir.") from None
    if run.is_main:
        for bad_step, reason in ckpt.damaged:
            print(
                f"warning: checkpoint step {bad_step} in {ckpt.directory} is damaged ({reason}); "
                f"moved it to {ckpt.damaged_directory} and falling back to the previous one.",
                file=sys.stderr,
                flush=True,
            )
    if restored is not None:
        host_state, _meta = restored
        start_step = int(host_state.step)
        if run.is_main:
            print(f"Resuming from checkpoint step {start_step} in {ckpt.directory}", flush=True)
        return run.driver.place_state(host_state), start_step
    if config.eval_only:
        raise ConfigError(f"eval_only: no checkpoint in {ckpt.directory}.")
    if ckpt.damaged:
        # Every checkpoint was unreadable: starting over silently would lose the whole run.
        raise ConfigError(
            f"no readable checkpoint in {ckpt.directory} (the damaged ones were moved to "
            f"{ckpt.damaged_directory}); use a new workdir to start over."
        )
    state = run.driver.init_state(run.create_state)
    field = "init_from" if config.init_from else "init_from_torch"
    if config[field]:
        host, note = import_weights(
            config[field],
            run.model,
            run.driver.to_host(state),
            arch=config.model.arch,
            field=field,
            new_head=bool(config.new_head),
            ema=bool(config.init_from_ema),
        )
        state = run.driver.place_state(host)
        if run.is_main:
            print(note, flush=True)
    return state, 0


def refuse_other_config(workdir: str, config: Any, create_state: Callable[[], Any]) -> None:
    """Raise ``ConfigError`` when the checkpoint this run would resume from was saved with
    another config (another model, dtype, optimizer or class count): its arrays are not this
    run's, and treating it as damaged would set the whole run aside. Reads only; the message
    names the config fields that differ from the workdir's ``config.json``."""
    restore_step = None if config.restore_step < 0 else int(config.restore_step)
    found = checkpoint_lib.mismatch(workdir, jax.eval_shape(create_state), restore_step)
    if found is None:
        return
    step, differences = found
    fields = _config_differences(workdir, config)
    if fields:
        raise ConfigError(
            f"workdir {workdir} was trained with {'; '.join(fields)}; rerun with the original config, or use "
            f"a new --workdir."
        )
    raise ConfigError(
        f"the checkpoints in {checkpoint_lib.checkpoint_dir(workdir)} hold another model than this "
        f"config builds (step {step}: {'; '.join(differences)}); rerun with the config they were "
        f"saved with, or use a new --workdir."
    )


def _config_differences(workdir: str, config: Any, limit: int = 4) -> list[str]:
    """``field=saved value but this run has value`` where ``config`` differs from the workdir's
    config.json."""
    saved_file = paths.Path(workdir) / CONFIG_FILE
    try:
        saved = _flat_fields(json.loads(saved_file.read_text()))
    except Exception:  # no config.json (an older or copied run), or an unreadable one
        return []
    this = _flat_fields(json.loads(config.to_json_best_effort()))
    names = sorted(k for k in saved.keys() | this.keys() if saved.get(k, _UNSET) != this.get(k, _UNSET))
    # The fields that shape a checkpoint, when some differ: the others (steps, logging) cannot
    # be why its arrays do not fit.
    names = [k for k in names if k.startswith(_STATE_FIELDS)] or names
    shown = [
        f"{k}={_shown(saved.get(k, _UNSET))} but this run has {_shown(this.get(k, _UNSET))}" for k in names
    ]
    return shown[:limit] + ([f"{len(shown) - limit} more field(s)"] if len(shown) > limit else [])


_UNSET = object()
# Fields that decide the shapes in a checkpoint.
_STATE_FIELDS = (
    "model.",
    "dtype",
    "dataset",
    "class_subset",
    "synthetic_",
    "data_dir",
    "optimizer",
    "momentum",
    "ema_decay",
)


def _flat_fields(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    to_tuple = lambda v: tuple(map(to_tuple, v)) if isinstance(v, list) else v  # noqa: E731
    return repr(to_tuple(value))


def save_run_info(workdir: str, config: Any, info: DatasetInfo) -> None:
    if jax.process_index() != 0:
        return
    root = paths.Path(workdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
        (root / DATASET_INFO_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2))
        save_class_names(root, info.class_names)
    except Exception as e:  # no such bucket, no credentials or permission, a read-only disk, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot write to the workdir {workdir} ({first[:300]}); check that it exists and that "
            f"this machine may write there (for gs://, the bucket and its credentials)."
        ) from None


def load_run_info(workdir: str) -> tuple[Any, DatasetInfo]:
    """The config (ConfigDict) and DatasetInfo a run wrote into ``workdir``."""
    root = paths.Path(paths.resolve(workdir))
    if not (root / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{workdir} has no {CONFIG_FILE}: it is not the workdir of a training run.")
    config = with_defaults(json.loads((root / CONFIG_FILE).read_text()))
    raw = json.loads((root / DATASET_INFO_FILE).read_text())
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return config, DatasetInfo(**raw)
