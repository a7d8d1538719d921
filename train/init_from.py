"""Starting a run from weights saved elsewhere: ``config.init_from_torch`` (a PyTorch state_dict
file). Only a fresh run imports them; a resumed run restores its own checkpoint instead."""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np

from train import steps
from train.config import ConfigError

_MISMATCH_KINDS = ("missing keys", "unexpected keys", "wrong shapes")


def init_from_torch(path: str, model: Any, host_state: steps.TrainState) -> steps.TrainState:
    """``host_state`` with params and BatchNorm statistics from a PyTorch state_dict file."""
    from resnet_jax.convert import StateDictMismatchError, load_torch_checkpoint, torch_to_flax

    if not os.path.isfile(path):
        raise ConfigError(f"config.init_from_torch={path!r}: no such file.")
    try:
        variables = torch_to_flax(load_torch_checkpoint(path), model)
    except StateDictMismatchError as e:
        # The library lists every key; one line with counts, an example and its hint is enough.
        lines = [line.strip() for line in str(e).splitlines()[1:]]
        problems = []
        for ln in lines:
            # "wrong shapes (2): conv1.weight: got (7, 7, 3, 64) ..., fc.weight: ..." -> first item
            match = re.match(r"(.+? \(\d+\)): (.+?)(?:, (?=\w+\.[\w.]+[:,])| \.\.\.|$)", ln)
            if match and match.group(1).split(" (")[0] in _MISMATCH_KINDS:
                problems.append(f"{match.group(1)}, e.g. {match.group(2)}")
        hint = next((ln for ln in lines if "looks like" in ln), "")
        hint = hint[hint.index("The state_dict") :] if hint else ""
        raise ConfigError(
            f"config.init_from_torch={path!r} does not fit config.model ({type(model).__name__}): "
            f"{'; '.join(problems)}. {hint} Set config.model (arch, overrides) to the architecture "
            f"the state_dict was saved from; the dataset's class count must match its fc layer."
        ) from None
    except Exception as e:  # unreadable, not a state_dict, a pickle with code, ...
        raise ConfigError(
            f"config.init_from_torch={path!r} cannot be read: {str(e).splitlines()[0]}"
        ) from None
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), variables["params"])
    batch_stats = jax.tree.map(lambda x: np.asarray(x, np.float32), variables.get("batch_stats", {}))
    return host_state.replace(params=params, batch_stats=batch_stats)
