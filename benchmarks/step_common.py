"""What the parts of ``python -m benchmarks.train_step`` share: the clock, the progress log, the
recipe's hyperparameters and the ``Contender`` interface.

Standard library only, and imported by ``benchmarks.train_step`` before anything that imports
JAX: the clock starts here, and the time-to-first-step figure counts from it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

STARTED = time.perf_counter()  # process start, near enough: for the time-to-first-step figure

LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.1
# --compare-recipe: timm's ResNet strikes back A1 values (drop path 0.05; its EMA decay).
RECIPE_DROP_PATH_RATE = 0.05
RECIPE_EMA_DECAY = 0.9998

OPTIMIZER_DESC = (
    f"SGD lr {LEARNING_RATE}, Nesterov momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} on "
    f"conv/dense kernels; cross-entropy with label smoothing {LABEL_SMOOTHING}"
)


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON result."""
    print(f"[benchmark {time.perf_counter() - STARTED:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Contender:
    """Something that can be prepared (built, compiled, warmed up) and then timed."""

    name: str = ""

    def prepare(self) -> dict[str, Any]:
        raise NotImplementedError

    def timed_steps(self, n: int) -> list[float]:
        """Run ``n`` steps, each synchronised with the device; their wall times in seconds."""
        raise NotImplementedError

    def pipelined(self, n: int) -> float:
        """Mean step time of ``n`` steps issued back to back, synchronised once at the end."""
        raise NotImplementedError
