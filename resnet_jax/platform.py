"""Keep JAX on the CPU when libtpu is installed on a machine that has no TPU.

libtpu (``pip install -e ".[tpu]"``, which ``train.aot`` needs and the ``test`` extra brings)
makes JAX try to start a TPU runtime whenever it picks a backend, even where no TPU exists: the
attempt prints screens of warnings about TPU VM metadata, holds ``/tmp/libtpu_lockfile`` and
then falls back to the CPU. :func:`skip_absent_tpu` avoids the attempt, and changes nothing on a
TPU or GPU machine or when the user chose ``JAX_PLATFORMS`` themselves. Every command that runs
JAX calls it first (``python -m train``, ``train.predict``, ``train.export``,
``resnet_jax.parity``, ``benchmarks.train_step``, ``benchmarks.bf16_numerics``);
``train.aot`` instead always compiles on the CPU. ``import resnet_jax`` calls
:func:`skip_absent_tpu_on_import`, so that library code pasted from the README does not print
those warnings either.
"""

from __future__ import annotations

import glob
import importlib.util
import os

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (what JAX itself looks for)


def _tpu_on_pci_bus() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _other_accelerator() -> bool:
    return (
        bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd") or bool(glob.glob("/dev/accel*"))
    )


_SWITCHED = []  # [True] once this module has chosen the CPU (at ``import resnet_jax``, say)


def skip_absent_tpu() -> bool:
    """Use the CPU backend when libtpu is installed but no TPU (nor GPU) is attached; before any
    JAX computation. Returns True when it did (now, or at an earlier call)."""
    import jax

    if _SWITCHED:
        return True
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return False
    if importlib.util.find_spec("libtpu") is None or _tpu_on_pci_bus() or _other_accelerator():
        return False
    jax.config.update("jax_platforms", "cpu")
    _SWITCHED.append(True)
    return True


def skip_absent_tpu_on_import() -> bool:
    """:func:`skip_absent_tpu` for ``import resnet_jax``: only while JAX has not started a
    backend yet (afterwards the choice is made, and changing it would only warn). Returns True
    when it chose the CPU."""
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):  # a JAX without this private check: leave JAX alone
        return False
    return skip_absent_tpu()
