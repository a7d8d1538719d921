"""The training loop's periodic actions, each small and tested on its own
(``tests/test_train_periodic.py``).

* when: ``log_due``, ``eval_due``, ``checkpoint_due``;
* ``Throughput``: images/s over training time only (compilation, evaluation and checkpoint
  pauses excluded);
* ``TrainLog``: collects each step's metrics on the device and, at log steps, fetches,
  checks, averages and writes them;
* ``NonFiniteGuard``: stops the run at the first NaN/Inf loss or gradient norm, and never
  lets a non-finite checkpoint be written;
* ``PreemptionFlag``: SIGTERM or Ctrl-C asks the loop to save and stop, agreed on by every
  process;
* ``checkpoint_meta``: what a checkpoint records about where the run stood.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import metrics as metrics_lib
from train import utilisation


def log_due(step: int, every_steps: int, total_steps: int) -> bool:
    """Train metrics are written every ``every_steps`` steps and at the last step."""
    return step % every_steps == 0 or step == total_steps


def eval_due(step: int, every_steps: int, steps_per_epoch: int) -> bool:
    """``every_steps`` > 0: every that many steps; 0: at the end of each epoch; < 0: never
    (the final evaluation is ``config.eval_at_end``)."""
    if every_steps > 0:
        return step % every_steps == 0
    if every_steps == 0:
        return step % steps_per_epoch == 0
    return False


def checkpoint_due(step: int, every_steps: int) -> bool:
    """Every ``every_steps`` steps when positive (the last step is always saved by the loop)."""
    return every_steps > 0 and step % every_steps == 0


def checkpoint_meta(config: Any, step: int, steps_per_epoch: int) -> dict[str, Any]:
    """Saved beside each checkpoint: where in the data the run stood, to resume exactly there."""
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


class Throughput:
    """images/s over the time spent training.

    ``restart()`` after compiling and after every pause, ``step()`` per timed step, ``pause()``
    before evaluating or checkpointing (after the device has finished), ``window()`` at each log
    step: the rate since the previous one, or None when no step was timed.
    """

    def __init__(self, batch_size: int, clock: Callable[[], float] = time.perf_counter):
        self.batch_size = batch_size
        self.clock = clock
        self.rates: list[float] = []
        self.train_time = 0.0
        self._active = 0.0
        self._steps = 0
        self._mark = clock()

    def restart(self) -> None:
        self._mark = self.clock()

    def step(self) -> None:
        self._steps += 1

    def pause(self) -> None:
        self._active += self.clock() - self._mark

    def window(self) -> float | None:
        now = self.clock()
        self._active += now - self._mark
        self._mark = now
        rate = None
        if self._steps:
            rate = self._steps * self.batch_size / self._active
            self.rates.append(rate)
            self.train_time += self._active
        self._active, self._steps = 0.0, 0
        return rate

    def median(self) -> float | None:
        return float(np.median(self.rates)) if self.rates else None


class NonFiniteError(RuntimeError):
    """Training produced NaN or Inf; the message names the step and the last good checkpoint."""


def first_non_finite(records: list[tuple[int, dict[str, np.ndarray]]]) -> tuple[int, str, float] | None:
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


class NonFiniteGuard:
    """Raises ``NonFiniteError`` naming the step and the last good checkpoint.

    ``ckpt`` needs ``wait()``, ``latest_step()`` and ``directory``; ``to_host`` fetches device
    metrics.
    """

    def __init__(self, ckpt: Any, to_host: Callable[[Any], Any]):
        self.ckpt = ckpt
        self.to_host = to_host

    def check_host(self, records: list[tuple[int, dict[str, np.ndarray]]]) -> None:
        bad = first_non_finite(records)
        if bad is not None:
            self.fail(*bad)

    def check(self, records: list[tuple[int, Any]]) -> None:
        """The same for device metrics (fetching them waits for their steps)."""
        self.check_host([(s, self.to_host(m)) for s, m in records])

    def check_params(self, params: Any, step: int) -> None:
        """Never write NaN/Inf: a poisoned checkpoint would make every resume fail the same way."""
        if not bool(np.asarray(_all_finite(params).addressable_data(0))):
            self.fail(step, "the parameters", "NaN/Inf")

    def fail(self, step: int, what: str, value: Any) -> None:
        self.ckpt.wait()
        last = self.ckpt.latest_step()
        where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved"
        name = {"loss": "loss", "grad_norm": "the gradient norm"}.get(what, what)
        raise NonFiniteError(
            f"{name} became {value} at step {step}; {where} in {self.ckpt.directory}. Lower "
            f"config.learning_rate (or add warm-up, or use float32), then rerun to resume."
        )


# Per-step settings rather than measurements: report the window's last value, not its mean.
_LAST_VALUE_METRICS = ("learning_rate", "loss_scale")
# Counts: report the window's sum.
_SUM_METRICS = ("skipped_step",)


def mean_metrics(records: list[dict[str, np.ndarray]]) -> dict[str, float]:
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


class TrainLog:
    """Each step's metrics stay on the device until a log step; then ``flush`` fetches them
    (waiting for those steps), checks them, averages them, adds images/s (in all and per chip,
    with TFLOP/s per chip and MFU where the step's FLOPs and the chip's peak are known), the
    epoch and the running count of float16 steps skipped on overflow, and writes one record."""

    def __init__(self, writer: Any, guard: NonFiniteGuard, throughput: Throughput, steps_per_epoch: int):
        self.writer = writer
        self.guard = guard
        self.throughput = throughput
        self.steps_per_epoch = steps_per_epoch
        self.pending: list[tuple[int, Any]] = []  # (1-based step, device metrics) since the last log
        self.skipped_steps = 0
        self.num_devices = 1
        self.flops_per_step: float | None = None  # per device; set once the step is compiled
        self.peak_tflops: float | None = None  # per chip; None: no MFU

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))

    def flush(self, step: int, extra: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
        """Write the window's record; ``extra()`` adds to it once its steps have finished."""
        records = [(s, self.guard.to_host(m)) for s, m in self.pending]
        self.guard.check_host(records)
        host = mean_metrics([r for _, r in records])
        self.pending = []
        rate = self.throughput.window()
        if rate is not None:
            host["images_per_sec"] = rate
            host.update(
                utilisation.rates(
                    rate, self.throughput.batch_size, self.num_devices, self.flops_per_step, self.peak_tflops
                )
            )
        if extra is not None:
            host.update(extra())
        host["epoch"] = step / self.steps_per_epoch
        if "skipped_step" in host:
            self.skipped_steps += int(host.pop("skipped_step"))
            host["skipped_steps_total"] = self.skipped_steps
        self.writer.write(step, "train", host)
        return host

    def check_pending(self) -> None:
        """Check the steps not yet logged (before a checkpoint is written)."""
        self.guard.check(self.pending)
        self.pending = []


class PreemptionFlag:
    """Set by SIGTERM (preemption) or a first Ctrl-C (SIGINT); the loop polls it between steps
    and saves before exiting. A second Ctrl-C raises ``KeyboardInterrupt`` at once, unsaved:
    the way out of a save that takes too long.

    The handler only sets a flag: saving from inside a signal handler could interleave with a
    step or a save in progress.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None  # 'SIGTERM' or 'SIGINT': the first one received here
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def agreed(self) -> bool:
        """True when any process got SIGTERM or SIGINT; every process gets the same answer.

        A collective across processes, so call it at the same steps on every process.
        """
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))

    def stop_now(self, at_log_step: bool) -> bool:
        """Whether to save and stop after this step. One process alone must not stop: all agree,
        at the same step. Across processes that is a collective, so it runs only at log steps."""
        return (jax.process_count() == 1 or at_log_step) and self.agreed()


def eval_summary(m: dict[str, Any], num_classes: int | None = None) -> str:
    """One line of eval metrics; top-5 only with more than 5 classes (else it is always 100%);
    the EMA's after the model's when the run keeps one (``ema_accuracy``, ...)."""

    def part(prefix: str) -> str:
        top5 = m[f"{prefix}top5_accuracy"]
        top5 = f"top-5 {100 * top5:.2f}%  " if num_classes is None or num_classes > 5 else ""
        return f"accuracy {100 * m[f'{prefix}accuracy']:.2f}%  {top5}loss {m[f'{prefix}loss']:.4f}"

    line = f"{part('')}  ({m['num_examples']} examples)"
    return f"{line};  EMA {part('ema_')}" if "ema_accuracy" in m else line


def last_logged_eval(workdir: str, step: int) -> dict[str, Any] | None:
    """The eval record a previous run wrote for ``step``, if any."""
    if not metrics_lib.has_metrics(workdir):
        return None
    found = None
    for r in metrics_lib.read_metrics(workdir):
        if r.get("split") == "eval" and r.get("step") == step:
            found = r
    return found
