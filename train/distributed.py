"""Several processes (multi-host): JAX's own distributed runtime, and keeping processes in step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax


def maybe_initialize_distributed(config: Any) -> None:
    """``jax.distributed.initialize`` when ``config.distributed.enabled`` (before any JAX use)."""
    dist = config.distributed
    if dist is None or not dist.enabled:
        return
    if dist.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    kwargs = {}
    if dist.coordinator_address:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes > 0:
        kwargs["num_processes"] = int(dist.num_processes)
    if dist.process_id >= 0:
        kwargs["process_id"] = int(dist.process_id)
    jax.distributed.initialize(**kwargs)


def sync_processes(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process gets here, via the coordination service (no device collective).

    Used after compiling so all processes enter their first collective together: CPU (gloo)
    collectives give up when peers arrive tens of seconds apart, which compile-time skew
    between processes easily causes.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_jax_distributed_client().wait_at_barrier(name, timeout_s * 1000)


class CompiledOnFirstCall:
    """Ahead-of-time compiles a jitted or pmapped function at its first call, then syncs hosts.

    ``load(name, lowered)``, when given, may return an executable compiled earlier for the same
    lowered program (``train/executables.py``); None from it means compile as usual.
    ``compile_time`` is the compilation (or the load) alone, not the first step's run, and
    ``loaded`` says which it was.
    """

    def __init__(self, fn: Any, name: str, load: Callable[[str, Any], Any] | None = None):
        self._fn, self._name, self._load, self._compiled = fn, name, load, None
        self.compile_time: float | None = None
        self.loaded = False

    @property
    def fn(self) -> Any:
        """The jitted or pmapped function (for tracing it, e.g. to count its FLOPs)."""
        return self._fn

    @property
    def compiled(self) -> Any:
        """The compiled (or loaded) executable; None before the first call."""
        return self._compiled

    def __call__(self, *args):
        if self._compiled is None:
            t0 = time.perf_counter()
            lowered = self._fn.lower(*args)
            compiled = self._load(self._name, lowered) if self._load is not None else None
            self.loaded = compiled is not None
            self._compiled = compiled if compiled is not None else lowered.compile()
            self.compile_time = time.perf_counter() - t0
            sync_processes(f"resnet_jax_compiled_{self._name}")
        return self._compiled(*args)
