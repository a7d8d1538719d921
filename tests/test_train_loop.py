"""The training program end to end on the digits set with a tiny ResNetBase (one CPU device):
outputs (checkpoints, metrics.jsonl, TensorBoard, PNG), exact resume, eval-only, predict, CLI.
The shared run keeps an EMA (timm's schedule), so each of these covers it too."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from float_bounds import (  # noqa: E402
    assert_correct_counts_agree,
    assert_trees_within_float32_error,
    near_ties,
)
from train_worker import digits_eval_arrays, eval_logits, tiny_config  # noqa: E402

from train import checkpoint, loop, optim, predict  # noqa: E402
from train import goodput as goodput_lib  # noqa: E402
from train.config import ConfigError  # noqa: E402
from train.metrics import read_metrics  # noqa: E402

STEPS = 30


def config(**kw):
    c = tiny_config(
        num_train_steps=STEPS,
        checkpoint_every_steps=10,
        keep_checkpoints=2,
        log_every_steps=5,
        eval_every_steps=15,
        learning_rate=0.1,
        ema_decay=0.8,
    )
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 30-step run shared by the tests below (its workdir is not modified by them); it also
    traces steps 12-13 with jax.profiler, and its wall time is measured here, apart from the run."""
    workdir = str(tmp_path_factory.mktemp("run"))
    start = time.perf_counter()
    summary = loop.train_and_evaluate(config(profile_start_step=12, profile_num_steps=2), workdir)
    summary["measured_wall_s"] = time.perf_counter() - start
    return workdir, summary


def _logits_and_float64_twin(variables, x):
    """Eval logits of ``variables`` in float32 and in float64 (tests/float_bounds)."""
    return eval_logits(config(), variables, x), eval_logits(config(), variables, x, float64=True)


def _assert_accuracy_of(accuracy, variables, x, y):
    """The loop's ``accuracy`` is that of an independent float32 eval of ``variables``, but for
    held-out examples whose prediction rounding may flip (near ties of the float64 twin)."""
    logits, twin = _logits_and_float64_twin(variables, x)
    assert_correct_counts_agree(accuracy, np.mean(logits.argmax(-1) == y), len(y), near_ties(twin, logits))


def test_outputs_of_a_run(run):
    workdir, summary = run
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "30"]
    records = read_metrics(workdir)
    assert all({"step", "split"} <= set(r) for r in records)
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 31, 5))
    for r in train:
        assert {"loss", "accuracy", "top5_accuracy", "learning_rate"} <= set(r)
        assert 0 <= r["accuracy"] <= r["top5_accuracy"] <= 1
    assert all(r["images_per_sec"] > 0 for r in train)
    assert any("compile_time_s" in r for r in records)
    # The logged learning rate is the schedule's value at the last step of each window.
    cfg = config()
    steps_per_epoch = 1437 // cfg.batch_size
    schedule = optim.create_lr_schedule(cfg, steps_per_epoch, STEPS)
    for r in train:
        np.testing.assert_allclose(r["learning_rate"], float(schedule(r["step"] - 1)), rtol=1e-5)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert all(r["num_examples"] == 360 for r in evals)
    assert all({"ema_loss", "ema_accuracy", "ema_top5_accuracy"} <= set(r) for r in evals)
    assert summary["eval"]["accuracy"] == evals[-1]["accuracy"]
    assert summary["eval"]["ema_accuracy"] == evals[-1]["ema_accuracy"]
    # Training did something: the loss went down.
    assert train[-1]["loss"] < train[0]["loss"]

    # TensorBoard events hold the same numbers.
    tb = {}
    for path in Path(workdir, "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                tb[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    np.testing.assert_allclose(tb[("train/loss", 30)], train[-1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(tb[("eval/accuracy", 30)], evals[-1]["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(tb[("eval/ema_accuracy", 30)], evals[-1]["ema_accuracy"], rtol=1e-6)

    # Utilisation: per chip (one CPU device here); FLOPs from the compiled step; no MFU on a CPU
    # without a peak (config.peak_tflops=0), rather than a made-up one.
    (first,) = [r for r in records if "compile_time_s" in r]
    assert first["flops_per_step_per_chip"] > 0 and "peak_tflops_per_chip" not in first
    for r in train:
        assert r["images_per_sec_per_chip"] == r["images_per_sec"]
        expected = first["flops_per_step_per_chip"] * r["images_per_sec"] / cfg.batch_size / 1e12
        np.testing.assert_allclose(r["tflops_per_chip"], expected, rtol=1e-12)
        assert "mfu" not in r
        assert 0 <= r["input_wait_fraction"] <= 1
    np.testing.assert_allclose(tb[("train/tflops_per_chip", 30)], train[-1]["tflops_per_chip"], rtol=1e-6)

    png = Path(workdir, "training_curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    info = json.loads(Path(workdir, "dataset_info.json").read_text())
    assert info["num_classes"] == 10 and info["image_shape"] == [8, 8, 1]


def test_goodput_parts_add_up_to_the_wall_time(run):
    workdir, summary = run
    totals = summary["goodput"]
    parts = {k: v for k, v in totals.items() if k.endswith("_s") and k != "goodput/wall_s"}
    assert set(parts) == {f"goodput/{p}_s" for p in goodput_lib.PARTS}
    assert all(v >= 0 for v in parts.values())
    # Against the wall time measured around the run, outside the loop's own clock.
    assert sum(parts.values()) == pytest.approx(summary["measured_wall_s"], rel=0.05)
    assert totals["goodput/wall_s"] == pytest.approx(sum(parts.values()))
    for part in ("productive", "compile", "eval", "checkpoint", "startup", "profiler"):
        assert parts[f"goodput/{part}_s"] > 0, part
    assert totals["goodput/redone_s"] == 0 and totals["goodput/redone_steps"] == 0
    assert totals["goodput/fraction"] == pytest.approx(
        totals["goodput/productive_s"] / totals["goodput/wall_s"]
    )
    # The last record holds the final totals; every log step the running ones.
    records = read_metrics(workdir)
    assert {k: v for k, v in records[-1].items() if k.startswith("goodput/")} == pytest.approx(totals)
    logged = [r["goodput/wall_s"] for r in records if "loss" in r and r["split"] == "train"]
    assert logged == sorted(logged) and logged[-1] < totals["goodput/wall_s"]


def test_profile_window_is_traced_into_the_workdir(run):
    workdir, _ = run
    (trace,) = Path(workdir, "plugins", "profile", "steps_12-13").glob("*_p0.xplane.pb")
    assert trace.name.startswith(socket.gethostname())
    # The traced steps ran the compiled train step (named ``step`` by the EMA's wrapper).
    assert re.search(rb"jit_(train_)?step\b", trace.read_bytes())


def test_restored_variables_reproduce_the_final_eval(run):
    workdir, summary = run
    variables = checkpoint.restore_variables(workdir)
    assert set(variables) == {"params", "batch_stats"}
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))
    # Independent eval: numpy preprocessing and a plain model.apply over all 360 images.
    x, y, mean, std = digits_eval_arrays(config())
    _assert_accuracy_of(summary["eval"]["accuracy"], variables, (x - mean) / std, y)
    # The EMA's accuracy is that of its own weights and BatchNorm statistics.
    averaged = checkpoint.restore_variables(workdir, ema=True)
    assert not np.allclose(averaged["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    _assert_accuracy_of(summary["eval"]["ema_accuracy"], averaged, (x - mean) / std, y)
    earlier = checkpoint.restore_variables(workdir, step=20)
    assert not np.allclose(earlier["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        checkpoint.restore_variables(workdir, step=7)


def test_resume_after_interruption_is_exact(run, tmp_path):
    workdir, summary = run
    # Simulate a run killed after its step-20 checkpoint: drop the step-30 checkpoint.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "30"))
    out = loop.train_and_evaluate(config(), resumed)
    assert out["start_step"] == 20
    for ema in (False, True):  # the EMA continues bitwise too
        chex.assert_trees_all_equal(
            checkpoint.restore_variables(resumed, ema=ema), checkpoint.restore_variables(workdir, ema=ema)
        )
    assert out["eval"]["accuracy"] == summary["eval"]["accuracy"]
    # Records past step 20 were replaced, not duplicated.
    steps = [r["step"] for r in read_metrics(resumed) if r["split"] == "train" and "loss" in r]
    assert steps == list(range(5, 31, 5))


def test_resume_with_the_ema_turned_off_is_one_line_naming_the_field(run):
    workdir, _ = run
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(config(ema_decay=0.0), workdir)
    line = str(e.value)
    assert (
        "\n" not in line and f"workdir {workdir} was trained with ema_decay=0.8 but this run has 0.0" in line
    )


def test_init_from_a_run_with_an_ema_takes_its_ema_weights(run):
    """As timm's load_checkpoint(use_ema=True) does; config.init_from_ema=False the trained ones.
    This run's own EMA starts from the imported weights."""
    from train import build, init_from
    from train.data import registry

    workdir, _ = run
    parts = build.build_steps(config(), registry.create_dataset(config()).info, 44, STEPS)
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(parts.create_state))
    for ema in (True, False):
        state, note = init_from.import_weights(workdir, parts.model, fresh, ema=ema)
        want = checkpoint.restore_variables(workdir, ema=ema)
        chex.assert_trees_all_equal(state.variables, want)
        chex.assert_trees_all_equal(state.ema, want)
        assert note.startswith(f"Initialised from {workdir}{' (its EMA weights)' if ema else ''}: "), note


def test_rerun_of_a_finished_run_does_not_train(run):
    workdir, summary = run
    before = read_metrics(workdir)
    again = loop.train_and_evaluate(config(), workdir)
    assert again["start_step"] == STEPS and again["compile_time_s"] is None
    assert again["eval"]["accuracy"] == summary["eval"]["accuracy"]
    assert read_metrics(workdir) == before


def test_eval_only(run):
    workdir, _summary = run
    out = loop.train_and_evaluate(config(eval_only=True, restore_step=20), workdir)
    assert out["start_step"] == 20
    evals = {r["step"]: r for r in read_metrics(workdir) if r["split"] == "eval"}
    # Step 20 had no periodic eval; check it against an independent computation.
    x, y, mean, std = digits_eval_arrays(config())
    variables = checkpoint.restore_variables(workdir, step=20)
    _assert_accuracy_of(out["eval"]["accuracy"], variables, (x - mean) / std, y)
    averaged = checkpoint.restore_variables(workdir, step=20, ema=True)
    _assert_accuracy_of(out["eval"]["ema_accuracy"], averaged, (x - mean) / std, y)
    assert evals[20]["accuracy"] == out["eval"]["accuracy"]
    assert evals[20]["ema_accuracy"] == out["eval"]["ema_accuracy"]
    with pytest.raises(Exception, match="no checkpoint"):
        loop.train_and_evaluate(config(eval_only=True), str(Path(workdir).parent / "empty"))


def test_predict_top5_of_image_files(run, tmp_path):
    from PIL import Image

    workdir, _ = run
    x, _y, mean, std = digits_eval_arrays(config())
    paths, pixels = [], []
    for i, name in enumerate(["digit0.png", "sub/digit1.png", "sub/digit2.png"]):
        img = np.rint(x[i, ..., 0]).astype(np.uint8)
        path = tmp_path / "images" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(path)
        paths.append(str(path))
        pixels.append(img[..., None].astype(np.float32))
    # The run kept an EMA: predict uses its weights, and says so; --noema the trained ones.
    notes = []
    results = list(predict.iter_predictions(workdir, paths, top_k=5, on_weights=notes.append))
    results = [top for _, top in results]
    assert notes == [
        f"predicting with the EMA weights of checkpoint step {STEPS} (--noema: the trained ones)."
    ]
    # A folder stands for its images, sub-folders included; two batches of 2, the last padded.
    assert predict.expand_folders([str(tmp_path / "images")]) == paths
    batched = predict.predict_files(workdir, predict.expand_folders([str(tmp_path / "images")]), batch_size=2)
    trained = predict.predict_files(workdir, paths, top_k=5, ema=False)
    for tops, ema in ((results, True), (batched, True), (trained, False)):
        variables = checkpoint.restore_variables(workdir, ema=ema)
        logits, twin = _logits_and_float64_twin(variables, (np.stack(pixels) - mean) / std)
        probs, probs64 = np.asarray(jax.nn.softmax(logits)), np.asarray(jax.nn.softmax(twin))
        # Ranks and probabilities as an independent float32 eval gives them; where rounding may
        # swap two classes (float64 probabilities within twice float32's error), either is right.
        eps = 2 * np.abs(probs - probs64).max()
        assert len(tops) == 3
        for top, p, p64 in zip(tops, probs, probs64):
            assert len(top) == 5
            got = [i for i, _, _ in top]
            np.testing.assert_allclose(p64[got], np.sort(p64)[::-1][:5], rtol=0, atol=2 * eps)
            np.testing.assert_allclose([q for _, _, q in top], p[got], atol=max(1e-5, 2 * eps))
            assert [name for i, name, _ in top] == [str(i) for i, _, _ in top]
    assert not np.allclose([q for *_, q in results[0]], [q for *_, q in trained[0]])


def test_pmap_loop_matches_jit_loop(tmp_path):
    cfg = {
        "num_train_steps": 6,
        "checkpoint_every_steps": 0,
        "eval_every_steps": -1,
        "eval_at_end": False,
    }
    a = loop.train_and_evaluate(config(**cfg), str(tmp_path / "jit"))
    b = loop.train_and_evaluate(config(parallelism="pmap", **cfg), str(tmp_path / "pmap"))
    assert a["final_step"] == b["final_step"] == 6
    # Bounded by float32's own error against the jit run's float64 twin (same initial values).
    jax.config.update("jax_enable_x64", True)
    try:
        loop.train_and_evaluate(config(dtype="float64", **cfg), str(tmp_path / "float64"))
    finally:
        jax.config.update("jax_enable_x64", False)
    for ema in (False, True):  # the EMA is replicated and updated like the parameters
        assert_trees_within_float32_error(
            *(checkpoint.restore_variables(str(tmp_path / d), ema=ema) for d in ("jit", "pmap", "float64"))
        )


def _cli(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "train", "--config=configs/default.py", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env=env,
        timeout=timeout,
    )


def test_cli_trains_resumes_and_reports_config_errors(tmp_path):
    workdir = str(tmp_path / "cli")
    args = [
        f"--workdir={workdir}",
        "--config.num_train_steps=4",
        "--config.model.overrides.stage_sizes=(1,)",
        "--config.rng_impl=rbg",
        "--config.log_every_steps=2",
    ]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Done: 4 steps" in first.stdout and "final eval:" in first.stdout
    assert "images/s" in first.stdout and os.path.join(workdir, "checkpoints") in first.stdout
    config_json = json.loads(Path(workdir, "config.json").read_text())
    assert config_json["model"]["overrides"]["stage_sizes"] == [1]
    second = _cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Already trained to step 4" in second.stdout

    bad = _cli(f"--workdir={tmp_path / 'bad'}", "--config.num_train_steps=-5")
    assert bad.returncode == 2
    assert "error: config.num_train_steps must be > 0" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_small_dataset_trains_with_its_defaults_and_says_what_it_has(tmp_path, capsys):
    """Three digits (430 training images) with a batch larger than that: one batch of all of
    them, a start-up line with the counts, and no top-5 (always 100% with 3 classes)."""
    c = config(class_subset=(0, 1, 2), batch_size=512, num_train_steps=2, eval_every_steps=1)
    summary = loop.train_and_evaluate(c, str(tmp_path))
    out = capsys.readouterr().out
    assert "config.batch_size=512 is more than the 430 training images: training with batch_size=430" in out
    assert "430 training images in 3 classes; 107 for evaluation (sklearn_digits)." in out
    assert "step 1: eval accuracy" in out and "top-5" not in out
    assert "top-5" not in loop.format_summary(summary) and "final eval:  accuracy" in loop.format_summary(
        summary
    )
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 430
    assert summary["steps_per_epoch"] == 1 and summary["final_step"] == 2
