"""Robustness of ``python -m train``, done for real on subprocesses of the CLI: SIGKILL mid-epoch
and SIGTERM (preemption) followed by a restart, truncated checkpoint files, NaNs injected into
the computation, and bad configs / inputs that must fail with one clear line.

Every resumed run is compared bitwise with one uninterrupted reference run of the same command.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import checkpoint  # noqa: E402
from train.metrics import read_metrics  # noqa: E402

STEPS = 30
STEPS_PER_EPOCH = 1437 // 64  # digits train split, batch 64 -> 22: step 30 is mid-epoch 2
# resnet18 reduced to one stage; checkpoints at 7, 14, 21, 28 (none on an epoch boundary) + 30.
ARGS = [
    f"--config.num_train_steps={STEPS}",
    "--config.model.overrides.stage_sizes=(1,)",
    "--config.rng_impl=rbg",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=7",
    "--config.keep_checkpoints=3",
    "--config.eval_every_steps=-1",
    "--config.eval_at_end=False",
    "--config.progress_bar=False",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    return env


def _cmd(workdir, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *ARGS,
        *extra,
    ]


def _run(workdir, *extra, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(workdir, *extra),
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env=env or _env(),
        timeout=timeout,
        check=False,
    )


def _start(workdir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(workdir, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=_env(),
    )


def _last_logged_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [r["step"] for r in read_metrics(path) if "loss" in r]
    return max(steps, default=0)


def _wait_for_step(proc: subprocess.Popen, workdir, step: int, timeout: float = 180) -> int:
    """Poll metrics.jsonl until training logged ``step`` or later; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = _last_logged_step(workdir)
        if seen >= step:
            return seen
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def _assert_same_params(workdir, reference) -> None:
    got = checkpoint.restore_variables(workdir, STEPS)
    want = checkpoint.restore_variables(reference, STEPS)
    flat_got, tree_got = _flatten(got)
    flat_want, tree_want = _flatten(want)
    assert tree_got == tree_want
    for a, b in zip(flat_got, flat_want):
        np.testing.assert_array_equal(a, b)  # bitwise: exact resume, not merely close


def _flatten(tree):
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    return [np.asarray(x) for x in leaves], treedef


# The tests that read the reference run go to one xdist worker (setup.cfg: --dist loadgroup),
# so that it is computed once; the other tests run on the other worker meanwhile.
_SHARES_REFERENCE = pytest.mark.xdist_group("train_robustness_reference")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the same command (workdir is not modified by the tests)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done: {STEPS} steps" in result.stdout
    return workdir


@_SHARES_REFERENCE
def test_sigkill_mid_epoch_then_restart_is_bitwise_identical(reference, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = _start(workdir, "--config.debug_step_delay_s=0.05")
    try:
        # Past the checkpoint at step 14 (epoch 0 ends at step 22): kill mid-epoch, no warning.
        _wait_for_step(proc, workdir, 16)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert STEPS not in checkpoint.Checkpointer(workdir, read_only=True).all_steps()

    restart = _run(workdir)
    assert restart.returncode == 0, restart.stderr[-3000:]
    resumed = int(restart.stdout.split("Resuming from checkpoint step ")[1].split()[0])
    # A mid-epoch resume: the input stream must pick up inside the epoch, not at its start.
    assert 0 < resumed < STEPS and resumed % STEPS_PER_EPOCH != 0, resumed
    _assert_same_params(workdir, reference)


# Issue 43's ingredients so far: drop path (two blocks, so the second has a rate), dropout, timm's
# BCE with smoothing and threshold, AdamW, gradient clipping.
RECIPE = [
    "--config.model.overrides.stage_sizes=(1,1)",
    "--config.model.drop_path_rate=0.2",
    "--config.model.drop_rate=0.2",
    "--config.loss=bce",
    "--config.label_smoothing=0.1",
    "--config.bce_target_threshold=0.2",
    "--config.optimizer=adamw",
    "--config.learning_rate=0.003",
    "--config.weight_decay=0.05",
    "--config.grad_clip_norm=1.0",
]


def test_sigkill_with_recipe_features_on_resumes_bitwise(tmp_path):
    """Random draws keyed on (seed, step), and the AdamW state, survive a SIGKILL mid-epoch."""
    reference = str(tmp_path / "reference")
    assert _run(reference, *RECIPE).returncode == 0
    workdir = str(tmp_path / "killed")
    proc = _start(workdir, *RECIPE, "--config.debug_step_delay_s=0.05")
    try:
        _wait_for_step(proc, workdir, 16)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    restart = _run(workdir, *RECIPE)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert 0 < int(restart.stdout.split("Resuming from checkpoint step ")[1].split()[0]) < STEPS
    _assert_same_params(workdir, reference)


@_SHARES_REFERENCE
def test_sigterm_saves_current_step_exits_0_and_resumes(reference, tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = _start(workdir, "--config.debug_step_delay_s=0.05")
    try:
        _wait_for_step(proc, workdir, 9)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Preempted (SIGTERM) at step" in out, out
    saved = int(out.split("Preempted (SIGTERM) at step ")[1].split(":")[0])
    steps = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
    # The step it stopped at is saved (not only the last periodic checkpoint) and is mid-epoch.
    assert saved in steps and saved % 7 != 0 and 9 <= saved < STEPS, (saved, steps)

    restart = _run(workdir)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert f"Resuming from checkpoint step {saved}" in restart.stdout
    _assert_same_params(workdir, reference)


def _damage(step_dir: Path) -> list[Path]:
    """Truncate every array data file of a checkpoint to half its size."""
    damaged = []
    for path in step_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 1000 and "state" in path.parts:
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            damaged.append(path)
    return damaged


@_SHARES_REFERENCE
def test_truncated_latest_checkpoint_falls_back_to_previous(reference, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(reference, workdir)
    assert checkpoint.Checkpointer(str(workdir), read_only=True).all_steps() == [21, 28, STEPS]
    assert _damage(workdir / "checkpoints" / str(STEPS))
    # The damage is real: the step cannot be read (the error type is orbax's/tensorstore's).
    with pytest.raises(Exception):  # noqa: B017
        checkpoint.restore_variables(str(workdir), STEPS)

    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: checkpoint step {STEPS}" in result.stderr and "damaged" in result.stderr
    assert "Resuming from checkpoint step 28" in result.stdout
    assert (workdir / "checkpoints_damaged" / str(STEPS)).is_dir()
    # Retrained 28 -> 30 and saved step 30 afresh: identical to the uninterrupted run.
    _assert_same_params(str(workdir), reference)


def test_nan_stops_with_the_step_and_never_checkpoints_it(tmp_path):
    workdir = str(tmp_path / "nan")
    # The images of step index 9 (1-based step 10) are NaN: a real NaN through forward/backward.
    result = _run(workdir, "--config.debug_nan_step=9")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "nan at step 10" in err, err
    assert "last good checkpoint is step 7" in err, err
    steps = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
    assert steps == [7]
    params = checkpoint.restore_variables(workdir)["params"]
    import jax

    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--config.model.arch=resnet7"], ["config.model.arch='resnet7'", "choose one of", "resnet50"]),
        (["--config.dataset=no_such_dataset"], ["no_such_dataset"]),
        (["--config.num_train_steps=0"], ["config.num_train_steps must be > 0", "-1"]),
        (["--config.num_train_steps=-3"], ["config.num_train_steps must be > 0"]),
        (["--config.batch_size=63"], ["batch_size=63 is not divisible by the 2 devices", "multiple of 2"]),
    ],
)
def test_bad_config_is_one_clear_line(overrides, words, tmp_path):
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    result = _run(tmp_path / "bad", *overrides, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ")
    for w in words:
        assert w in err, err


_SAVER = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from train import checkpoint
ckpt = checkpoint.Checkpointer({workdir!r}, max_to_keep=1)
for step in range(1, 1000):
    # ~32 MB per save: a save takes long enough to be killed in the middle of it.
    ckpt.save(step, {{"params": {{"w": np.full((8, 1 << 20), step, np.float32)}}}}, {{"step": step}})
    if step == 1:
        ckpt.wait()
        print("saved", flush=True)
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    workdir = str(tmp_path / "saving")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER.format(repo=str(REPO), workdir=workdir)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(1.0)  # saves of later steps (and deletions of earlier ones) are under way
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    # max_to_keep=1, killed mid-save: the newest finished checkpoint is still there and whole.
    assert steps, os.listdir(ckpt.directory)
    state, meta = ckpt.restore_raw(steps[-1])
    assert meta["step"] == steps[-1]
    np.testing.assert_array_equal(state["params"]["w"], np.full((8, 1 << 20), steps[-1], np.float32))
    ckpt.close()


def test_float16_overflow_steps_are_skipped_counted_and_logged(tmp_path):
    """With float16 loss scaling a non-finite step is skipped (not an error) and counted."""
    import jax

    sys.path.insert(0, str(REPO / "tests"))
    from train_worker import tiny_config

    from train import loop

    config = tiny_config(
        dtype="float16",
        num_train_steps=6,
        log_every_steps=3,
        eval_every_steps=-1,
        eval_at_end=False,
        checkpoint_every_steps=0,
        debug_nan_step=1,
    )
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["skipped_steps"] == 1
    train = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert [r["skipped_steps_total"] for r in train] == [1, 1]
    assert all(np.isfinite(r["loss"]) for r in train)
    from flax.training.dynamic_scale import DynamicScale

    # The scale was lowered on the overflow (it grows back only after 2000 finite steps).
    assert train[-1]["loss_scale"] == float(DynamicScale().scale) / 2
    params = checkpoint.restore_variables(str(tmp_path))["params"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    assert "1 step(s) skipped" in loop.format_summary(summary)


def _predict(workdir, *paths) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train.predict", f"--workdir={workdir}", *map(str, paths)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=_env(),
    )


@_SHARES_REFERENCE
def test_predict_rejects_images_of_wrong_rank_or_channels(reference, tmp_path):
    good = np.full((8, 8), 16, np.uint8)
    np.save(tmp_path / "good.npy", good)
    np.save(tmp_path / "two_channels.npy", np.zeros((8, 8, 2), np.uint8))
    np.save(tmp_path / "four_d.npy", np.zeros((1, 8, 8, 1), np.uint8))
    (tmp_path / "no_images" / "sub").mkdir(parents=True)
    (tmp_path / "no_images" / "sub" / "notes.txt").write_text("not an image")
    cases = {
        "two_channels.npy": ["two_channels.npy", "(8, 8, 2)", "1 channel"],
        "four_d.npy": ["four_d.npy", "(1, 8, 8, 1)", "[H, W]"],
        "no_images": ["folder", "no_images", "has no image files", "sub-folders"],
        "missing.png": ["missing.png", "does not exist"],
    }
    procs = {name: _predict(reference, tmp_path / "good.npy", tmp_path / name) for name in cases}
    # A reader that stops early (``| head``): no traceback, the shell's SIGPIPE status.
    gone = _predict(reference, tmp_path / "good.npy")
    gone.stdout.close()
    # A count below 1 would print too few classes (--top_k=-1 printed all but one) or none.
    flags = {
        f: _predict(reference, f, tmp_path / "good.npy")
        for f in ("--top_k=-1", "--top_k=0", "--batch_size=0")
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ")
        for w in cases[name]:
            assert w in line, line
    err = gone.communicate(timeout=120)[1]
    assert gone.returncode == 141 and "Traceback" not in err, err[-3000:]
    for flag, proc in flags.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and not out and "Traceback" not in err, err[-3000:]
        assert f"flag {flag}: " in err and "not a positive integer" in err, err[-3000:]

    from train import predict

    (top,) = predict.predict_files(reference, [str(tmp_path / "good.npy")], top_k=3)
    assert len(top) == 3 and abs(sum(p for *_, p in top) - 1) < 1
    for bad in ({"top_k": 0}, {"top_k": -1}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be at least 1"):
            predict.predict_files(reference, [str(tmp_path / "good.npy")], **bad)


def _save_torch(path, variables) -> None:
    import torch

    from resnet_jax.convert import flax_to_torch

    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in flax_to_torch(variables).items()}, path)


@_SHARES_REFERENCE
def test_init_from_torch_loads_matching_and_rejects_other_architectures(reference, tmp_path):
    import jax

    import resnet_jax
    from train import build, steps
    from train.init_from import init_from_torch
    from train.model import create_model

    # A matching state_dict (the reference run's weights, via PyTorch) becomes the initial state.
    config, info = build.load_run_info(reference)
    model, _ = create_model(config, info)
    variables = checkpoint.restore_variables(reference)
    _save_torch(tmp_path / "same.pth", variables)
    template = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype),
        jax.eval_shape(
            lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), train=False)
        ),
    )
    host = steps.TrainState(
        step=np.zeros((), np.int32),
        params=template["params"],
        batch_stats=template["batch_stats"],
        opt_state=(),
    )
    loaded = init_from_torch(str(tmp_path / "same.pth"), model, host)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(a, b)

    # A full ResNet-34 with 3 input channels is another architecture: one clear line, exit 2.
    other = resnet_jax.get_model("resnet34", num_classes=10)
    shapes = jax.eval_shape(lambda: other.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False))
    _save_torch(tmp_path / "other.pth", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
    result = _run(tmp_path / "fine_tune", f"--config.init_from_torch={tmp_path / 'other.pth'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: config.init_from_torch=") and "does not fit" in line, line
    assert "resnet34" in line and "config.model" in line


def test_checkpoint_holding_nan_is_never_resumed_from(tmp_path):
    """A NaN checkpoint (e.g. from an older version) counts as damaged: the previous one is used."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
    good = {"params": {"w": np.ones((4,), np.float32)}}
    ckpt.save(1, good, {"step": 1})
    ckpt.save(2, {"params": {"w": np.array([1, np.nan, 1, 1], np.float32)}}, {"step": 2})
    ckpt.wait()
    state, meta = ckpt.restore({"params": {"w": np.zeros((4,), np.float32)}})
    np.testing.assert_array_equal(state["params"]["w"], good["params"]["w"])
    assert meta["step"] == 1
    assert [s for s, _ in ckpt.damaged] == [2] and "NaN" in ckpt.damaged[0][1]
    assert ckpt.all_steps() == [1] and (tmp_path / "checkpoints_damaged" / "2").is_dir()
    ckpt.close()


def test_sigterm_on_one_of_two_hosts_stops_both_at_the_same_step(tmp_path):
    """Two processes (jax.distributed, gloo); only process 1 gets SIGTERM; both save one step."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "multihost")
    sets = [
        "--set=num_train_steps=30",
        "--set=log_every_steps=2",
        "--set=checkpoint_every_steps=0",
        "--set=eval_every_steps=-1",
        "--set=eval_at_end=False",
        "--set=debug_step_delay_s=0.05",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "train_worker.py"), "train", workdir, "--devices=1"]
            + [f"--process-id={i}", "--num-processes=2", f"--port={port}", *sets],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=str(REPO),
        )
        for i in range(2)
    ]
    try:
        _wait_for_step(procs[0], workdir, 5)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    done = [out.split("WORKER_DONE")[1].split() for out, _ in outs]
    stopped = {int(d[-1]) for d in done}
    assert len(stopped) == 1, done  # the same step on both hosts
    (step,) = stopped
    assert "Preempted (SIGTERM) at step" in outs[0][0] and step < 30
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [step]
