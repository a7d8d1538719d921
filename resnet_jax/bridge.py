"""Linen <-> NNX: the model with the same fields in the other API, and the same arrays under the
other API's paths.

Both APIs build from the same definitions (``networks.py``, ``blocks.py``), so a Linen
``ResNet``/``ResNetBase`` and the NNX model with the same fields hold the same variables: Linen keys them
``('params'|'batch_stats', *linen_path)`` (``layer1_0/conv1/kernel``), NNX by PyTorch path and
variable type (``layer1[0].conv1.kernel``, an ``nnx.Param``). Conversion is exact both ways.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.layout import nnx_to_linen, nnx_variables
from resnet_jax.mismatch import StateDictMismatchError, compare, describe
from resnet_jax.nnx import from_linen, to_linen

__all__ = ["from_linen", "linen_to_nnx", "nnx_to_linen", "to_linen"]

Variables = dict[str, Any]


def linen_to_nnx(variables: Mapping[str, Any], model: Any) -> Any:
    """Load Linen ``{'params', 'batch_stats'}`` into the NNX ``model`` in place (and return it).

    Exact: values are stored as given (no dtype cast). Raises :class:`StateDictMismatchError`
    listing every missing, unexpected and misshapen key; nothing is written then. ``model`` may
    come from ``nnx.eval_shape`` (then every variable becomes a real array).
    """
    targets = nnx_variables(model)
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats") if k in variables})
    expected = {k: tuple(v.get_value().shape) for k, v in targets.items()}
    missing, unexpected, wrong = compare({k: tuple(np.shape(v)) for k, v in flat.items()}, expected, "/".join)
    if missing or unexpected or wrong:
        target = describe(model, prefix="NNX ")
        raise StateDictMismatchError(
            f"Linen variables do not match {target}:",
            target=target,
            missing=missing,
            unexpected=unexpected,
            wrong_shapes=wrong,
        )
    for key, var in targets.items():
        var.set_value(jnp.asarray(flat[key]))
    return model
