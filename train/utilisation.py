"""How well a run uses its chips: FLOPs per train step, TFLOP/s per chip and MFU.

The FLOPs of a step are the compiled step's own count (XLA's ``cost_analysis``), per device:
under jit over a mesh the compiled program is one device's share, under pmap one replica's.
XLA counts the body of a loop once, whatever its trip count, so a gradient-accumulation step
(``train/accum.py``: a ``lax.scan`` over k micro-batches) is scaled by the share of the step's
multiply-accumulates that its loops repeat, counted on the step's jaxpr (:func:`count_macs`).

MFU divides the achieved FLOP/s per chip by the chip's dense bfloat16 peak (``PEAK_TFLOPS``, keyed
on ``jax.devices()[0].device_kind``) or ``config.peak_tflops``; with neither (a CPU), the run
logs no MFU rather than a made-up one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Dense (no sparsity) bfloat16 peak TFLOP/s per chip, matched against ``device_kind`` in order
# (first substring wins, case-insensitive). Sources: Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: 275, 197, 459, 918 bf16 TFLOP/s per chip);
# NVIDIA's H100, H200 and A100 data sheets (bf16 tensor core, dense: H100 SXM and H200 989,
# H100 PCIe 756, H100 NVL 835, A100 312). JAX names v5e "TPU v5 lite" and v6e "TPU v6 lite".
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),  # v5p's other name
    ("tpu v4", 275.0),
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM
    ("a100", 312.0),
)


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """``override`` when positive, else the table's peak for ``device_kind``; None if unknown."""
    if override > 0:
        return float(override)
    kind = device_kind.lower()
    for key, peak in PEAK_TFLOPS:
        if key in kind:
            return peak
    return None


def _jaxpr_types() -> tuple[type, type]:
    try:
        from jax.extend.core import ClosedJaxpr, Jaxpr
    except ImportError:  # older JAX
        from jax.core import ClosedJaxpr, Jaxpr
    return ClosedJaxpr, Jaxpr


def count_macs(jaxpr: Any, trip_counts: bool = False) -> int:
    """Multiply-accumulates of every convolution and dot product in ``jaxpr`` (recursively).

    A convolution costs (output elements) x (kernel window x input channels per group); a
    ``dot_general`` costs (output elements) x (contracted size). Everything else is ignored. A
    ``cond`` counts its costliest branch, the one of them that runs at most.
    ``trip_counts``: a ``scan`` body counts ``length`` times, as it runs; otherwise as XLA's cost
    analysis counts it: once per copy in the loop's body, ``unroll`` copies (all ``length`` when
    the scan is fully unrolled, as ``train/accum.py`` does on a CPU, so there is no loop).
    """
    closed_t, jaxpr_t = _jaxpr_types()
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
            window = int(np.prod([rhs[i] for i in rhs_spec[2:]], dtype=np.int64))
            total += int(np.prod(out, dtype=np.int64)) * window * int(rhs[rhs_spec[1]])
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            k = int(np.prod([lhs[i] for i in contract], dtype=np.int64))
            total += int(np.prod(out, dtype=np.int64)) * k
        if name == "cond":
            # One branch runs (jax.lax.platform_dependent's, one per platform, among them).
            total += max(count_macs(b.jaxpr, trip_counts) for b in eqn.params["branches"])
            continue
        repeat = 1
        if name == "scan":
            length, unroll = int(eqn.params["length"]), eqn.params.get("unroll", 1)
            repeat = length if (trip_counts or unroll is True) else min(max(int(unroll), 1), length)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, closed_t):
                    total += repeat * count_macs(sub.jaxpr, trip_counts)
                elif isinstance(sub, jaxpr_t):
                    total += repeat * count_macs(sub, trip_counts)
    return total


def loop_factor(fn: Any, *args: Any) -> float:
    """How many times more multiply-accumulates ``fn(*args)`` runs than XLA counts: its MACs with
    each ``scan`` body counted ``length`` times over its MACs with each counted once (1.0 without
    loops). Traces ``fn``; compiles nothing."""
    import jax

    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    once = count_macs(jaxpr)
    return count_macs(jaxpr, trip_counts=True) / once if once else 1.0


def compiled_flops(compiled: Any) -> float | None:
    """``flops`` of XLA's cost analysis of a compiled executable (per device), when the backend
    gives one (an executable loaded from a file may not)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not implemented on every backend / version
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def rates(
    images_per_sec: float, batch_size: int, num_devices: int, flops_per_step: float | None, peak: float | None
) -> dict[str, float]:
    """The per-chip figures of one log window: ``images_per_sec_per_chip``, and with the step's
    FLOPs per device ``tflops_per_chip``, and with a peak ``mfu`` (a fraction, not a percentage)."""
    out = {"images_per_sec_per_chip": images_per_sec / num_devices}
    if flops_per_step:
        tflops = flops_per_step * images_per_sec / batch_size / 1e12
        out["tflops_per_chip"] = tflops
        if peak:
            out["mfu"] = tflops / peak
    return out
