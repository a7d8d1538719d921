"""``python -m benchmarks.train_step --measure-cache``: the benchmark run twice, in fresh processes
sharing one initially empty persistent compilation cache, for the cold and the warm compile (and
start-up) times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.step_common import log
from benchmarks.step_run import model_config
from train import compile_cache

# The children's own flags: no comparisons or extras, and a short run through the given cache.
_CHILD_DROPS_VALUELESS = {
    "--measure-cache",
    "--compare-torch",
    "--compare-minimal",
    "--no-compilation-cache",
    "--pipelined",
    "--compare-bn-two-pass",
}
_CHILD_DROPS_VALUED = {
    "--compilation-cache",
    "--steps",
    "--warmup",
    "--rounds",
    "--output",
    "--profile",
    "--torch-compile-mode",
    "--torch-compile-timeout",
}


def measure_cache(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Run this benchmark twice in new processes with one initially empty cache directory."""
    child_argv = _strip_flags(argv, valueless=_CHILD_DROPS_VALUELESS, valued=_CHILD_DROPS_VALUED)
    tmp = None
    cache_dir = args.compilation_cache
    if not cache_dir or cache_dir.lower() in compile_cache.DISABLED or cache_dir == compile_cache.AUTO:
        tmp = tempfile.TemporaryDirectory(prefix="resnet_jax_cache_")
        cache_dir = tmp.name
    elif compile_cache.cache_entries(cache_dir):
        raise SystemExit(f"--measure-cache needs an empty cache directory; {cache_dir} has files.")
    runs = {}
    try:
        for label in ("cold", "warm"):
            runs[label], child_env = _timed_child(label, child_argv, cache_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "benchmark": "compilation_cache",
        "config": {
            **model_config(args),
            "cache_dir": cache_dir if tmp is None else "(temporary, removed afterwards)",
        },
        "environment": child_env,
        "command": "python -m benchmarks.train_step " + " ".join(argv),
        "cold": runs["cold"],
        "warm": runs["warm"],
        "compile_speedup": runs["cold"]["compile_time_s"] / runs["warm"]["compile_time_s"],
        "note": "compile_time_s = lowering + XLA compile of the train step (lowering is never "
        "cached); process_time_to_first_step_s counts from the benchmark module's import",
    }


def _timed_child(label: str, child_argv: list[str], cache_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One short benchmark in a new process through ``cache_dir``: its start-up and compile
    times, and its environment."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", *child_argv]
    cmd += [
        "--compilation-cache",
        cache_dir,
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
    ]
    log(f"{label} start: {' '.join(cmd[1:])}")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{label} run failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout)
    j = child["jax"]
    summary = {
        "process_wall_s": wall,
        "process_time_to_first_step_s": j["process_time_to_first_step_s"],
        "init_time_s": j["init_time_s"],
        "lower_time_s": j["lower_time_s"],
        "xla_compile_time_s": j["xla_compile_time_s"],
        "compile_time_s": j["compile_time_s"],
        "first_step_time_s": j["first_step_time_s"],
        "cache_entries_after": j.get("compilation_cache", {}).get("entries_after_compile"),
        "step_was_cached": j.get("compilation_cache", {}).get("step_was_cached"),
    }
    return summary, child["environment"]


def _strip_flags(argv: Sequence[str], valueless: set[str], valued: set[str]) -> list[str]:
    """``argv`` without the flags named: ``valueless`` ones alone, ``valued`` ones with their value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in valueless:
            continue
        if name in valued:
            skip = "=" not in a
            continue
        out.append(a)
    return out
