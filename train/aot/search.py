"""The largest batch whose compile fits, searched with few slow compiles."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Trial:
    """One compile of the search: did the train step fit, and the bytes per device it needs
    (from the compile, or from the compiler's out-of-HBM message; 0 when it did not say)."""

    batch: int
    fits: bool
    needed_bytes: int
    limit_bytes: int = 0  # the memory the compiler had for it, when its out-of-HBM message says


def _grid_up(x: float) -> int:
    """The smallest batch the search may try at or above ``x``: 1 to 8, then multiples of 8."""
    b = max(math.ceil(x), 1)
    return b if b <= 8 else -(-b // 8) * 8


def _grid_next(b: int) -> int:
    return b + 1 if b < 8 else (b // 8 + 1) * 8


def _grid_prev(b: int) -> int:
    return b - 1 if b <= 8 else (b - 1) // 8 * 8


def _crossing(tried: dict[int, Trial], lo: int, hi: int, capacity: float) -> float | None:
    """Where the bytes needed reach ``capacity``, interpolated from the compiles so far: the
    line through the largest fit and the smallest failure (regula falsi), and the line through
    the two smallest failures (secant). Both undershoot when the compiler rematerialises near
    the limit, so the higher is taken. None when the compiler gave no sizes to interpolate."""
    need_hi = tried[hi].needed_bytes
    if not need_hi:
        return None
    estimates = []
    need_lo = tried[lo].needed_bytes if lo else 0
    if need_lo and need_hi > need_lo:
        estimates.append(lo + (capacity - need_lo) * (hi - lo) / (need_hi - need_lo))
    failed = sorted(b for b, t in tried.items() if not t.fits and t.needed_bytes)
    if len(failed) >= 2:
        (b1, t1), (b2, t2) = ((b, tried[b]) for b in failed[:2])
        if t2.needed_bytes > t1.needed_bytes:
            estimates.append(
                b1 - (t1.needed_bytes - capacity) * (b2 - b1) / (t2.needed_bytes - t1.needed_bytes)
            )
    return max(estimates) if estimates else None


def largest_batch(
    measure: Callable[[int], Trial], start: int, capacity: float, *, limit: int = 1 << 16
) -> tuple[int, list[Trial]]:
    """The largest batch ``b`` whose compile fits, with the next batch up (``b + 8``; ``b + 1``
    below 8) compiled and not fitting. ``measure(b)`` compiles at ``b``; fitting must be
    monotone in ``b``.

    The search is shaped by what compiles cost: one that fits takes minutes, one that runs out of
    HBM ends in seconds and says how many bytes it needed. So it spends failures to save fits:
    from ``start``, it jumps to 4x the batch that a linear scaling of ``start``'s memory would
    fill, which fails (if it fits, it jumps again). Then each try goes halfway from the
    interpolated batch where the memory needed reaches the compiler's limit (``capacity``, or
    less where a failure's ``limit_bytes`` says so; :func:`_crossing`) up to
    the smallest batch that failed: the interpolation undershoots (XLA rematerialises to fit as
    the limit nears, so the memory curve bends), and a try that fits costs as much as a hundred
    that fail. Within four steps of the smallest failure it steps down one at a time. From a
    ``start`` that fails it steps down by a quarter until it has two failures to draw the
    secant through, or a fit. Without sizes to interpolate it bisects. About one or two
    fitting compiles and ten failing ones per search, as the unit tests count on model memory
    curves.

    Returns ``(b, trials)`` in the order tried; ``b`` is 0 when not even 1 fits."""
    tried: dict[int, Trial] = {}

    def test(b: int) -> Trial:
        if b not in tried:
            tried[b] = measure(b)
        return tried[b]

    lo, hi = 0, None
    b = max(int(start), 1)
    while hi is None:
        trial = test(b)
        if not trial.fits:
            hi = b
        elif b >= limit:
            return b, list(tried.values())
        else:
            lo = b
            linear = b * capacity / trial.needed_bytes if trial.needed_bytes else 0
            b = min(max(2 * b, _grid_up(4 * linear)), limit)
    while _grid_next(lo) < hi:
        # Interpolate to the compiler's own limit where a failure said it: a little below the HBM.
        limit = min([capacity, *(t.limit_bytes for t in tried.values() if t.limit_bytes)])
        estimate = _crossing(tried, lo, hi, limit)
        if estimate is None and not lo and tried[hi].needed_bytes:
            # Only failures so far (a start above the answer): a second, cheap failure gives
            # the secant. Memory grows faster than the batch up there, so scaling the batch to
            # the limit undershoots, and a fit far below the answer would waste minutes.
            b = max(0.75 * hi, hi * limit / tried[hi].needed_bytes)
        elif estimate is None:
            b = (lo + hi) // 2
        else:
            b = estimate + (hi - estimate) / 2
        b = min(max(_grid_up(b), _grid_next(lo)), _grid_prev(hi))
        if estimate is not None and hi - b <= 4 * 8:
            # Near the smallest failure, step down from it: a few failing tries cost less than
            # one fit that falls short of the answer.
            b = max(_grid_prev(hi), _grid_next(lo))
        if test(b).fits:
            lo = b
        else:
            hi = b
    return lo, list(tried.values())
