"""The console scripts of setup.cfg (``resnet-jax-train``, ...): packaged, importable, and each
runs its command from outside the checkout as ``python -m ...`` does from inside it."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
# The command each script runs, and a flag its --help must list.
EXPECTED = {
    "resnet-jax-train": ("train.__main__:run", "--workdir"),
    "resnet-jax-predict": ("train.predict:run", "--top_k"),
    "resnet-jax-export": ("train.export:run", "--out"),
    "resnet-jax-aot": ("train.aot.__main__:run", "--topology"),
    "resnet-jax-parity": ("resnet_jax.parity:main", "--arch"),
    "resnet-jax-train-parity": ("train.parity:run", "--steps_per_epoch"),
    "resnet-jax-prepare": ("train.prepare:run", "--config"),
}


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _entry_points() -> dict[str, str]:
    lines = _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if line.strip())


def test_setup_cfg_declares_the_console_scripts() -> None:
    assert _entry_points() == {name: target for name, (target, _) in EXPECTED.items()}


def test_the_packages_include_the_training_program() -> None:
    """The scripts import train/ from an installed copy: setup.cfg's find must list it."""
    include = _setup_cfg()["options.packages.find"]["include"].split()
    found = set(find_packages(str(ROOT), include=include))
    assert {"resnet_jax", "train", "train.aot", "train.data"} <= found
    assert not {p for p in found if p.startswith("tests")}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_console_script_runs_its_command_outside_the_checkout(script: str, tmp_path: Path) -> None:
    """The target, called as pip's generated script calls it (``sys.exit(f())``), in a directory
    that is not the checkout, prints its command's --help."""
    target, flag = EXPECTED[script]
    module, func = target.split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))  # the installed packages
    proc = subprocess.run(
        [sys.executable, "-c", code, "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), out[-2000:]  # absl's --help exits 1, argparse's 0
    assert flag in out and "Traceback" not in out, out[-2000:]
