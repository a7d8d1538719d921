"""Executables saved by ``train.aot --save`` and loaded by ``python -m train`` (``train/executables.py``).

Everything here runs on this machine's CPU (``--topology=cpu``), with no libtpu: the steps are
compiled ahead of time for the CPU devices, saved, then loaded by a synthetic-data run (a tiny
ResNet, 12 steps, evaluated at another size than it trains at). The reference is the same run
compiled as usual; the loaded run must equal it bitwise.
"""

import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_worker import tiny_config  # noqa: E402

from train import aot, checkpoint, executables, loop  # noqa: E402
from train.config import ConfigError  # noqa: E402

# Synthetic images evaluated at their own size (12 px after training at 8): the saved eval step
# must be compiled for the eval batches, not the training ones, for the run to load it.
SYNTHETIC = dict(
    dataset="synthetic",
    image_size=8,
    eval_image_size=12,
    synthetic_num_classes=10,
    synthetic_num_examples=64,
    synthetic_num_eval_examples=64,
)


def config(**kw):
    return tiny_config(compilation_cache_dir="off", checkpoint_every_steps=0, **SYNTHETIC, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny run compiled as usual, then ``train.aot --topology=cpu --save`` of it.

    The usual run goes first and writes its steps to the persistent compilation cache, which
    conftest.py turns on for the suite, so that the save meets a warm cache: an executable
    loaded from the cache and serialized again cannot run (train.compile_cache.bypassed)."""
    tmp = tmp_path_factory.mktemp("aot")
    assert jax.config.jax_compilation_cache_dir  # the suite's cache is on
    reference = str(tmp / "reference")
    minimum = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        summary = loop.train_and_evaluate(config(), reference)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
    assert not summary["aot_loaded"]
    path = str(tmp / "steps.aot")
    result = aot.run_aot(config(), aot.parse_topology("cpu"), for_saving=True)
    assert result.to_json()["eval_image_shape"] == [12, 12, 3]
    aot.save_executables(result, path)
    return path, reference, summary


def _variables(workdir):
    return jax.tree.leaves(checkpoint.restore_variables(workdir))


def test_loaded_run_is_bitwise_the_compiled_run(saved, tmp_path, capfd):
    path, reference, want = saved
    got = loop.train_and_evaluate(config(aot_executable=path), str(tmp_path))
    assert got["aot_loaded"] and "warning" not in capfd.readouterr().err
    for a, b in zip(_variables(str(tmp_path)), _variables(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    assert got["eval"] == want["eval"]  # the eval step was loaded too, and gives the same sums


def test_another_program_warns_and_compiles(saved, tmp_path, capfd):
    path, _, _ = saved
    summary = loop.train_and_evaluate(config(aot_executable=path, label_smoothing=0.1), str(tmp_path))
    err = capfd.readouterr().err
    assert not summary["aot_loaded"]
    lines = [x for x in err.splitlines() if x.startswith("warning:")]
    # Label smoothing is in the train step's loss only: the eval step is the same program, loaded.
    assert len(lines) == 1, err
    assert "train_step is a different program" in lines[0] and lines[0].endswith("compiling instead.")


def test_other_versions_warn(saved, capfd):
    payload = executables.read(saved[0])
    payload["environment"]["jax"] = "0.0.1"
    # Checked before the program (None here), which is compared last.
    assert executables.load(payload, "train_step", None, jax.devices(), "old.aot") is None
    assert capfd.readouterr().err == (
        f"warning: not using old.aot for train_step: it was compiled for jax='0.0.1', this run has "
        f"'{jax.__version__}'; compiling instead.\n"
    )


def test_payload_holds_what_the_executables_depend_on(saved):
    payload = executables.read(saved[0])
    assert payload["environment"]["jax"] == jax.__version__ and "libtpu" not in payload["environment"]
    assert payload["devices"] == {
        "platform": "cpu",
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "num_processes": 1,
        "layout": [[0, d.id] for d in jax.devices()],
    }
    assert set(payload["steps"]) == {"train_step", "eval_step"}
    assert all(len(s["fingerprint"]) == 64 for s in payload["steps"].values())
    payload["devices"]["layout"][0][-1] += 1  # another device in the first place
    why = executables.mismatch(payload, "train_step", None, jax.devices())
    assert why == "it was compiled for another device layout (the slice's shape, or the mesh's order)"
    # A different device count is refused before the program is even compared.
    payload["devices"]["num_devices"] += 1
    why = executables.mismatch(payload, "train_step", None, jax.devices())
    assert why.startswith(f"it was compiled for num_devices={jax.device_count() + 1}")


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; write it with python -m train.aot --save"):
        executables.read(str(tmp_path / "missing.aot"))
    (tmp_path / "junk.aot").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot be read"):
        executables.read(str(tmp_path / "junk.aot"))
    (tmp_path / "other.aot").write_bytes(pickle.dumps({"format": 1}))
    with pytest.raises(ConfigError, match="not a file written by this version"):
        executables.read(str(tmp_path / "other.aot"))


def test_command_line_is_one_line_for_a_missing_file(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config=configs/default.py",
            f"--workdir={tmp_path / 'run'}",
            f"--config.aot_executable={tmp_path / 'missing.aot'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: config.aot_executable='{tmp_path / 'missing.aot'}' does not exist; write it with "
        f"python -m train.aot --save, or set aot_executable=''."
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written
