"""Goodput: where a run's wall time went, across its restarts.

Every second from the start of ``train_and_evaluate`` to its end is in exactly one part:

* ``productive``: train steps that are kept (the device finishing them included);
* ``compile``: compiling (or loading) the train step;
* ``input_wait``: the loop waiting for its next batch;
* ``eval``: evaluations (their compile included);
* ``checkpoint``: checkpoint saves (and waiting for the last one at the end);
* ``startup``: building the run and restoring or initialising the state;
* ``redone``: steps run again after a restart: those between the checkpoint the run resumed
  from and the furthest step the killed run had logged;
* ``profiler``: stopping a ``jax.profiler`` trace and copying it to the workdir;
* ``other``: writing the goodput file at each log step, and the end (curves, closing files).

The totals are cumulative over the runs of one workdir: each train record carries them as
``goodput/<part>_s`` (with ``goodput/wall_s``, ``goodput/fraction`` = productive / wall and
``goodput/redone_steps``). At each log step process 0 also overwrites ``WORKDIR/goodput.json``
with them and the furthest train step any run of the workdir has logged. A resumed run reads
that file and adds to its totals; the steps from its checkpoint up to that furthest step are
redone. The file is what survives a kill on a ``gs://`` workdir, whose records are written in
segments at checkpoints (``train/metrics.py``) and so lose the steps logged after the last one.
A workdir written before the file existed falls back to its last train record. Time after the
last log step is lost with the process. A rerun of a finished run reports its totals but
writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

PARTS = (
    "productive",
    "compile",
    "input_wait",
    "eval",
    "checkpoint",
    "startup",
    "redone",
    "profiler",
    "other",
)
PREFIX = "goodput/"
FILE = "goodput.json"


class Goodput:
    """A stopwatch that charges elapsed time to the current part; :meth:`switch` changes part.

    Args:
        previous: The totals of the runs before this one in the workdir (``goodput/...`` keys of
            their last train record), or None.
        clock: Monotonic time source (replaceable in tests).
    """

    def __init__(
        self, previous: dict[str, float] | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        self.clock = clock
        self.seconds = dict.fromkeys(PARTS, 0.0)  # this run's
        self.redone_steps = 0
        self.furthest_step = 0  # the furthest train step logged in the workdir (goodput.json)
        self.previous: dict[str, float] = {}
        self.set_previous(previous)
        self._part = "startup"
        self._mark = clock()
        self._window = self._in_steps()

    def set_previous(self, previous: dict[str, float] | None) -> None:
        self.previous = {k: float(v) for k, v in (previous or {}).items() if k.startswith(PREFIX)}

    def switch(self, part: str) -> None:
        now = self.clock()
        self.seconds[self._part] += now - self._mark
        self._part, self._mark = part, now

    @contextlib.contextmanager
    def part(self, part: str) -> Iterator[None]:
        """Charge the block's time to ``part``, then go back to the current one."""
        before = self._part
        self.switch(part)
        try:
            yield
        finally:
            self.switch(before)

    def move(self, seconds: float, to: str) -> None:
        """Re-charge ``seconds`` of the current part's time so far to ``to`` (the compile inside
        the first step's time)."""
        self.switch(self._part)
        seconds = min(seconds, self.seconds[self._part])
        self.seconds[self._part] -= seconds
        self.seconds[to] += seconds

    def _in_steps(self) -> tuple[float, float]:
        return self.seconds["input_wait"], sum(
            self.seconds[p] for p in ("productive", "redone", "input_wait")
        )

    def input_wait_fraction(self) -> float | None:
        """The share of the time in the step loop since the previous call spent waiting for input."""
        self.switch(self._part)
        wait, total = self._in_steps()
        (wait0, total0), self._window = self._window, (wait, total)
        return (wait - wait0) / (total - total0) if total > total0 else None

    def totals(self) -> dict[str, float]:
        """The cumulative ``goodput/...`` record (this run's time added to the previous runs')."""
        self.switch(self._part)
        out = {}
        for p in PARTS:
            out[f"{PREFIX}{p}_s"] = self.previous.get(f"{PREFIX}{p}_s", 0.0) + self.seconds[p]
        wall = sum(out.values())
        out[f"{PREFIX}wall_s"] = wall
        out[f"{PREFIX}fraction"] = out[f"{PREFIX}productive_s"] / wall if wall > 0 else 0.0
        out[f"{PREFIX}redone_steps"] = int(self.previous.get(f"{PREFIX}redone_steps", 0)) + self.redone_steps
        return out


def from_metrics(records: list[dict[str, Any]]) -> tuple[dict[str, float] | None, int]:
    """The last ``goodput/...`` totals a workdir's records hold, and the furthest train step they
    logged (0 without one): what a resumed run adds to, and up to where it redoes steps."""
    previous, furthest = None, 0
    for r in records:
        if r.get("split") != "train":
            continue
        if "loss" in r:
            furthest = max(furthest, int(r["step"]))
        if f"{PREFIX}wall_s" in r:
            previous = {k: v for k, v in r.items() if k.startswith(PREFIX)}
    return previous, furthest


def save(workdir: str, totals: dict[str, float], furthest_step: int) -> None:
    """Overwrite ``WORKDIR/goodput.json`` with ``totals`` and the furthest step logged. A local
    file is replaced whole (written beside it, then renamed), so a kill leaves the old or the
    new one; a Cloud Storage object is replaced whole by its own write."""
    from train import paths

    text = json.dumps({"furthest_step": int(furthest_step), "totals": totals})
    path = paths.join(workdir, FILE)
    if paths.is_remote(path):
        paths.Path(path).write_text(text)
        return
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def load(workdir: str, records: list[dict[str, Any]]) -> tuple[dict[str, float] | None, int]:
    """What a resumed run adds to: the totals and furthest step of ``WORKDIR/goodput.json``, or
    of the records (:func:`from_metrics`) for a workdir without the file; (None, 0) for none."""
    from train import paths

    path = paths.Path(paths.join(workdir, FILE))
    if not path.exists():
        return from_metrics(records)
    try:
        saved = json.loads(path.read_text())
        return dict(saved["totals"]), int(saved["furthest_step"])
    except (ValueError, KeyError, TypeError):  # not ours: start the accounting afresh
        return from_metrics(records)


def summary_line(totals: dict[str, float]) -> str:
    """One line for the end-of-run summary: goodput and the parts that were not productive."""
    wall = totals[f"{PREFIX}wall_s"]
    parts = [
        f"{p.replace('_', ' ')} {totals[f'{PREFIX}{p}_s']:.1f} s"
        for p in PARTS[1:]
        if totals[f"{PREFIX}{p}_s"] >= 0.05
    ]
    redone = int(totals[f"{PREFIX}redone_steps"])
    steps = f" ({redone} step(s) redone)" if redone else ""
    return (
        f"{100 * totals[f'{PREFIX}fraction']:.1f}% productive of {wall:.1f} s{steps}; "
        f"{', '.join(parts) or 'nothing else'}"
    )
