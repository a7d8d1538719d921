"""Data parallelism: jit over auto- and explicit-axes meshes vs pmap on 8 CPU devices, and 2 processes x 2
devices vs 1 x 4 (explicit axes).

Each scenario runs in a subprocess (tests/train_worker.py) because the CPU device count must be
set before JAX initialises.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "train_worker.py")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from float_bounds import (  # noqa: E402
    assert_correct_counts_agree,
    assert_trees_within_float32_error,
    float32_bound,
    near_ties,
    rel,
)
from train_worker import digits_eval_arrays, eval_logits, tiny_config  # noqa: E402

from train.checkpoint import restore_variables  # noqa: E402
from train.metrics import read_metrics  # noqa: E402


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


def _run(args, timeout=300, env=None):
    proc = subprocess.run(
        [sys.executable, WORKER, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(), **(env or {})},
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_jit_pmap_and_explicit_mesh_drivers_give_the_same_parameters(tmp_path):
    out = tmp_path / "params.npz"
    _run(["parallel", str(out)])
    data = np.load(out)
    runs = {}
    for key in data.files:
        name, leaf = key.split("|", 1)
        runs.setdefault(name, {})[leaf] = data[key]
    ref = runs.pop("float64")
    assert set(runs) == {"jit", "pmap", "single", "explicit", "two_slices"}
    assert all(runs[name].keys() == runs["jit"].keys() for name in runs)
    assert all(int(runs[name]["step"]) == 5 for name in runs)
    assert bool(runs["explicit"].pop("explicit_types")) and not bool(runs["jit"].pop("explicit_types"))
    for name in ("pmap", "single", "two_slices"):
        runs[name].pop("explicit_types")
    moved = 0
    for leaf in runs["jit"]:
        # Sharded (8 devices, jit), per-device + all-reduce (pmap), unsharded (1 device), an
        # explicit-axes mesh (sharding in types) and 2 slices of 4 devices (Multislice's mesh)
        # differ only in floating-point summation order.
        # Bounded as the parity command does: within 1e-5, or within twice float32's own error
        # here (the 1-device float32 run against its float64 twin from the same start), which
        # covers a ReLU or top-k flipping on rounding on another machine.
        floor = rel(runs["single"][leaf], ref[leaf])
        assert floor <= 1e-3, (leaf, floor)  # the float64 run is the same computation
        for other in ("pmap", "single", "explicit", "two_slices"):
            err = rel(runs["jit"][leaf], runs[other][leaf])
            assert err <= float32_bound(floor), (leaf, other, err, floor)
        if leaf.startswith("batch_stats"):
            moved += int(not np.allclose(runs["jit"][leaf], np.round(runs["jit"][leaf])))
    # BatchNorm statistics were really updated (synchronised under pmap), not left at 0 / 1.
    assert moved > 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_an_explicit_mesh(tmp_path):
    """2 processes x 2 devices (auto axes) vs 1 process x 4 devices with
    ``config.mesh_axis_types='explicit'``: the whole loop (train, eval, checkpoints) agrees, within
    float32's own error against the 1-process run's float64 twin (``config.dtype='float64'``)."""
    single, multi, twin = tmp_path / "single", tmp_path / "multi", tmp_path / "float64"
    port = _free_port()
    # Checkpoints at steps 3, 6, 9 and 12: before rounding has flipped anything the bound is 1e-5.
    every3 = ["--set", "checkpoint_every_steps=3", "--set", "keep_checkpoints=4"]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "train", str(multi), "--devices", "2", *every3]
            + ["--process-id", str(i), "--num-processes", "2", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
            cwd=str(REPO),
        )
        for i in range(2)
    ]
    # The 1-process runs go while the pair is busy with its own start-up.
    ref = _run(["train", str(single), "--devices", "4", *every3, "--set", "mesh_axis_types='explicit'"])
    x64 = {"JAX_ENABLE_X64": "1"}
    _run(["train", str(twin), "--devices", "4", *every3, "--set", "dtype='float64'"], env=x64)
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
        assert p.returncode == 0, out[-5000:]
    assert "WORKER_DONE explicit 0 1 4" in ref.stdout
    assert any("WORKER_DONE auto 0 2 4" in o for o in outputs)
    assert any("WORKER_DONE auto 1 2 4" in o for o in outputs)

    for step in (3, 6, 9, 12):
        a, b, a64 = (restore_variables(d, step=step) for d in (single, multi, twin))
        assert jax.tree.structure(a) == jax.tree.structure(b) == jax.tree.structure(a64)
        assert {x.dtype for x in jax.tree.leaves(a64)} == {np.dtype(np.float64)}
        assert_trees_within_float32_error(a, b, a64)
    # The initial parameters were not simply kept: the steps moved them.
    first = restore_variables(single, step=3)
    assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(a)))
    # Both processes evaluated the whole held-out split; the sums agree with one process.
    evals = [[r for r in read_metrics(d) if r["split"] == "eval"] for d in (single, multi, twin)]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [6, 12]
    for r, s, t in zip(*evals):
        assert r["num_examples"] == s["num_examples"] == 360
        assert rel(r["loss"], s["loss"]) <= float32_bound(rel(r["loss"], t["loss"])), (r, s, t)
        ambiguous = _eval_near_ties([single, multi], twin, r["step"])
        assert_correct_counts_agree(r["accuracy"], s["accuracy"], 360, ambiguous)


def _eval_near_ties(float32_workdirs, twin_workdir, step):
    """The held-out examples whose prediction rounding may flip at ``step`` (tests/float_bounds)."""
    x, _, mean, std = digits_eval_arrays(tiny_config())
    x = (x - mean) / std
    logits32 = [eval_logits(tiny_config(), restore_variables(d, step=step), x) for d in float32_workdirs]
    logits64 = eval_logits(tiny_config(), restore_variables(twin_workdir, step=step), x, float64=True)
    return near_ties(logits64, *logits32)
