"""Each periodic action of the training loop on its own (train/periodic.py): no model, no JAX
compilation beyond a tiny finiteness check, so these run in about a second."""

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax.numpy as jnp  # noqa: E402

from train import periodic  # noqa: E402


def test_when_each_action_is_due():
    assert [s for s in range(1, 11) if periodic.log_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 13) if periodic.eval_due(s, 5, 6)] == [5, 10]
    assert [s for s in range(1, 13) if periodic.eval_due(s, 0, 6)] == [6, 12]  # each epoch end
    assert not any(periodic.eval_due(s, -1, 6) for s in range(1, 13))
    assert [s for s in range(1, 13) if periodic.checkpoint_due(s, 4)] == [4, 8, 12]
    assert not any(periodic.checkpoint_due(s, 0) for s in range(1, 13))


def test_checkpoint_meta_says_where_in_the_data_the_run_stood():
    class Config(dict):
        __getattr__ = dict.__getitem__

    meta = periodic.checkpoint_meta(Config(batch_size=8, seed=3, dataset="digits"), 23, 10)
    assert meta == {
        "step": 23,
        "epoch": 2,
        "step_in_epoch": 3,
        "steps_per_epoch": 10,
        "batch_size": 8,
        "seed": 3,
        "dataset": "digits",
        "num_processes": 1,
    }


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_excludes_compilation_and_pauses():
    clock = FakeClock()
    t = periodic.Throughput(batch_size=10, clock=clock)
    clock.now += 50.0  # compiling: not training time
    t.restart()
    for _ in range(4):
        clock.now += 0.5
        t.step()
    t.pause()  # eval for 30 s
    clock.now += 30.0
    t.restart()
    clock.now += 1.0
    t.step()
    assert t.window() == pytest.approx(5 * 10 / 3.0)  # 5 steps in 2 + 1 s of training
    assert t.window() is None  # nothing timed since
    clock.now += 1.0
    t.step()
    assert t.window() == pytest.approx(10.0 / 1.0)
    assert t.train_time == pytest.approx(4.0)
    assert t.median() == pytest.approx(np.median([50 / 3.0, 10.0]))


class FakeCheckpointer:
    directory = "/runs/x/checkpoints"

    def __init__(self, latest):
        self.latest, self.waited = latest, False

    def wait(self):
        self.waited = True

    def latest_step(self):
        return self.latest


def test_non_finite_guard_names_the_step_and_the_last_good_checkpoint():
    ckpt = FakeCheckpointer(latest=20)
    guard = periodic.NonFiniteGuard(ckpt, to_host=lambda m: m)
    good = {"loss": np.float32(1.0), "grad_norm": np.float32(2.0)}
    guard.check(
        [(21, good), (22, {**good, "loss": np.float32(np.inf), "skipped_step": 1.0})]
    )  # fp16 skip: fine
    with pytest.raises(
        periodic.NonFiniteError,
        match=(
            r"the gradient norm became nan at step 23; "
            r"the last good checkpoint is step 20 in /runs/x/checkpoints"
        ),
    ) as e:
        guard.check(
            [(23, {**good, "grad_norm": np.float32(np.nan)}), (24, {**good, "loss": np.float32(np.nan)})]
        )
    assert "Lower config.learning_rate" in str(e.value) and ckpt.waited
    guard.check_params({"w": jnp.ones(3)}, 30)
    with pytest.raises(
        periodic.NonFiniteError, match="the parameters became NaN/Inf at step 31; no checkpoint"
    ):
        periodic.NonFiniteGuard(FakeCheckpointer(None), lambda m: m).check_params(
            {"w": jnp.array([1.0, jnp.inf])}, 31
        )


class FakeWriter:
    def __init__(self):
        self.records = []

    def write(self, step, split, values):
        self.records.append((step, split, dict(values)))


def test_train_log_averages_checks_and_writes_one_record_per_window():
    clock = FakeClock()
    throughput = periodic.Throughput(batch_size=4, clock=clock)
    writer = FakeWriter()
    guard = periodic.NonFiniteGuard(FakeCheckpointer(None), to_host=lambda m: m)
    log = periodic.TrainLog(writer, guard, throughput, steps_per_epoch=8)
    rows = [
        {"loss": 1.0, "accuracy": 0.5, "learning_rate": 0.1, "skipped_step": 0.0},
        {"loss": np.inf, "accuracy": 0.0, "learning_rate": 0.2, "skipped_step": 1.0},  # fp16 overflow
        {"loss": 3.0, "accuracy": 1.0, "learning_rate": 0.3, "skipped_step": 0.0},
    ]
    for step, row in enumerate(rows, 1):
        clock.now += 1.0
        throughput.step()
        log.add(step, {k: np.float32(v) for k, v in row.items()})
    host = log.flush(4)
    assert writer.records == [(4, "train", host)]
    assert host["loss"] == 2.0 and host["accuracy"] == 0.75  # skipped step left out of means
    assert host["learning_rate"] == pytest.approx(0.3)  # a setting: the window's last value
    assert host["skipped_steps_total"] == 1 and "skipped_step" not in host
    assert host["images_per_sec"] == pytest.approx(3 * 4 / 3.0) and host["epoch"] == 0.5
    assert log.pending == []
    log.add(5, {"loss": np.float32(np.nan), "accuracy": np.float32(0)})
    with pytest.raises(periodic.NonFiniteError, match="at step 5"):
        log.check_pending()


def test_preemption_flag_set_by_sigterm_and_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    with periodic.PreemptionFlag() as flag:
        assert not flag.stop_now(at_log_step=False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested
        assert flag.stop_now(at_log_step=False)  # one process: no need to wait for a log step
    assert signal.getsignal(signal.SIGTERM) is before


def test_first_ctrl_c_sets_the_flag_and_a_second_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with periodic.PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_eval_summary_leaves_out_top5_with_five_classes_or_fewer():
    m = {"accuracy": 0.5, "top5_accuracy": 1.0, "loss": 0.25, "num_examples": 12}
    assert periodic.eval_summary(m, num_classes=3) == "accuracy 50.00%  loss 0.2500  (12 examples)"
    assert periodic.eval_summary(m, num_classes=5) == "accuracy 50.00%  loss 0.2500  (12 examples)"
    assert "top-5 100.00%" in periodic.eval_summary(m, num_classes=6)
    assert "top-5 100.00%" in periodic.eval_summary(m)
