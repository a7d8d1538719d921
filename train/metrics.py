"""Metric outputs of a run: ``metrics.jsonl``, TensorBoard events, and a PNG of curves.

Each record is one JSON object per logged event: ``{"step": int, "split": "train" | "eval",
"loss": ..., "accuracy": ..., ...}``. TensorBoard scalars go to ``WORKDIR/tensorboard`` as
``<split>/<name>``. Only process 0 writes.

On a local disk every record is appended to ``WORKDIR/metrics.jsonl`` at once. Cloud Storage
objects cannot be appended to, and rewriting a growing file at every log line costs more each
time, so a ``gs://`` workdir gets segments instead: records are buffered and written as a new
object ``WORKDIR/metrics/part-NNNNNN.jsonl``, with a TensorBoard events file beside the others in
``WORKDIR/tensorboard/``, before every checkpoint is saved, at the first record ``flush_secs``
after the previous segment, and at the end. A kill loses only records past the last checkpoint,
which the resumed run logs again (it drops the ones past its checkpoint step first, as on a local
disk). ``read_metrics`` reads either form.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from train import paths, tb_events

METRICS_FILE = "metrics.jsonl"
METRICS_PARTS_DIR = "metrics"  # gs:// workdirs: metrics/part-NNNNNN.jsonl
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "training_curves.png"
# How often a gs:// workdir gets its buffered records at the latest (besides every checkpoint).
FLUSH_SECS = 300.0
_PART = re.compile(r"part-(\d+)\.jsonl$")


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar: ints stay ints, other numbers become floats (inf/nan as text)."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    split = record["split"]
    return {
        f"{split}/{name}": float(value)
        for name, value in record.items()
        if name not in ("step", "split") and isinstance(value, (int, float))
    }


class MetricWriter:
    """Writes metric records to ``metrics.jsonl`` (segments in a bucket) and TensorBoard (when
    ``enabled``).

    Args:
        workdir: The run's workdir (local or ``gs://``).
        enabled: Write anything at all; False on every process but 0.
        tensorboard: Also write TensorBoard events.
        flush_secs: ``gs://`` only: the least time between two segments, in seconds.
        clock: Monotonic time source for ``flush_secs`` (replaceable in tests).
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        flush_secs: float = FLUSH_SECS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.enabled = enabled
        self.workdir = paths.resolve(workdir)
        self.remote = paths.is_remote(self.workdir)
        self.path = paths.join(self.workdir, METRICS_PARTS_DIR if self.remote else METRICS_FILE)
        self.flush_secs = flush_secs
        self._clock = clock
        self._tensorboard = tensorboard
        self._tb = None
        self._pending: list[tuple[float, dict[str, Any]]] = []  # (wall time, record), remote only
        self._last_flush = clock()
        self._next_part = 0
        if not enabled:
            return
        paths.Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._next_part = 1 + max((n for n, _ in _parts(self.workdir)), default=-1)
        elif tensorboard:
            self._tb = tb_events.scalar_writer(paths.join(self.workdir, TENSORBOARD_DIR))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (left by a run that stopped after its last checkpoint)."""
        if not self.enabled:
            return
        if not self.remote:
            if paths.Path(self.path).exists():
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
                with open(self.path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
            return
        # Each segment holding later steps is replaced whole (or removed), so a kill in the
        # middle leaves segments that the next resume truncates again.
        parts = [p for _, p in _parts(self.workdir)]
        for part, records in zip(parts, _read_all(parts)):
            kept = [r for r in records if r.get("step", 0) <= step]
            if len(kept) == len(records):
                continue
            if kept:
                part.write_text("".join(json.dumps(r) + "\n" for r in kept))
            else:
                part.unlink()

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if self.remote:
            self._pending.append((time.time(), record))
            if self._clock() - self._last_flush >= self.flush_secs:
                self.flush()
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb(int(step), _scalars(record))

    def flush(self) -> None:
        """Write the buffered records (a gs:// workdir's next segment); a no-op on a local disk,
        where every record is written at once."""
        self._last_flush = self._clock()
        if not (self.enabled and self._pending):
            return
        pending, self._pending = self._pending, []
        name = f"part-{self._next_part:06d}"
        self._next_part += 1
        part = paths.Path(self.path) / f"{name}.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("".join(json.dumps(r) + "\n" for _, r in pending))
        if self._tensorboard:
            # TensorBoard reads every events file of a directory, in the order of their names.
            events = paths.Path(self.workdir) / TENSORBOARD_DIR
            events.mkdir(parents=True, exist_ok=True)
            file = f"events.out.tfevents.{int(pending[0][0]):010d}.{socket.gethostname()}.{name}"
            (events / file).write_bytes(
                tb_events.event_file([(t, r["step"], _scalars(r)) for t, r in pending])
            )

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb(None, {})
            self._tb = None


def _parts(workdir: str) -> list[tuple[int, Any]]:
    """``(number, path)`` of a remote workdir's metric segments, in the order they were written."""
    directory = paths.Path(workdir) / METRICS_PARTS_DIR
    if not directory.exists():
        return []
    found = [(_PART.search(p.name), p) for p in directory.iterdir()]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def _read_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``, or of a workdir (local or ``gs://``: its file, then its
    segments)."""
    path = paths.resolve(path)
    if not paths.Path(path).is_dir():
        return _read_jsonl(paths.Path(path).read_text())
    records = []
    local = paths.Path(path) / METRICS_FILE
    if local.exists():
        records += _read_jsonl(local.read_text())
    for segment in _read_all([p for _, p in _parts(path)]):
        records += segment
    return records


def _read_all(parts: list[Any]) -> list[list[dict[str, Any]]]:
    """The records of each segment (one request each, several at a time)."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda p: _read_jsonl(p.read_text()), parts))


def has_metrics(workdir: str) -> bool:
    return (paths.Path(workdir) / METRICS_FILE).exists() or bool(_parts(workdir))


def plot_curves(workdir: str, out_path: str | None = None) -> str | None:
    """Loss and accuracy against step for train and eval, saved as a PNG; returns its path."""
    if not has_metrics(workdir):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    out_path = out_path or paths.join(workdir, CURVES_FILE)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("loss", "accuracy")):
        # The EMA's eval metrics are in the eval records as ema_loss, ema_accuracy (train/ema.py).
        for split, key, style, label in (
            ("train", name, "-", "train"),
            ("eval", name, "o-", "eval"),
            ("eval", f"ema_{name}", "s--", "eval (EMA)"),
        ):
            points = [
                (r["step"], r[key])
                for r in records
                if r.get("split") == split and isinstance(r.get(key), (int, float))
            ]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(paths.Path(paths.resolve(workdir)).name)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    paths.Path(out_path).write_bytes(png.getvalue())
    return out_path
