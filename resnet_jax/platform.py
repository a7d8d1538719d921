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

:func:`xla_cpu_without_ynnpack_on_import`, also at ``import resnet_jax``, asks XLA:CPU to
leave YNNPACK out (issue 47; ``resnet_jax.conv_grad`` says why and what
happens where it cannot).
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


# XLA:CPU without YNNPACK (issue 47): jax 0.10's XLA:CPU gives convolutions and dots to
# YNNPACK by default, and on ResNet its weight gradients are several times, and its forward
# passes about twice, as slow as XLA's own Eigen kernels, so the step and inference are faster
# without it (BENCHMARKS.md, section 5).
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# jaxlib versions whose XLA knows the flag (XLA aborts at start-up on an unknown one).
_FLAG_JAXLIB = ((0, 10), (0, 12))


def xla_cpu_without_ynnpack_on_import() -> bool:
    """Append :data:`CPU_XLA_FLAG` to ``$XLA_FLAGS`` for ``import resnet_jax``: only while JAX
    has not started a backend (XLA reads the variable once, then), only on jaxlib versions that
    know the flag, never over a choice of the user's (any ``xla_cpu_experimental_ynn_fusion_type``
    in ``$XLA_FLAGS``), and not with ``RESNET_JAX_CPU_CONV_GRAD=0``. It concerns XLA:CPU alone.
    Where it did not apply, ``resnet_jax.conv_grad`` sees YNNPACK's convolutions and computes
    their weight gradients as matmuls instead. Child processes inherit the variable. Returns
    True when it appended the flag."""
    from resnet_jax import conv_grad

    flags = os.environ.get("XLA_FLAGS", "")
    if not conv_grad.enabled() or CPU_XLA_FLAG.split("=")[0] in flags:
        return False
    try:
        import jaxlib
        from jax._src import xla_bridge

        version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
        if xla_bridge.backends_are_initialized() or not _FLAG_JAXLIB[0] <= version < _FLAG_JAXLIB[1]:
            return False
    except (ImportError, AttributeError, ValueError):  # a JAX without these: leave it alone
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()
    return True
