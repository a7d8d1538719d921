"""JAX's persistent compilation cache, on by default for the training program and benchmarks.

Compiled XLA executables (and, on GPU, autotuning results) are written to a directory keyed on
the computation, the compiler flags, the devices and the JAX/jaxlib versions, so a second
process that compiles the same train step loads it instead of recompiling. Tracing and lowering
still run in every process; only the XLA compile is skipped.

Directory: ``$RESNET_JAX_CACHE_DIR`` if set, else ``~/.cache/resnet_jax/xla``; a ``gs://`` path
works too (JAX reads and writes its cache through etils.epath), e.g. a bucket that every host
of a TPU slice shares. Passing ``''``,
``'off'`` or ``'none'`` (or setting the environment variable to one of them) disables it, even
where ``$JAX_COMPILATION_CACHE_DIR`` has turned JAX's cache on. Call
:func:`enable_compilation_cache` once at start-up, before the first compilation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax

from train import paths

ENV_VAR = "RESNET_JAX_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "resnet_jax", "xla")
DISABLED = ("", "off", "none", "false", "0")
AUTO = "auto"


def default_cache_dir() -> str | None:
    """``$RESNET_JAX_CACHE_DIR`` (``None`` if it says off) or ``~/.cache/resnet_jax/xla``."""
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if env.strip().lower() in DISABLED else paths.resolve(env)
    return os.path.expanduser(DEFAULT_DIR)


def resolve_cache_dir(cache_dir: str | None = AUTO) -> str | None:
    """The directory ``cache_dir`` means: ``None``/``'auto'`` -> the default, off-values -> ``None``."""
    if cache_dir is None or cache_dir == AUTO:
        return default_cache_dir()
    if cache_dir.strip().lower() in DISABLED:
        return None
    return paths.resolve(cache_dir)


def enable_compilation_cache(
    cache_dir: str | None = AUTO,
    *,
    min_compile_time_secs: float = 0.0,
    min_entry_size_bytes: int = 0,
) -> str | None:
    """Turn on the persistent compilation cache in ``cache_dir``; returns the directory used.

    ``cache_dir``: a path, ``None``/``'auto'`` for the default (see the module docstring), or
    ``''``/``'off'``/``'none'`` to leave caching off (returns ``None``). The thresholds default to
    0 so every executable is cached: JAX's own default skips compilations under one second, but
    a cold start compiles several small programs (state init, batch placement) besides the step.
    """
    path = resolve_cache_dir(cache_dir)
    if path is None:
        # Off means off, also where $JAX_COMPILATION_CACHE_DIR had turned JAX's own cache on.
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    paths.Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    return path


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """Compile without the persistent cache inside the block, for executables that will be saved.

    An executable that XLA:CPU loaded from the cache serializes again without its compiled
    functions: the copy loads, then fails when it runs ("Function ... not found"). So
    ``train.aot --save`` compiles afresh; the cache is back as it was after the block.
    """
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is used; ask it again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def cache_entries(cache_dir: str) -> int:
    """Number of files in ``cache_dir`` (0 if it does not exist); for reports and tests."""
    if not paths.Path(cache_dir).is_dir():
        return 0
    return sum(len(files) for _, _, files in paths.Path(cache_dir).walk())
