"""Robustness of ``python -m train``, done for real on subprocesses of the CLI: SIGKILL mid-epoch,
SIGTERM (preemption) and Ctrl-C followed by a restart, truncated checkpoint files, NaNs injected into
the computation, and bad configs / inputs that must fail with one clear line.

Every resumed run is compared bitwise with one uninterrupted reference run of the same command.
"""

import csv
import io
import json
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


def _sigkill_mid_epoch(proc: subprocess.Popen, workdir) -> None:
    """SIGKILL the run once it has logged step 16: past the checkpoint at step 14, inside an epoch
    (the digits' epoch 0 ends at step 22), so its restart resumes mid-epoch; no warning reaches it."""
    try:
        _wait_for_step(proc, workdir, 16)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def _assert_same_params(workdir, reference, ema: bool = False, step: int = STEPS) -> None:
    for weights in (False, True) if ema else (False,):  # the trained weights, and the EMA's
        got = checkpoint.restore_variables(workdir, step, ema=weights)
        want = checkpoint.restore_variables(reference, step, ema=weights)
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
    _sigkill_mid_epoch(_start(workdir, "--config.debug_step_delay_s=0.05"), workdir)
    assert STEPS not in checkpoint.Checkpointer(workdir, read_only=True).all_steps()
    furthest = _last_logged_step(workdir)
    before = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r][-1]

    restart = _run(workdir)
    assert restart.returncode == 0, restart.stderr[-3000:]
    resumed = int(restart.stdout.split("Resuming from checkpoint step ")[1].split()[0])
    # A mid-epoch resume: the input stream must pick up inside the epoch, not at its start.
    assert 0 < resumed < STEPS and resumed % STEPS_PER_EPOCH != 0, resumed
    _assert_same_params(workdir, reference)
    # Goodput: the steps the killed run had logged past its checkpoint were run again, and the
    # totals go on from the killed run's last logged ones.
    after = read_metrics(os.path.join(workdir, "metrics.jsonl"))[-1]
    assert furthest > resumed and after["goodput/redone_steps"] == furthest - resumed
    assert after["goodput/redone_s"] > 0 and "goodput:" in restart.stdout
    for part in ("wall", "startup", "compile", "productive"):
        assert after[f"goodput/{part}_s"] > before[f"goodput/{part}_s"], part


# Issues 43's and 44's ingredients together: drop path (two blocks, so the second has a rate),
# dropout, timm's BCE with smoothing and threshold, timm's LAMB (its own clipping) after
# clip_grad_norm_, two micro-batches per update, the EMA with timm's warm-up; mixup and cutmix,
# timm's RandAugment string, random erasing and repeated augmentation. The per-image ops read an
# image folder (the digits source has none of them): 72 images in 3 classes, batch 8, so an
# epoch is 9 steps, the checkpoint the kill leaves (14) is inside epoch 1, and the resumed run
# crosses into epoch 2 before it ends at step 20. Accumulation is inside one jitted step, so
# every checkpoint follows a whole update: no half-accumulated gradient can be lost.
RECIPE_CLASSES, RECIPE_IMAGES_PER_CLASS, RECIPE_BATCH, RECIPE_STEPS = 3, 24, 8, 20
RECIPE_STEPS_PER_EPOCH = RECIPE_CLASSES * RECIPE_IMAGES_PER_CLASS // RECIPE_BATCH
RECIPE = [
    f"--config.num_train_steps={RECIPE_STEPS}",
    "--config.dataset=image_folder",
    "--config.grain_worker_count=0",
    f"--config.batch_size={RECIPE_BATCH}",
    "--config.image_size=8",  # as small as the digits' images
    "--config.train_augment=inception_crop",
    "--config.random_flip=True",
    "--config.auto_augment=rand-m9-mstd0.5-inc1",
    "--config.random_erase_prob=0.5",
    "--config.random_erase_mode=pixel",
    "--config.aug_repeats=2",
    "--config.mixup_alpha=0.8",
    "--config.cutmix_alpha=1.0",
    "--config.mixup_switch_prob=0.5",
    "--config.ema_decay=0.9",
    "--config.ema_warmup=True",
    "--config.model.overrides.stage_sizes=(1,1)",
    "--config.model.drop_path_rate=0.2",
    "--config.model.drop_rate=0.2",
    "--config.loss=bce",
    "--config.label_smoothing=0.1",
    "--config.bce_target_threshold=0.2",
    "--config.optimizer=lamb",
    "--config.learning_rate=0.003",
    "--config.weight_decay=0.02",
    "--config.lamb_max_grad_norm=1.0",
    "--config.grad_clip_norm=1.0",
    "--config.grad_accum_steps=2",
]


def _write_image_folder(root: Path) -> None:
    """ROOT/train/<class>/ (PNG and JPEG, 16x16 RGB: a class colour plus noise; the crops are
    resized to 8x8) and a small val/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (RECIPE_CLASSES, 3))
    for split, count in (("train", RECIPE_IMAGES_PER_CLASS), ("val", 2)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")


def test_sigkill_with_recipe_features_on_resumes_bitwise(tmp_path):
    """Random draws keyed on (seed, step) and (seed, epoch, example), the LAMB state and the EMA
    survive a SIGKILL mid-epoch."""
    _write_image_folder(tmp_path / "images")
    recipe = [*RECIPE, f"--config.data_dir={tmp_path / 'images'}"]
    reference = str(tmp_path / "reference")
    done = _run(reference, *recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = str(tmp_path / "killed")
    # Slower steps: the kill at step 16 must land well before the run ends at step 20.
    _sigkill_mid_epoch(_start(workdir, *recipe, "--config.debug_step_delay_s=0.15"), workdir)
    assert RECIPE_STEPS not in checkpoint.Checkpointer(workdir, read_only=True).all_steps()
    restart = _run(workdir, *recipe)
    assert restart.returncode == 0, restart.stderr[-3000:]
    resumed = int(restart.stdout.split("Resuming from checkpoint step ")[1].split()[0])
    assert resumed < 2 * RECIPE_STEPS_PER_EPOCH < RECIPE_STEPS, resumed  # crosses an epoch's end
    assert 0 < resumed and resumed % RECIPE_STEPS_PER_EPOCH != 0, resumed  # from inside an epoch
    _assert_same_params(workdir, reference, ema=True, step=RECIPE_STEPS)


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


@_SHARES_REFERENCE
def test_ctrl_c_saves_current_step_exits_130_with_one_line_and_resumes(reference, tmp_path):
    workdir = str(tmp_path / "interrupted")
    proc = _start(workdir, "--config.debug_step_delay_s=0.05")
    try:
        _wait_for_step(proc, workdir, 9)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    (line,) = err.strip().splitlines()  # no KeyboardInterrupt traceback
    assert line.startswith("Interrupted (Ctrl-C) at step ") and "rerun the same command" in line, line
    saved = int(line.split("at step ")[1].split(":")[0])
    assert f"saved checkpoint step {saved} in " in line, line
    steps = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
    assert saved in steps and saved % 7 != 0 and 9 <= saved < STEPS, (saved, steps)

    restart = _run(workdir)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert f"Resuming from checkpoint step {saved}" in restart.stdout
    _assert_same_params(workdir, reference)


def test_ctrl_c_in_a_terminal_leaves_the_grain_workers_quiet(tmp_path):
    """A terminal's Ctrl-C signals the whole process group: the Grain decoding workers too.
    They ignore it; the training process saves and stops them, with one line, no traceback."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_image_folder import write_digits_folder

    write_digits_folder(tmp_path / "digits")
    workdir = str(tmp_path / "folder_run")
    cmd = _cmd(
        workdir,
        "--config.dataset=image_folder",
        f"--config.data_dir={tmp_path / 'digits'}",
        "--config.grain_worker_count=2",
        "--config.debug_step_delay_s=0.05",
    )
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=_env(),
        start_new_session=True,
    )
    try:
        _wait_for_step(proc, workdir, 3)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Interrupted (Ctrl-C) at step " in err, err[-3000:]


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


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@_SHARES_REFERENCE
def test_resume_with_another_model_refuses_and_changes_nothing(reference, tmp_path):
    """Checkpoints of another model config are not damaged: the run stops before it writes or
    moves anything, naming the field; the original command then resumes from the last step."""
    workdir = tmp_path / "other_model"
    shutil.copytree(reference, workdir)
    before = _files(workdir)
    for _ in range(2):  # the same mistake twice loses nothing either
        result = _run(workdir, "--config.model.overrides.small_stem=False")
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "damaged" not in result.stderr, result.stderr[-3000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: workdir {workdir} was trained with "), line
        assert "model.overrides.small_stem=True but this run has False" in line, line
        assert "rerun with the original config, or use a new --workdir" in line, line
        assert _files(workdir) == before
        assert not (workdir / "checkpoints_damaged").exists()

    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from checkpoint step {STEPS}" in result.stdout
    assert f"Already trained to step {STEPS}" in result.stdout


def test_mismatched_checkpoint_is_not_moved_and_damaged_ones_are_never_replaced(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
    good = {"params": {"w": np.ones((4,), np.float32)}}
    ckpt.save(1, good, {"step": 1})
    ckpt.wait()
    # Another shape is another model, not damage: an error, and the checkpoint stays.
    for template in ({"params": {"w": np.zeros((5,), np.float32)}}, {"params": {"v": np.zeros((4,))}}):
        with pytest.raises(checkpoint.CheckpointMismatchError, match="checkpoint 1 .* holds another state"):
            ckpt.restore(template)
        assert ckpt.all_steps() == [1] and not ckpt.damaged
    assert checkpoint.mismatch(str(tmp_path), {"params": {"w": np.zeros((5,), np.float32)}}) == (
        1,
        ["params/w is (4,) there, (5,) here"],
    )
    assert checkpoint.mismatch(str(tmp_path), {"params": {"w": np.zeros((4,), np.float32)}}) is None
    # A missing block is named once, not array by array; the parameters come first.
    saved = {"params": {"a": {"w": np.zeros(2)}}, "opt_state": {"a": {"w": np.zeros(2)}}}
    wanted = {k: {**v, "b": {"w": np.zeros(2), "v": np.zeros(2)}} for k, v in saved.items()}
    assert checkpoint.state_differences(saved, wanted) == [
        "params/b is not in the checkpoint",
        "opt_state/b is not in the checkpoint",
    ]
    # A step set aside twice: the first copy is kept, the second gets a name of its own.
    damaged = tmp_path / "checkpoints_damaged"
    for value in (np.nan, np.inf):
        ckpt.save(2, {"params": {"w": np.full((4,), value, np.float32)}}, {"step": 2})
        ckpt.wait()
        state, _ = ckpt.restore({"params": {"w": np.zeros((4,), np.float32)}})
        np.testing.assert_array_equal(state["params"]["w"], good["params"]["w"])
    assert sorted(p.name for p in damaged.iterdir()) == ["2", "2.2"]
    ckpt.close()
    for name, value in (("2", np.nan), ("2.2", np.inf)):
        moved = tmp_path / "moved" / name
        shutil.copytree(damaged / name, moved / "checkpoints" / "2")
        reader = checkpoint.Checkpointer(str(moved), read_only=True)
        raw, _ = reader.restore_raw(2)
        reader.close()
        np.testing.assert_array_equal(raw["params"]["w"], np.full((4,), value, np.float32))


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


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--config.batchsize=32"],
            ["--config.batchsize:", "has no field", "did you mean --config.batch_size?"],
        ),
        (["--config.distributed.enabeld=True"], ["did you mean --config.distributed.enabled?"]),
        (
            ["--config=configs/defualt.py"],
            ["--config=configs/defualt.py: no such file", "did you mean configs/default.py?"],
        ),
        (["--config.batch_size=abc"], ["--config.batch_size=abc", "invalid literal"]),
        (
            ["--config.model.overrides.small_stm=True"],
            ["config.model.overrides.small_stm is not a field of resnet18", "did you mean small_stem?"],
        ),
        (["--config.model.overrides.num_classes=3"], ["sets num_classes itself"]),
        # A model field that configs/finetune_folder.py does not list (ml_collections refused it).
        (
            ["--config=configs/finetune_folder.py", "--config.model.overrides.small_stem=True"],
            ["config.num_train_steps must be > 0"],
        ),
    ],
)
def test_config_flag_mistakes_are_one_line(args, words, tmp_path):
    config = next((a for a in args if a.startswith("--config=")), "--config=configs/default.py")
    args = [a for a in args if a != config]
    cmd = [sys.executable, "-m", "train", config, f"--workdir={tmp_path / 'w'}", *args]
    cmd.append("--config.num_train_steps=-5")  # a start-up error of its own, should the flags pass
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=_env(), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: "), line
    for w in words:
        assert w in line, line
    assert not (tmp_path / "w").exists()


def test_model_fields_are_set_with_the_ordinary_flag_form(tmp_path):
    import json

    result = _run(
        tmp_path,
        "--config.num_train_steps=1",
        "--config.checkpoint_every_steps=0",
        "--config.model.overrides.zero_init_residual=True",  # not in configs/default.py
        "--config.model.overrides.block",  # the value as the next argument
        "bottleneck",
        "--config.model.overrides.stage_sizes=1,",  # the last one given wins
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "config.json").read_text())["model"]["overrides"]
    assert saved == {
        "stage_sizes": [1],
        "small_stem": True,
        "zero_init_residual": True,
        "block": "bottleneck",
    }
    params = checkpoint.restore_variables(str(tmp_path))["params"]
    assert "conv3" in params["layer1_0"]  # a bottleneck block


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


def _predict(workdir, *paths, flags=()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train.predict", f"--workdir={workdir}", *flags, *map(str, paths)],
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
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG" * 10)
    # Unreadable files are skipped with one warning line each; the others are still predicted
    # (printed as --output asks), and the exit status is 1.
    skipped = {
        "corrupt.jpg": ["corrupt.jpg", "not an image file that can be decoded", ".webp) and .npy arrays"],
        "two_channels.npy": ["two_channels.npy", "(8, 8, 2)", "1 channel"],
        "four_d.npy": ["four_d.npy", "(1, 8, 8, 1)", "[H, W]"],
    }
    outputs = {"corrupt.jpg": "json", "two_channels.npy": "csv", "four_d.npy": "text"}
    skips = {
        name: _predict(
            reference,
            tmp_path / name,
            tmp_path / "good.npy",
            tmp_path / name,
            # parity's argparse spelling (--top-k) is accepted too
            flags=[
                f"--output={outputs[name]}",
                "--top_k=2" if name != "four_d.npy" else "--top-k=2",
                "--batch_size=2",
            ],
        )
        for name in skipped
    }
    # export: the file and one line, without orbax's INFO lines.
    export = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "train.export",
            f"--workdir={reference}",
            f"--out={tmp_path / 'm.safetensors'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=_env(),
    )
    # --ema of a run without an EMA: one line (hyphen-free flag, as absl spells it).
    no_ema = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "train.export",
            f"--workdir={reference}",
            f"--out={tmp_path / 'ema.safetensors'}",
            "--ema",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env=_env(),
    )
    # A path that does not exist or a folder without images: one error line before any prediction.
    cases = {
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
    good = str(tmp_path / "good.npy")
    for name, proc in skips.items():
        out, err = proc.communicate(timeout=300)  # these compile the model (9 processes at once)
        assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 2 and warnings[0] == warnings[1], err[-3000:]
        assert all(w in warnings[0] for w in skipped[name]) and warnings[0].endswith("Skipped."), warnings
        assert err.strip().splitlines()[-1] == "2 of 3 files skipped (warnings above).", err[-3000:]
        assert "function_node" not in err and "Op:" not in err and "rendezvous" not in err, err[-3000:]
        if outputs[name] == "json":
            (row,) = [json.loads(line) for line in out.splitlines()]
            assert row["filename"] == good and len(row["classes"]) == len(row["indices"]) == 2
            assert row["probabilities"][0] >= row["probabilities"][1] > 0
        elif outputs[name] == "csv":
            header, row = list(csv.reader(io.StringIO(out)))
            columns = [f"{c}_{r}" for r in (1, 2) for c in ("class", "index", "probability")]
            assert header == ["filename", *columns]
            assert row[0] == good and len(row) == 7 and float(row[3]) >= float(row[6]) > 0
        else:
            assert out.splitlines()[0] == good and out.splitlines()[1].startswith("  1. "), out
            assert len(out.splitlines()) == 3, out  # --top-k=2
    out, err = export.communicate(timeout=300)
    assert export.returncode == 0 and (tmp_path / "m.safetensors").stat().st_size > 0, err[-3000:]
    assert out.startswith("wrote ") and len(out.splitlines()) == 1 and not err.strip(), err[-3000:]
    out, err = no_ema.communicate(timeout=300)
    assert no_ema.returncode == 2 and not out and not (tmp_path / "ema.safetensors").exists(), err[-3000:]
    (line,) = err.strip().splitlines()
    assert line.startswith("error: checkpoint 30 in ") and "holds no EMA weights" in line, line
    assert line.endswith("export its trained weights without --ema."), line
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ")
        for w in cases[name]:
            assert w in line, line
        assert "function_node" not in line and "Op:" not in line, line  # TensorFlow's internals
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


def test_predict_messages_name_the_file_not_the_decoder(tmp_path):
    """Pillow's path (image-folder runs): no ``<_io.BytesIO object at 0x...>``, no training advice
    ("rerun to resume"); an RGB model refuses a 2-D array naming the shape it was given."""
    from train import predict
    from train.data.core import DatasetInfo
    from train.data.eval_resize import EvalOptions

    info = DatasetInfo("image_folder", 2, (8, 8, 3), 4, 2, ("a", "b"), (0.0,) * 3, (1.0,) * 3)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really" * 10)
    np.save(tmp_path / "gray.npy", np.zeros((8, 8), np.uint8))
    with pytest.raises(predict.ImageError) as e:
        predict._load(str(tmp_path / "corrupt.png"), info, EvalOptions(8))
    line = str(e.value)
    assert "corrupt.png" in line and "not an image file that can be decoded" in line, line
    assert "BytesIO" not in line and "rerun" not in line and ".webp" in line, line
    with pytest.raises(predict.ImageError) as e:
        predict._load(str(tmp_path / "gray.npy"), info, EvalOptions(8))
    assert "has shape (8, 8);" in str(e.value) and "[H, W, 3] (3 channels" in str(e.value), str(e.value)
    assert "[H, W]" not in str(e.value)


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a workdir")
    result = _run(tmp_path / "notes.txt")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --workdir {tmp_path / 'notes.txt'} is a file; give a directory"), line
    assert (tmp_path / "notes.txt").read_text() == "not a workdir"


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
    """Two processes (jax.distributed, gloo); only process 1 gets SIGTERM; both save one step.
    Both also trace steps 2-3 with jax.profiler, each into its own file of the shared workdir."""
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
        "--set=profile_start_step=2",
        "--set=profile_num_steps=2",
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
    traces = sorted(p.name for p in Path(workdir, "plugins", "profile", "steps_2-3").glob("*.xplane.pb"))
    assert traces == [f"{socket.gethostname()}_p{i}.xplane.pb" for i in range(2)]
