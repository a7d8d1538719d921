"""The training loop: ``train_and_evaluate(config, workdir)``.

Builds data, model, optimizer and state; resumes from the newest checkpoint in ``workdir``;
trains with the jit (mesh) or pmap driver from ``train.steps``; logs train metrics (with
images/s) and periodic evaluations to ``metrics.jsonl`` and TensorBoard; saves checkpoints;
and ends with a final evaluation, a PNG of the curves and a summary. ``config.eval_only``
evaluates a checkpoint instead of training.

Run layout: ``WORKDIR/config.json`` (the resolved config), ``dataset_info.json`` (classes,
image shape, normalisation; used by ``train.predict``), ``checkpoints/<step>/``,
``metrics.jsonl``, ``tensorboard/``, ``training_curves.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import checkpoint as checkpoint_lib
from train import input_pipeline, optim, steps
from train import metrics as metrics_lib
from train.config import ConfigError, validate_config
from train.model import build_model, resolve_dtype

CONFIG_FILE = "config.json"
DATASET_INFO_FILE = "dataset_info.json"


def maybe_initialize_distributed(config: Any) -> None:
    """``jax.distributed.initialize`` when ``config.distributed.enabled`` (before any JAX use)."""
    dist = config.get("distributed")
    if dist is None or not dist.enabled:
        return
    if dist.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    kwargs = {}
    if dist.coordinator_address:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes > 0:
        kwargs["num_processes"] = int(dist.num_processes)
    if dist.process_id >= 0:
        kwargs["process_id"] = int(dist.process_id)
    jax.distributed.initialize(**kwargs)


def sync_processes(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process gets here, via the coordination service (no device collective).

    Used after compiling so all processes enter their first collective together: CPU (gloo)
    collectives give up when peers arrive tens of seconds apart, which compile-time skew
    between processes easily causes.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_jax_distributed_client().wait_at_barrier(name, timeout_s * 1000)


class CompiledOnFirstCall:
    """Ahead-of-time compiles a jitted or pmapped function at its first call, then syncs hosts.

    ``compile_time`` is the compilation alone (lowering + XLA), not the first step's run.
    """

    def __init__(self, fn: Any, name: str):
        self._fn, self._name, self._compiled = fn, name, None
        self.compile_time: float | None = None

    def __call__(self, *args):
        if self._compiled is None:
            t0 = time.perf_counter()
            self._compiled = self._fn.lower(*args).compile()
            self.compile_time = time.perf_counter() - t0
            sync_processes(f"resnet_jax_compiled_{self._name}")
        return self._compiled(*args)


_MISMATCH_KINDS = ("missing keys", "unexpected keys", "wrong shapes")


def _init_from_torch(path: str, model: Any, host_state: steps.TrainState) -> steps.TrainState:
    """``host_state`` with params and BatchNorm statistics from a PyTorch state_dict file."""
    from resnet_jax.convert import StateDictMismatchError, load_torch_checkpoint, torch_to_flax

    if not os.path.isfile(path):
        raise ConfigError(f"config.init_from_torch={path!r}: no such file.")
    try:
        variables = torch_to_flax(load_torch_checkpoint(path), model)
    except StateDictMismatchError as e:
        # The library lists every key; one line with counts, an example and its hint is enough.
        lines = [line.strip() for line in str(e).splitlines()[1:]]
        problems = []
        for ln in lines:
            # "wrong shapes (2): conv1.weight: got (7, 7, 3, 64) ..., fc.weight: ..." -> first item
            match = re.match(r"(.+? \(\d+\)): (.+?)(?:, (?=\w+\.[\w.]+[:,])| \.\.\.|$)", ln)
            if match and match.group(1).split(" (")[0] in _MISMATCH_KINDS:
                problems.append(f"{match.group(1)}, e.g. {match.group(2)}")
        hint = next((ln for ln in lines if "looks like" in ln), "")
        hint = hint[hint.index("The state_dict") :] if hint else ""
        raise ConfigError(
            f"config.init_from_torch={path!r} does not fit config.model ({type(model).__name__}): "
            f"{'; '.join(problems)}. {hint} Set config.model (arch, overrides) to the architecture "
            f"the state_dict was saved from; the dataset's class count must match its fc layer."
        ) from None
    except Exception as e:  # unreadable, not a state_dict, a pickle with code, ...
        raise ConfigError(
            f"config.init_from_torch={path!r} cannot be read: {str(e).splitlines()[0]}"
        ) from None
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), variables["params"])
    batch_stats = jax.tree.map(lambda x: np.asarray(x, np.float32), variables.get("batch_stats", {}))
    return host_state.replace(params=params, batch_stats=batch_stats)


def save_run_info(workdir: str, config: Any, info: input_pipeline.DatasetInfo) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, DATASET_INFO_FILE), "w") as f:
        json.dump(dataclasses.asdict(info), f, indent=2)


def load_run_info(workdir: str) -> tuple[Any, input_pipeline.DatasetInfo]:
    """The config (ConfigDict) and DatasetInfo a run wrote into ``workdir``."""
    import ml_collections

    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        config = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(workdir, DATASET_INFO_FILE)) as f:
        raw = json.load(f)
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return config, input_pipeline.DatasetInfo(**raw)


def create_model(config: Any, info: input_pipeline.DatasetInfo, axis_name: str | None = None):
    dtype = resolve_dtype(config.dtype)
    model = build_model(
        config.model, info.num_classes, info.image_shape[-1], dtype=dtype, axis_name=axis_name
    )
    return model, dtype


# Per-step settings rather than measurements: report the window's last value, not its mean.
_LAST_VALUE_METRICS = ("learning_rate", "loss_scale")
# Counts: report the window's sum.
_SUM_METRICS = ("skipped_step",)


def _mean_metrics(records: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Average train metrics over the steps of a log window (finite steps only)."""
    # float16 steps skipped on overflow have a non-finite loss by design; leave them out.
    kept = [r for r in records if not r.get("skipped_step", 0.0)] or records[-1:]
    out = {}
    for k in records[0]:
        if k in _LAST_VALUE_METRICS:
            out[k] = float(records[-1][k])
        elif k in _SUM_METRICS:
            out[k] = float(np.sum([r[k] for r in records]))
        else:
            out[k] = float(np.mean([r[k] for r in kept]))
    return out


class NonFiniteError(RuntimeError):
    """Training produced NaN or Inf; the message names the step and the last good checkpoint."""


def _first_non_finite(records: list[tuple[int, dict[str, np.ndarray]]]) -> tuple[int, str, float] | None:
    """``(step, metric, value)`` of the first non-finite loss or gradient norm, else None.

    ``records`` are ``(1-based step, host metrics)``. float16 steps skipped by the loss scaler
    are expected to overflow and are not errors.
    """
    for step, r in records:
        if r.get("skipped_step", 0.0):
            continue
        for key in ("loss", "grad_norm"):
            if key in r and not np.isfinite(r[key]):
                return step, key, float(r[key])
    return None


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class PreemptionFlag:
    """Set by SIGTERM (preemption); the loop polls it between steps and saves before exiting.

    The handler only sets a flag: saving from inside a signal handler could interleave with a
    step or a save in progress.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> PreemptionFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """True when any process got SIGTERM; every process gets the same answer.

        A collective across processes, so call it at the same steps on every process.
        """
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))


def evaluate(eval_step, state, dataset: input_pipeline.Dataset, driver, config: Any) -> dict[str, float]:
    """One pass over the held-out split; returns loss, accuracy, top5_accuracy, num_examples."""
    total = None
    batches = dataset.eval_iterator(
        config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in input_pipeline.prefetch_to_device(batches, driver.place_batch, config.prefetch_to_device):
        sums = eval_step(state, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ConfigError(f"the eval split of {dataset.info.name} is empty.")
    return steps.summarize_eval(driver.to_host(total))


def _last_eval(workdir: str, step: int) -> dict[str, Any] | None:
    path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    if not os.path.exists(path):
        return None
    found = None
    for r in metrics_lib.read_metrics(path):
        if r.get("split") == "eval" and r.get("step") == step:
            found = r
    return found


def _format_eval(m: dict[str, Any]) -> str:
    return (
        f"accuracy {100 * m['accuracy']:.2f}%  top-5 {100 * m['top5_accuracy']:.2f}%  "
        f"loss {m['loss']:.4f}  ({m['num_examples']} examples)"
    )


def _train_batches(dataset, config, driver, start_step: int) -> Iterator[Any]:
    host_batches = dataset.train_iterator(
        config.batch_size,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if config.dataset == input_pipeline.SYNTHETIC:
        # Benchmarks measure the model, not host-to-device copies: place the batch once.
        placed = driver.place_batch(next(host_batches))
        while True:
            yield placed
    yield from input_pipeline.prefetch_to_device(host_batches, driver.place_batch, config.prefetch_to_device)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Train (or resume) according to ``config`` in ``workdir``; returns a summary dict."""
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    dataset = input_pipeline.create_dataset(config)
    info = dataset.info
    driver = steps.make_driver(config.parallelism)
    axis_name = steps.PMAP_AXIS if config.parallelism == "pmap" else None

    steps_per_epoch = dataset.steps_per_epoch(config.batch_size, jax.process_count())
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {info.num_train_examples} "
            f"training examples of {info.name}."
        )
    if config.num_train_steps > 0:
        total_steps = int(config.num_train_steps)
    else:
        total_steps = round(config.num_epochs * steps_per_epoch)

    model, dtype = create_model(config, info, axis_name)
    schedule = optim.create_lr_schedule(config, steps_per_epoch, total_steps)
    tx = optim.create_optimizer(config, schedule)
    create_fn = functools.partial(
        steps.create_train_state,
        jax.random.key(config.seed, impl=config.get("rng_impl") or None),
        model,
        tx,
        (1, *info.image_shape),
        dynamic_scale=dtype == jnp.float16,
    )
    input_stats = (info.mean, info.std)  # normalises uint8 batches on the device
    save_run_info(workdir, config, info)
    ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    eval_step = CompiledOnFirstCall(
        driver.eval_step(steps.make_eval_step(model, axis_name=axis_name, input_stats=input_stats)),
        "eval_step",
    )

    # Resume, or start fresh.
    template = jax.eval_shape(create_fn)
    restore_step = None if config.restore_step < 0 else int(config.restore_step)
    restored = ckpt.restore(template, restore_step) if ckpt.all_steps() else None
    if is_main:
        for bad_step, reason in ckpt.damaged:
            print(
                f"warning: checkpoint step {bad_step} in {ckpt.directory} is damaged ({reason}); "
                f"moved it to {ckpt.damaged_directory} and falling back to the previous one.",
                file=sys.stderr,
                flush=True,
            )
    if restored is not None:
        host_state, _meta = restored
        state = driver.place_state(host_state)
        start_step = int(host_state.step)
        if is_main:
            print(f"Resuming from checkpoint step {start_step} in {ckpt.directory}", flush=True)
    else:
        if config.eval_only:
            raise ConfigError(f"eval_only: no checkpoint in {ckpt.directory}.")
        if ckpt.damaged:
            # Every checkpoint was unreadable: starting over silently would lose the whole run.
            raise ConfigError(
                f"no readable checkpoint in {ckpt.directory} (the damaged ones, or ones saved "
                f"with another config.model, were moved to {ckpt.damaged_directory}); restore "
                f"the config they were saved with, or use a new workdir to start over."
            )
        state = driver.init_state(create_fn)
        if config.get("init_from_torch"):
            state = driver.place_state(_init_from_torch(config.init_from_torch, model, driver.to_host(state)))
        start_step = 0

    summary: dict[str, Any] = {
        "workdir": workdir,
        "checkpoint_dir": ckpt.directory,
        "metrics_file": writer.path,
        "tensorboard_dir": os.path.join(workdir, metrics_lib.TENSORBOARD_DIR),
        "start_step": start_step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "num_devices": driver.num_devices,
        "num_processes": jax.process_count(),
        "checkpoints_saved": bool(config.save_checkpoints),
    }

    if config.eval_only:
        result = evaluate(eval_step, state, dataset, driver, config)
        writer.write(start_step, "eval", result)
        writer.close()
        ckpt.close()
        summary["eval"] = result
        if is_main:
            print(f"Eval of checkpoint step {start_step}: {_format_eval(result)}", flush=True)
        return summary

    writer.truncate_after(start_step)
    train_step = CompiledOnFirstCall(
        driver.train_step(
            steps.make_train_step(
                model,
                tx,
                label_smoothing=config.label_smoothing,
                axis_name=axis_name,
                lr_schedule=schedule,
                input_stats=input_stats,
            )
        ),
        "train_step",
    )

    def meta_for(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "epoch": step // steps_per_epoch,
            "step_in_epoch": step % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "batch_size": int(config.batch_size),
            "seed": int(config.seed),
            "dataset": config.dataset,
            "num_processes": jax.process_count(),
        }

    def check_finite(records: list[tuple[int, Any]]) -> None:
        """Raise ``NonFiniteError`` if any step in ``records`` (device metrics) went non-finite."""
        bad = _first_non_finite([(s, driver.to_host(m)) for s, m in records])
        if bad is not None:
            raise_non_finite(*bad)

    def raise_non_finite(step: int, what: str, value: Any) -> None:
        ckpt.wait()
        last = ckpt.latest_step()
        where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved"
        name = {"loss": "loss", "grad_norm": "the gradient norm"}.get(what, what)
        raise NonFiniteError(
            f"{name} became {value} at step {step}; {where} in {ckpt.directory}. Lower "
            f"config.learning_rate (or add warm-up, or use float32), then rerun to resume."
        )

    def save(step: int) -> None:
        if not config.save_checkpoints:
            return
        # Never write NaN/Inf: a poisoned checkpoint would make every resume fail the same way.
        if not bool(np.asarray(_all_finite(state.params).addressable_data(0))):
            raise_non_finite(step, "the parameters", "NaN/Inf")
        ckpt.save(step, driver.to_host(state), meta_for(step))

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(eval_step, state, dataset, driver, config)
        writer.write(step, "eval", result)
        return result

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (is_main and config.progress_bar),
        dynamic_ncols=True,
    )
    last_eval = None
    compile_time = None
    throughput: list[float] = []
    train_time = 0.0
    skipped_steps = 0
    preempted_at: int | None = None
    nan_step = int(config.get("debug_nan_step", -1))
    delay = float(config.get("debug_step_delay_s", 0.0))
    run_start = time.perf_counter()
    if start_step < total_steps:
        batches = _train_batches(dataset, config, driver, start_step)
        pending: list[tuple[int, Any]] = []  # (1-based step, device metrics) since the last log
        # images/s counts only time spent training: eval and checkpoint pauses are excluded.
        active_time, window_steps, mark = 0.0, 0, time.perf_counter()
        with PreemptionFlag() as preemption:
            for step in range(start_step, total_steps):
                batch = next(batches)
                if step == nan_step:
                    # Test hook: a real NaN flowing through the forward and backward passes.
                    batch = {**batch, "image": batch["image"] * jnp.nan}
                if compile_time is None:
                    state, m = train_step(state, batch)
                    jax.block_until_ready(m)
                    compile_time = train_step.compile_time
                    writer.write(step + 1, "train", {"compile_time_s": compile_time})
                    mark = time.perf_counter()
                else:
                    state, m = train_step(state, batch)
                    window_steps += 1
                done = step + 1
                pending.append((done, m))
                if delay:
                    time.sleep(delay)
                log_due = done % config.log_every_steps == 0 or done == total_steps
                if log_due:
                    records = [(s, driver.to_host(r)) for s, r in pending]  # waits for the steps
                    bad = _first_non_finite(records)
                    if bad is not None:
                        raise_non_finite(*bad)
                    host = _mean_metrics([r for _, r in records])
                    pending = []
                    now = time.perf_counter()
                    active_time += now - mark
                    mark = now
                    if window_steps:
                        host["images_per_sec"] = window_steps * config.batch_size / active_time
                        throughput.append(host["images_per_sec"])
                        train_time += active_time
                    active_time, window_steps = 0.0, 0
                    host["epoch"] = done / steps_per_epoch
                    if "skipped_step" in host:
                        skipped_steps += int(host.pop("skipped_step"))
                        host["skipped_steps_total"] = skipped_steps
                    writer.write(done, "train", host)
                    bar.set_postfix(
                        loss=f"{host['loss']:.4f}",
                        acc=f"{host['accuracy']:.3f}",
                        img_s=f"{host.get('images_per_sec', 0):.0f}",
                    )
                bar.update(1)
                if done == total_steps:
                    break
                # One process alone must not stop: all agree, at the same step, on whether to.
                # Across processes that is a collective, so it runs only at log steps.
                if (jax.process_count() == 1 or log_due) and preemption.agreed():
                    check_finite(pending)
                    pending = []
                    save(done)
                    ckpt.wait()
                    preempted_at = done
                    break
                eval_due = (config.eval_every_steps > 0 and done % config.eval_every_steps == 0) or (
                    config.eval_every_steps == 0 and done % steps_per_epoch == 0
                )
                ckpt_due = config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0
                if eval_due or ckpt_due:
                    jax.block_until_ready(state)
                    active_time += time.perf_counter() - mark
                    if eval_due:
                        last_eval = run_eval(done)
                        if is_main:
                            bar.write(f"step {done}: eval {_format_eval(last_eval)}")
                    if ckpt_due:
                        check_finite(pending)
                        save(done)
                    mark = time.perf_counter()
        if preempted_at is None:
            save(total_steps)
    bar.close()

    if preempted_at is not None:
        ckpt.close()
        writer.close()
        saved = f"saved checkpoint step {preempted_at}" if config.save_checkpoints else "nothing saved"
        summary.update({"final_step": preempted_at, "preempted": True, "skipped_steps": skipped_steps})
        if is_main:
            print(
                f"Preempted (SIGTERM) at step {preempted_at}: {saved} in {ckpt.directory}; rerun "
                f"the same command to resume.",
                flush=True,
            )
        return summary

    final = None
    if config.eval_at_end:
        final = _last_eval(workdir, total_steps) if start_step >= total_steps else None
        if final is None:
            final = run_eval(total_steps)
        last_eval = final
    ckpt.close()
    writer.close()
    curves = metrics_lib.plot_curves(workdir) if is_main else None

    summary.update(
        {
            "final_step": total_steps,
            "eval": last_eval,
            "compile_time_s": compile_time,
            "images_per_sec": float(np.median(throughput)) if throughput else None,
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - run_start,
            "curves": curves,
            "skipped_steps": skipped_steps,
        }
    )
    if is_main:
        print(format_summary(summary, already_done=start_step >= total_steps), flush=True)
    return summary


def format_summary(s: dict[str, Any], already_done: bool = False) -> str:
    lines = []
    if already_done:
        lines.append(f"Already trained to step {s['final_step']} (checkpoint in {s['checkpoint_dir']}).")
    else:
        epochs = s["final_step"] / s["steps_per_epoch"]
        lines.append(
            f"Done: {s['final_step']} steps ({epochs:.1f} epochs) on {s['num_devices']} "
            f"device(s), {s['num_processes']} process(es), in {s['wall_time_s']:.1f} s."
        )
    if s.get("eval"):
        lines.append(f"  final eval:  {_format_eval(s['eval'])}")
    if s.get("images_per_sec"):
        lines.append(
            f"  throughput:  {s['images_per_sec']:,.0f} images/s (training, median over log "
            f"windows); compilation {s['compile_time_s']:.1f} s"
        )
    if s.get("skipped_steps"):
        lines.append(f"  float16:     {s['skipped_steps']} step(s) skipped on overflow (loss scaling)")
    if s.get("checkpoints_saved", True):
        lines.append(f"  checkpoints: {s['checkpoint_dir']}")
    else:
        lines.append("  checkpoints: none (config.save_checkpoints=False)")
    lines.append(f"  metrics:     {s['metrics_file']}  (TensorBoard: {s['tensorboard_dir']})")
    if s.get("curves"):
        lines.append(f"  curves:      {s['curves']}")
    return "\n".join(lines)
