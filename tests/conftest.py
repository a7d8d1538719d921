"""Test-wide set-up: JAX runs on the CPU backend.

With libtpu installed (the ``tpu`` extra, for ``train.aot``) JAX would otherwise try to start a
TPU runtime in every test process, printing warnings and holding ``/tmp/libtpu_lockfile``;
``train.aot`` compiles for TPU topologies without any TPU backend. Subprocesses inherit this.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
