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


def _mean_metrics(records: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Average train metrics over the steps of a log window."""
    return {
        k: float(records[-1][k] if k in _LAST_VALUE_METRICS else np.mean([r[k] for r in records]))
        for k in records[0]
    }


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
    save_run_info(workdir, config, info)
    ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    eval_step = CompiledOnFirstCall(
        driver.eval_step(steps.make_eval_step(model, axis_name=axis_name)), "eval_step"
    )

    # Resume, or start fresh.
    template = jax.eval_shape(create_fn)
    restore_step = None if config.restore_step < 0 else int(config.restore_step)
    restored = ckpt.restore(template, restore_step) if ckpt.all_steps() else None
    if restored is not None:
        host_state, _meta = restored
        state = driver.place_state(host_state)
        start_step = int(host_state.step)
        if is_main:
            print(f"Resuming from checkpoint step {start_step} in {ckpt.directory}", flush=True)
    else:
        if config.eval_only:
            raise ConfigError(f"eval_only: no checkpoint in {ckpt.directory}.")
        state = driver.init_state(create_fn)
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

    def save(step: int) -> None:
        if config.save_checkpoints:
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
    run_start = time.perf_counter()
    if start_step < total_steps:
        batches = _train_batches(dataset, config, driver, start_step)
        pending: list[Any] = []
        # images/s counts only time spent training: eval and checkpoint pauses are excluded.
        active_time, window_steps, mark = 0.0, 0, time.perf_counter()
        for step in range(start_step, total_steps):
            batch = next(batches)
            if compile_time is None:
                state, m = train_step(state, batch)
                jax.block_until_ready(m)
                compile_time = train_step.compile_time
                writer.write(step + 1, "train", {"compile_time_s": compile_time})
                mark = time.perf_counter()
            else:
                state, m = train_step(state, batch)
                window_steps += 1
            pending.append(m)
            done = step + 1
            if done % config.log_every_steps == 0 or done == total_steps:
                host = _mean_metrics(driver.to_host(pending))  # waits for the steps
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
                writer.write(done, "train", host)
                bar.set_postfix(
                    loss=f"{host['loss']:.4f}",
                    acc=f"{host['accuracy']:.3f}",
                    img_s=f"{host.get('images_per_sec', 0):.0f}",
                )
            bar.update(1)
            if done == total_steps:
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
                    save(done)
                mark = time.perf_counter()
        save(total_steps)
    bar.close()

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
    if s.get("checkpoints_saved", True):
        lines.append(f"  checkpoints: {s['checkpoint_dir']}")
    else:
        lines.append("  checkpoints: none (config.save_checkpoints=False)")
    lines.append(f"  metrics:     {s['metrics_file']}  (TensorBoard: {s['tensorboard_dir']})")
    if s.get("curves"):
        lines.append(f"  curves:      {s['curves']}")
    return "\n".join(lines)
