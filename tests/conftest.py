"""Test-wide set-up: JAX runs on the CPU backend.

With libtpu installed (the ``tpu`` extra, for ``train.aot``) JAX would otherwise try to start a
TPU runtime in every test process, printing warnings and holding ``/tmp/libtpu_lockfile``;
``train.aot`` compiles for TPU topologies without any TPU backend. Subprocesses inherit this.
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def x64():
    """64-bit JAX for one test (float64 comparisons with the references), then back to 32-bit."""
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
