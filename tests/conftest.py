"""Test-wide set-up: JAX runs on the CPU backend.

With libtpu installed (the ``tpu`` extra, for ``train.aot``) JAX would otherwise try to start a
TPU runtime in every test process, printing warnings and holding ``/tmp/libtpu_lockfile``;
``train.aot`` compiles for TPU topologies without any TPU backend. Subprocesses inherit this.
"""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole run, shared by both xdist workers and every
# subprocess (they inherit these variables): a program that several tests compile (the tiny
# training step of train_worker.tiny_config, one preset's forward pass at one shape, a process
# restarted after a kill) is compiled once. A cache hit loads the executable that the same
# program, flags and JAX version compiled to, so what the tests check is unchanged; programs
# that compile in under half a second are not written (eager ops). Tests of the cache itself
# set their own directory.
_XLA_CACHE = os.path.join(tempfile.gettempdir(), "resnet_jax_tests_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("RESNET_JAX_CACHE_DIR", _XLA_CACHE)  # the training program's default

# threefry2x32 as JAX generated it before 0.5 (not "partitionable"): the same generator and the
# same guarantees (a key gives the same values on any mesh), but XLA:CPU compiles its kernels
# several times faster, and every model init in the suite compiles them for each new parameter
# shape (BENCHMARKS.md, "Compile time of random init on a CPU").
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")


@pytest.fixture
def x64():
    """64-bit JAX for one test (float64 comparisons with the references), then back to 32-bit."""
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (its hook, in each worker)
def pytest_collection_modifyitems(config, items):
    """Keep the tests that share one of this suite's module-scoped fixtures on one xdist worker.

    ``pytest -n 2 --dist loadgroup`` (the README's test command, with setup.cfg's addopts) would
    otherwise hand them to both workers, and each worker would build the fixture (a training run,
    an 8-device subprocess, a compiled topology) once more. A test that names its own group keeps
    it.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        info = getattr(item, "_fixtureinfo", None)
        for name in info.names_closure if info else ():
            defs = info.name2fixturedefs.get(name) or ()
            fixture = defs[-1] if defs else None
            if fixture is not None and fixture.scope == "module" and fixture.baseid:
                item.add_marker(pytest.mark.xdist_group(f"{fixture.baseid}::{name}"))
                break
