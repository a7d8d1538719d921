"""Bounds for float32 results that may differ by rounding alone (not a test module).

Two float32 computations of the same thing (another summation order, another device count,
another compiled program) agree to float32's own error, but that error is not a fixed number: a
ReLU, a max or an argmax that rounding flips moves a result far more than 1e-6, on some machines
and not others. So, as ``python -m resnet_jax.parity`` does, they are bounded by a fixed
tolerance or by twice float32's own error against a float64 twin, whichever is larger, and a
prediction may differ only where the float64 twin's top two logits are within that error.
"""

from __future__ import annotations

import jax
import numpy as np

# ``||a - b|| / ||b||`` in float64, the parity command's measure (re-exported for the tests).
from resnet_jax.parity import rel  # noqa: F401


def float32_bound(floor: float, tol: float = 1e-5) -> float:
    """How far two float32 results may differ: ``tol``, or twice ``floor`` (float32's own error
    there, measured against a float64 twin), whichever is larger."""
    return max(tol, 2 * floor)


def assert_trees_within_float32_error(a, b, twin64, tol: float = 1e-5) -> None:
    """Per leaf: ``rel(a, b) <= float32_bound(rel(a, twin64), tol)``, where ``a`` and ``b`` are
    float32 trees that may differ by rounding only and ``twin64`` is ``a``'s float64 twin."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b, flat_64 = jax.tree.leaves(b), jax.tree.leaves(twin64)
    assert len(flat_a) == len(flat_b) == len(flat_64), "the trees have different leaves"
    for (path, x), y, z in zip(flat_a, flat_b, flat_64):
        floor = rel(x, z)
        err = rel(x, y)
        assert err <= float32_bound(floor, tol), (jax.tree_util.keystr(path), err, floor)


def near_ties(logits64, *logits32, factor: float = 4.0) -> np.ndarray:
    """Examples whose prediction rounding may flip: the float64 twin's top-two margin is within
    ``factor`` times float32's error ``eps`` (the largest ``|logits32 - logits64|`` measured).

    A float32 program within ``e`` of the twin can change the twin's argmax only where the margin
    is below ``2 e``; ``factor=4`` allows a program (the training loop's own eval) twice the error
    measured here."""
    logits64 = np.asarray(logits64, np.float64)
    eps = max(float(np.max(np.abs(np.asarray(x, np.float64) - logits64))) for x in logits32)
    top2 = np.sort(logits64, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) <= factor * eps


def assert_correct_counts_agree(accuracy_a: float, accuracy_b: float, n: int, ambiguous) -> None:
    """Two accuracies over the same ``n`` examples differ by at most the near ties' count."""
    a, b = round(accuracy_a * n), round(accuracy_b * n)
    assert abs(a - b) <= int(np.sum(ambiguous)), (accuracy_a, accuracy_b, int(np.sum(ambiguous)))


def float64_apply(build_model, variables, x):
    """``build_model()`` (a float64 model, built under 64-bit JAX) applied in eval mode to
    ``variables`` and ``x`` widened to float64: the float64 twin of a float32 evaluation."""
    with jax.enable_x64(True):
        model = build_model()
        wide = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
        return np.asarray(model.apply(wide, np.asarray(x, np.float64), train=False))
