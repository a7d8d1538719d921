"""Metric outputs of a run: ``WORKDIR/metrics.jsonl``, TensorBoard events, and a PNG of curves.

``metrics.jsonl`` holds one JSON object per logged event: ``{"step": int, "split": "train" |
"eval", "loss": ..., "accuracy": ..., ...}``. TensorBoard scalars go to ``WORKDIR/tensorboard``
as ``<split>/<name>``. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "training_curves.png"


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar: ints stay ints, other numbers become floats (inf/nan as text)."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricWriter:
    """Appends metric records to ``metrics.jsonl`` and TensorBoard (when ``enabled``)."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, TENSORBOARD_DIR))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (left by a run that stopped after its last checkpoint)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            scalars = {
                f"{split}/{name}": float(value)
                for name, value in record.items()
                if name not in ("step", "split") and isinstance(value, (int, float))
            }
            self._tb(int(step), scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb(None, {})
            self._tb = None


def _tensorboard_writer(logdir: str):
    """A ``write(step, {tag: value})`` function for TensorBoard scalars (``step=None`` closes).

    Uses TensorFlow's summary writer where TensorFlow is installed (the TFDS pipelines need it
    anyway), else the ``tensorboard`` package's own event writer (GPU images often ship
    TensorBoard without TensorFlow). With neither, says so once and writes ``metrics.jsonl`` only.
    A run that has not imported TensorFlow (image folders via Grain) writes the events itself
    (``train.tb_events``): importing TensorFlow only for its writer costs seconds and memory.
    """
    import sys

    if "tensorflow" not in sys.modules:
        from train.tb_events import scalar_writer

        return scalar_writer(logdir)
    try:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        tf.config.set_visible_devices([], "GPU")
        # tf.summary.scalar needs the tensorboard package; the generic tf.summary.write with the
        # scalars plugin's metadata produces the same events without it.
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        tf_writer = tf.summary.create_file_writer(logdir)

        def write_tf(step, scalars):
            if step is None:
                tf_writer.close()
                return
            with tf_writer.as_default():
                for tag, value in scalars.items():
                    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)
            tf_writer.flush()

        return write_tf
    except ImportError:
        pass
    try:
        import time

        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        import warnings

        warnings.warn(
            "TensorBoard logs are off: neither tensorflow nor tensorboard is installed "
            "(pip install tensorboard); metrics.jsonl is written as usual.",
            stacklevel=3,
        )
        return None
    events = EventFileWriter(logdir)
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    )

    def write_tb(step, scalars):
        if step is None:
            events.close()
            return
        values = [
            summary_pb2.Summary.Value(
                tag=tag,
                metadata=metadata,
                tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[value]),
            )
            for tag, value in scalars.items()
        ]
        events.add_event(
            event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
        )
        events.flush()

    return write_tb


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a workdir is accepted too)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def plot_curves(workdir: str, out_path: str | None = None) -> str | None:
    """Loss and accuracy against step for train and eval, saved as a PNG; returns its path."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    out_path = out_path or os.path.join(workdir, CURVES_FILE)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [
                (r["step"], r[name])
                for r in records
                if r.get("split") == split and isinstance(r.get(name), (int, float))
            ]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
