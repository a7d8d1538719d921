"""Where PyTorch's training step spends its time, in ``benchmarks.profile_ops``'s categories.

``summarize(step, steps)`` runs ``step()`` ``steps`` times under ``torch.profiler`` (CPU
activity) and sums each operator's *self* CPU time (its own time, not its children's) by
category and by phase, so that ``python -m benchmarks.train_step --compare-torch --profile DIR``
can set PyTorch's profile beside XLA's, op kind by op kind (issue 47):

* category, from the operator's name: ``convolution`` (``aten::*conv*``, oneDNN's included, and
  their backward), ``matmul`` (``addmm``, ``mm``, ``linear``), ``copy_other`` (copies, layout
  changes, allocation, and Python-level ranges' own time), else ``batchnorm_elementwise``
  (BatchNorm, ReLU, adds, pooling, the loss); every operator under ``Optimizer.step`` is
  ``optimizer``;
* phase: ``optimizer`` under ``Optimizer.step``, ``backward`` under autograd's engine
  (``autograd::engine::evaluate_function``), ``forward`` otherwise.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import Any

from benchmarks.profile_ops import CATEGORIES, PHASES

_CONV = re.compile(r"conv", re.I)
_MATMUL = re.compile(r"^aten::(addmm|mm|bmm|linear|matmul)$")
_COPY = re.compile(
    r"^aten::(copy_|to|_to_copy|contiguous|clone|empty|empty_like|empty_strided|zeros|zeros_like|"
    r"zero_|fill_|view|reshape|_reshape_alias|as_strided|t|transpose|permute|expand|detach|"
    r"resize_|set_|alias|select|slice|unsqueeze|squeeze|flatten)$"
)


def category(name: str) -> str:
    if not name.startswith("aten::") and not name.startswith("mkldnn"):
        return "copy_other"  # a Python-level range's own time (the framework around the ops)
    if _CONV.search(name):
        return "convolution"
    if _MATMUL.match(name):
        return "matmul"
    if _COPY.match(name):
        return "copy_other"
    return "batchnorm_elementwise"


def _phase(event: Any) -> str:
    parent, phase = event.cpu_parent, "forward"
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        if parent.name.startswith("autograd::engine::evaluate_function"):
            phase = "backward"
        parent = parent.cpu_parent
    return phase


def summarize(step: Callable[[], Any], steps: int = 5, top: int = 15) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step``; self CPU time per category, per phase, top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    shares = dict.fromkeys(CATEGORIES, 0.0)
    phases = {p: dict.fromkeys(CATEGORIES, 0.0) for p in PHASES}
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in prof.events():
        us = float(e.self_cpu_time_total)
        if us <= 0:
            continue
        ph = _phase(e)
        cat = "optimizer" if ph == "optimizer" else category(e.name)
        shares[cat] += us
        phases[ph][cat] += us
        per_op[e.name] += us
    total = sum(shares.values())
    return {
        "steps": steps,
        "cpu_time_ms_per_step": total / 1e3 / steps,
        "category_share": {k: (v / total if total else None) for k, v in shares.items()},
        "category_ms_per_step": {k: v / 1e3 / steps for k, v in shares.items()},
        "phase_category_ms_per_step": {
            p: {k: v / 1e3 / steps for k, v in cats.items()} for p, cats in phases.items()
        },
        "top_ops": [
            {"op": name, "category": category(name), "time_ms_per_step": us / 1e3 / steps}
            for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
        ],
    }
