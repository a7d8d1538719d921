"""The training loop: ``train_and_evaluate(config, workdir)``.

Build (``train/build.py``), restore or init, train, finish. Training logs metrics with images/s
to ``metrics.jsonl`` and TensorBoard, evaluates and checkpoints periodically, stops at the first
NaN/Inf and saves on SIGTERM or Ctrl-C (``train/periodic.py``: one small piece per periodic action), then
ends with a final evaluation, a PNG of the curves and a summary. ``config.eval_only``
evaluates a checkpoint instead of training. Each train record also carries the chips' utilisation
(``train/utilisation.py``: TFLOP/s per chip, MFU), the share of time spent waiting for input and
the run's goodput so far (``train/goodput.py``); ``config.profile_num_steps`` traces a window of
steps (``train/profiling.py``).

Run layout: ``WORKDIR/config.json`` (the resolved config), ``dataset_info.json`` (classes,
image shape, normalisation; used by ``train.predict``), ``checkpoints/<step>/``,
``metrics.jsonl``, ``tensorboard/``, ``training_curves.png``. ``WORKDIR`` may be a Cloud Storage
path (``gs://bucket/run``); its metrics are then segments ``metrics/part-NNNNNN.jsonl``
(``train/metrics.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from train import ema, paths, periodic, profiling, steps, utilisation
from train import goodput as goodput_lib
from train import metrics as metrics_lib
from train.build import Run, build_run, restore_or_init
from train.config import ConfigError
from train.data.core import Dataset, prefetch_to_device
from train.periodic import NonFiniteError  # noqa: F401  (part of this module's interface)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Train (or resume) according to ``config`` in ``workdir``; returns a summary dict."""
    goodput = goodput_lib.Goodput()  # start-up from here to the first step
    run = build_run(config, workdir)
    state, start_step = restore_or_init(run)
    summary = _summary_head(run, start_step)
    if config.eval_only:
        return _eval_only(run, state, start_step, summary)
    redo_until = _previous_goodput(run, goodput)  # before the records past the checkpoint go
    run.writer.truncate_after(start_step)
    run_start = time.perf_counter()
    try:
        outcome = _train(run, state, start_step, goodput, redo_until)
    except BaseException:
        run.writer.flush()  # a bucket's buffered records (a NaN stop names their steps)
        raise
    return _finish(run, outcome, start_step, summary, time.perf_counter() - run_start)


def _previous_goodput(run: Run, goodput: goodput_lib.Goodput) -> int:
    """Give ``goodput`` the totals of the runs before this one in the workdir; returns the
    furthest step they logged (the steps up to it that this run does again are redone)."""
    if not run.is_main:
        return 0
    records = metrics_lib.read_metrics(run.workdir) if metrics_lib.has_metrics(run.workdir) else []
    previous, furthest = goodput_lib.load(run.workdir, records)
    goodput.set_previous(previous)
    goodput.furthest_step = furthest
    return furthest


@dataclasses.dataclass
class Outcome:
    """What the training part leaves for the summary."""

    state: Any
    throughput: periodic.Throughput
    skipped_steps: int = 0
    compile_time: float | None = None
    last_eval: dict[str, float] | None = None
    preempted_at: int | None = None
    stopped_by: str | None = None  # the signal that stopped it here ('SIGTERM', 'SIGINT')
    goodput: goodput_lib.Goodput = dataclasses.field(default_factory=goodput_lib.Goodput)
    flops_per_step: float | None = None  # per device, from the compiled step


def _train(
    run: Run, state: Any, start_step: int, goodput: goodput_lib.Goodput, redo_until: int = 0
) -> Outcome:
    """Steps ``start_step + 1 .. total_steps`` with logging, evaluation, checkpoints, NaN checks
    and preemption; the last step (or the preempted one) is saved. Steps up to ``redo_until``
    were run before a restart and count as redone."""
    config, total = run.config, run.total_steps
    guard = periodic.NonFiniteGuard(run.ckpt, run.driver.to_host)
    out = Outcome(state, periodic.Throughput(config.batch_size), goodput=goodput)
    log = periodic.TrainLog(run.writer, guard, out.throughput, run.steps_per_epoch)
    log.num_devices = run.driver.num_devices
    log.peak_tflops = utilisation.peak_tflops(jax.devices()[0].device_kind, float(config.peak_tflops))
    profile = profiling.ProfileWindow(run.workdir, config.profile_start_step, config.profile_num_steps, total)
    bar = _progress_bar(run, start_step)
    if start_step < total:
        batches = _train_batches(run, start_step)
        with periodic.PreemptionFlag() as preemption, profile:
            for done in range(start_step + 1, total + 1):
                goodput.switch("input_wait")
                batch = next(batches)
                goodput.switch("redone" if done <= redo_until else "productive")
                goodput.redone_steps += int(done <= redo_until)
                profile.before_step(done)
                _one_step(run, out, batch, done, log)
                if profile.tracing and done >= profile.stop:
                    _stop_profile(out, profile)
                logged = periodic.log_due(done, config.log_every_steps, total)
                if logged:
                    _show(bar, log.flush(done, functools.partial(_window_goodput, run, goodput, done)))
                bar.update(1)
                if done == total:
                    break
                if preemption.stop_now(at_log_step=logged):
                    with goodput.part("checkpoint"):
                        log.check_pending()
                        _save(run, out.state, done, guard)
                        run.ckpt.wait()
                    out.preempted_at = done
                    out.stopped_by = preemption.signal
                    break
                _evaluate_and_checkpoint(run, out, done, log, guard, bar)
            _stop_profile(out, profile)  # a run stopped inside the window
        if out.preempted_at is None:
            with goodput.part("checkpoint"):
                _save(run, out.state, total, guard)
    bar.close()
    out.skipped_steps = log.skipped_steps
    return out


def _one_step(run: Run, out: Outcome, batch: Any, done: int, log: periodic.TrainLog) -> None:
    """One train step (the first compiles, and its time is recorded apart from throughput)."""
    if done - 1 == int(run.config.debug_nan_step):
        # Test hook: a real NaN flowing through the forward and backward passes.
        batch = {**batch, "image": batch["image"] * jnp.nan}
    out.state, metrics = run.train_step(out.state, batch)
    if out.compile_time is None:
        jax.block_until_ready(metrics)
        out.compile_time = run.train_step.compile_time
        out.goodput.move(out.compile_time, "compile")
        with out.goodput.part("compile"):
            out.flops_per_step = _flops_per_step(run, out.state, batch)
        log.flops_per_step = out.flops_per_step
        first = {"compile_time_s": out.compile_time}
        if out.flops_per_step:
            first["flops_per_step_per_chip"] = out.flops_per_step
        if log.peak_tflops:
            first["peak_tflops_per_chip"] = log.peak_tflops
        run.writer.write(done, "train", first)
        out.throughput.restart()
    else:
        out.throughput.step()
    log.add(done, metrics)
    delay = float(run.config.debug_step_delay_s)
    if delay:  # test hook: slow steps, so a signal can arrive mid-run
        time.sleep(delay)


def _flops_per_step(run: Run, state: Any, batch: Any) -> float | None:
    """FLOPs of one train step per device: the compiled step's cost analysis, with the loop over
    micro-batches of gradient accumulation counted as many times as it runs
    (``train/utilisation.py``)."""
    flops = utilisation.compiled_flops(run.train_step.compiled)
    if flops and int(run.config.grad_accum_steps) > 1:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
        flops *= utilisation.loop_factor(run.train_step.fn, *shapes)
    return flops


def _window_goodput(run: Run, goodput: goodput_lib.Goodput, step: int) -> dict[str, float]:
    """What a train record adds about time: the log window's input wait, the goodput so far,
    which process 0 also writes to the workdir's goodput file (what survives a kill)."""
    out = goodput.totals()
    wait = goodput.input_wait_fraction()
    if wait is not None:
        out["input_wait_fraction"] = wait
    if run.is_main:
        with goodput.part("other"):
            goodput.furthest_step = max(goodput.furthest_step, step)
            goodput_lib.save(run.workdir, goodput.totals(), goodput.furthest_step)
    return out


def _stop_profile(out: Outcome, profile: profiling.ProfileWindow) -> None:
    """End the trace after its window's device work; its writing is not training time."""
    if not profile.tracing:
        return
    jax.block_until_ready(out.state)
    out.throughput.pause()
    with out.goodput.part("profiler"):
        profile.finish()
    out.throughput.restart()


def _evaluate_and_checkpoint(run: Run, out: Outcome, done: int, log, guard, bar) -> None:
    """The periodic pauses; their time does not count as training time."""
    config = run.config
    eval_now = periodic.eval_due(done, config.eval_every_steps, run.steps_per_epoch)
    ckpt_now = periodic.checkpoint_due(done, config.checkpoint_every_steps)
    if not (eval_now or ckpt_now):
        return
    jax.block_until_ready(out.state)
    out.throughput.pause()
    if eval_now:
        with out.goodput.part("eval"):
            out.last_eval = _run_eval(run, out.state, done)
        if run.is_main:
            bar.write(
                f"step {done}: eval {periodic.eval_summary(out.last_eval, run.dataset.info.num_classes)}"
            )
    if ckpt_now:
        with out.goodput.part("checkpoint"):
            log.check_pending()
            _save(run, out.state, done, guard)
    out.throughput.restart()


def _save(run: Run, state: Any, step: int, guard: periodic.NonFiniteGuard) -> None:
    # The records up to this step are written before the checkpoint is: a resume from it then
    # finds all of them (a gs:// workdir buffers them; see train/metrics.py).
    run.writer.flush()
    if not run.config.save_checkpoints:
        return
    guard.check_params(state.params, step)
    meta = periodic.checkpoint_meta(run.config, step, run.steps_per_epoch)
    run.ckpt.save(step, run.driver.to_host(state), meta)


def evaluate(eval_step, state, dataset: Dataset, driver, config: Any) -> dict[str, float]:
    """One pass over the held-out split; returns loss, accuracy, top5_accuracy, num_examples."""
    total = None
    batches = dataset.eval_iterator(
        config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in prefetch_to_device(batches, driver.place_batch, config.prefetch_to_device):
        sums = eval_step(state, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ConfigError(f"the eval split of {dataset.info.name} is empty.")
    return steps.summarize_eval(driver.to_host(total))


def evaluate_with_ema(run: Run, state: Any) -> dict[str, float]:
    """``evaluate`` of the model and, when the run keeps one, of its EMA (``ema_accuracy``, ...)."""
    result = evaluate(run.eval_step, state, run.dataset, run.driver, run.config)
    if state.ema is not None:
        averaged = evaluate(run.eval_step, ema.as_model(state), run.dataset, run.driver, run.config)
        result.update(ema.prefixed(averaged))
    return result


def _run_eval(run: Run, state: Any, step: int) -> dict[str, float]:
    result = evaluate_with_ema(run, state)
    run.writer.write(step, "eval", result)
    return result


def _train_batches(run: Run, start_step: int) -> Iterator[Any]:
    config, driver = run.config, run.driver
    host_batches = run.dataset.train_iterator(
        config.batch_size,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if run.dataset.repeats_one_batch:
        # Benchmarks measure the model, not host-to-device copies: place the batch once.
        placed = driver.place_batch(next(host_batches))
        while True:
            yield placed
    yield from prefetch_to_device(host_batches, driver.place_batch, config.prefetch_to_device)


def _progress_bar(run: Run, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=run.total_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (run.is_main and run.config.progress_bar),
        dynamic_ncols=True,
    )


def _show(bar, host: dict[str, float]) -> None:
    shown = {
        "loss": f"{host['loss']:.4f}",
        "acc": f"{host['accuracy']:.3f}",
        "img_s": f"{host.get('images_per_sec', 0):.0f}",
    }
    if "tflops_per_chip" in host:
        shown["tflops_chip"] = f"{host['tflops_per_chip']:.3g}"
    if "mfu" in host:
        shown["mfu"] = f"{100 * host['mfu']:.1f}%"
    bar.set_postfix(shown)


def _summary_head(run: Run, start_step: int) -> dict[str, Any]:
    return {
        "workdir": run.workdir,
        "checkpoint_dir": run.ckpt.directory,
        "metrics_file": run.writer.path,
        "tensorboard_dir": paths.join(run.workdir, metrics_lib.TENSORBOARD_DIR),
        "start_step": start_step,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "num_classes": run.dataset.info.num_classes,
        "num_devices": run.driver.num_devices,
        "mesh_axis_types": run.driver.axis_types,
        "num_processes": jax.process_count(),
        "checkpoints_saved": bool(run.config.save_checkpoints),
    }


def _eval_only(run: Run, state: Any, step: int, summary: dict[str, Any]) -> dict[str, Any]:
    result = evaluate_with_ema(run, state)
    run.writer.write(step, "eval", result)
    run.writer.close()
    run.ckpt.close()
    summary["eval"] = result
    if run.is_main:
        print(
            f"Eval of checkpoint step {step}: {periodic.eval_summary(result, summary['num_classes'])}",
            flush=True,
        )
    return summary


def _final_goodput(run: Run, goodput: goodput_lib.Goodput, step: int) -> dict[str, float]:
    """The run's last goodput totals, as its last train record and in the goodput file."""
    totals = goodput.totals()
    run.writer.write(step, "train", totals)
    if run.is_main:
        goodput_lib.save(run.workdir, totals, max(goodput.furthest_step, step))
    return totals


def _finish(run: Run, out: Outcome, start_step: int, summary: dict[str, Any], wall: float) -> dict[str, Any]:
    """Preempted: say how to resume. Done: final evaluation, curves, summary."""
    goodput = out.goodput
    if out.preempted_at is not None:
        with goodput.part("checkpoint"):
            run.ckpt.close()
        goodput.switch("other")
        summary["goodput"] = _final_goodput(run, goodput, out.preempted_at)
        run.writer.close()
        saved = (
            f"saved checkpoint step {out.preempted_at}" if run.config.save_checkpoints else "nothing saved"
        )
        # Another host's signal stops this one too: that is a preemption here.
        stopped_by = out.stopped_by or "SIGTERM"
        summary.update(
            {
                "final_step": out.preempted_at,
                "preempted": True,
                "stopped_by": stopped_by,
                "skipped_steps": out.skipped_steps,
            }
        )
        if run.is_main:
            interrupted = stopped_by == "SIGINT"  # Ctrl-C: exit 130, so the line goes to stderr
            print(
                f"{'Interrupted (Ctrl-C)' if interrupted else 'Preempted (SIGTERM)'} at step "
                f"{out.preempted_at}: {saved} in {run.ckpt.directory}; rerun the same command to resume.",
                file=sys.stderr if interrupted else sys.stdout,
                flush=True,
            )
        return summary
    already_done = start_step >= run.total_steps
    if run.config.eval_at_end:
        final = periodic.last_logged_eval(run.workdir, run.total_steps) if already_done else None
        with goodput.part("eval"):
            out.last_eval = final if final is not None else _run_eval(run, out.state, run.total_steps)
    with goodput.part("checkpoint"):
        run.ckpt.close()
    goodput.switch("other")
    run.writer.flush()  # a bucket's records, for the curves
    curves = metrics_lib.plot_curves(run.workdir) if run.is_main else None
    if already_done:  # a rerun of a finished run leaves its metrics as they were
        summary["goodput"] = goodput.totals()
    else:
        summary["goodput"] = _final_goodput(run, goodput, run.total_steps)
    run.writer.close()
    summary.update(
        {
            "final_step": run.total_steps,
            "eval": out.last_eval,
            "compile_time_s": out.compile_time,
            "aot_loaded": run.train_step.loaded,
            "images_per_sec": out.throughput.median(),
            "train_time_s": out.throughput.train_time,
            "wall_time_s": wall,
            "curves": curves,
            "skipped_steps": out.skipped_steps,
        }
    )
    if run.is_main:
        print(format_summary(summary, already_done=already_done), flush=True)
    return summary


def format_summary(s: dict[str, Any], already_done: bool = False) -> str:
    lines = []
    if already_done:
        lines.append(f"Already trained to step {s['final_step']} (checkpoint in {s['checkpoint_dir']}).")
    else:
        epochs = s["final_step"] / s["steps_per_epoch"]
        lines.append(
            f"Done: {s['final_step']} steps ({epochs:.1f} epochs) on {s['num_devices']} "
            f"device(s) ({s['mesh_axis_types']}), {s['num_processes']} process(es), "
            f"in {s['wall_time_s']:.1f} s."
        )
    if s.get("eval"):
        lines.append(f"  final eval:  {periodic.eval_summary(s['eval'], s.get('num_classes'))}")
    if s.get("images_per_sec"):
        lines.append(
            f"  throughput:  {s['images_per_sec']:,.0f} images/s (training, median over log "
            f"windows); {'loaded ahead-of-time executable' if s.get('aot_loaded') else 'compilation'} "
            f"{s['compile_time_s']:.1f} s"
        )
    if s.get("goodput"):
        lines.append(f"  goodput:     {goodput_lib.summary_line(s['goodput'])}")
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
