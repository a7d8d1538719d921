"""A ``jax.profiler`` trace of a window of train steps, where TensorBoard's profile plugin finds it.

``config.profile_start_step`` and ``config.profile_num_steps`` (0: off) choose the window, in the
1-based step numbers the metrics use. The trace is written to a local temporary directory (the
profiler writes local files only) and then copied to
``WORKDIR/plugins/profile/steps_<first>-<last>/<host>_p<process>.<kind>`` through ``etils.epath``,
so a ``gs://`` workdir gets it too. ``tensorboard --logdir WORKDIR`` shows it under Profile.

Every process of a multi-host run traces the same window; the host name and process index in
each file's name keep them apart, and the plugin lists them as the hosts of one run. A run that
resumes past the window's start does not trace it.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from typing import Any

import jax

from train import paths

PROFILE_DIR = "plugins/profile"


class ProfileWindow:
    """Starts the trace before step ``start`` and stops it after step ``start + num_steps - 1``
    (or the run's last step), then copies its files into the workdir."""

    def __init__(self, workdir: str, start: int, num_steps: int, last_step: int):
        self.workdir = workdir
        self.start = int(start)
        self.stop = min(int(start) + int(num_steps) - 1, int(last_step))
        self.enabled = num_steps > 0 and self.start <= self.stop
        self._local: str | None = None
        self.copied: list[str] = []

    def __enter__(self) -> ProfileWindow:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """A run that fails inside the window (a NaN stop) still leaves its trace; a failure to
        write it then must not hide the run's own error."""
        if exc_type is None:
            self.finish()
            return
        try:
            self.finish()
        except Exception:
            pass

    @property
    def tracing(self) -> bool:
        return self._local is not None

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.start and not self.tracing:
            self._local = tempfile.mkdtemp(prefix="resnet_jax_profile_")
            jax.profiler.start_trace(self._local)

    def after_step(self, step: int, state: Any) -> bool:
        """Stop after the window's last step (waiting for its device work); True when it did."""
        if not (self.tracing and step >= self.stop):
            return False
        jax.block_until_ready(state)
        self.finish()
        return True

    def finish(self) -> None:
        """Stop the trace, if one is running (the loop also calls it when stopping early)."""
        if not self.tracing:
            return
        local, self._local = self._local, None
        try:
            jax.profiler.stop_trace()
            self.copied = copy_trace(local, self.target())
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def target(self) -> str:
        return paths.join(self.workdir, PROFILE_DIR, f"steps_{self.start}-{self.stop}")


def copy_trace(local: str, target: str) -> list[str]:
    """Copy the profiler's files under ``local/plugins/profile/<run>/`` to ``target``, each named
    ``<host>_p<process>.<kind>`` (``xplane.pb``, ...); returns the paths written."""
    host = socket.gethostname()
    out_dir = paths.Path(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for run_dir in sorted((paths.Path(local) / PROFILE_DIR).iterdir()):
        for f in sorted(run_dir.iterdir()):
            kind = f.name[len(host) + 1 :] if f.name.startswith(host + ".") else f.name
            dest = out_dir / f"{host}_p{jax.process_index()}.{kind}"
            dest.write_bytes(f.read_bytes())
            written.append(str(dest))
    return written
