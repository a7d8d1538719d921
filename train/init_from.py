"""Starting a run from weights made elsewhere: ``config.init_from`` is a PyTorch state_dict file
(``.pth``/``.pt``/``.safetensors``), a pretrained name (``resnet_jax.pretrained.list_pretrained()``,
e.g. ``resnet50.tv2_in1k``) or another run's workdir (its newest checkpoint: its EMA weights when it
kept an EMA and ``config.init_from_ema`` is on, as timm's ``load_checkpoint(use_ema=True)`` prefers
them; else its trained weights).

Every tensor is loaded exactly, except a classifier (``fc``) whose class count differs from the
dataset's: that one keeps this run's fresh initialisation, and the log says so (fine-tuning on new
classes). Only a fresh run imports weights; a resumed run restores its own checkpoint instead.
``config.init_from_torch`` is the older name of the same field, for PyTorch files.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np

from train import paths, steps
from train.config import ConfigError


def import_weights(
    source: str,
    model: Any,
    host_state: steps.TrainState,
    arch: str = "",
    field: str = "init_from",
    new_head: bool = False,
    ema: bool = True,
) -> tuple[steps.TrainState, str]:
    """``host_state`` with the weights of ``source``; and one line saying what was loaded.

    Args:
        source: A PyTorch state_dict file, a pretrained name, or another run's workdir (local or
            ``gs://``; its newest checkpoint).
        model: The run's Linen model, which the weights must fit.
        host_state: The freshly initialised state, on the host; its optimizer state is kept,
            and its ``fc`` where the source's does not fit (see ``new_head``).
        arch: ``config.model.arch``, checked against a pretrained name's architecture; ``''``
            skips the check.
        field: The config field that named ``source``, for error messages.
        new_head: Keep the fresh ``fc`` even when the source's has the same class count.
        ema: A workdir's EMA weights when it has them; False: its trained weights.

    Returns:
        ``(state, note)``: the state with float32 parameters and BatchNorm statistics, and the
        line to log.

    Raises:
        ConfigError: ``source`` is none of the three, or its weights do not fit ``model``.
    """
    fresh = {"params": host_state.params, "batch_stats": host_state.batch_stats}
    what = ""
    if paths.Path(source).is_dir():  # a local or gs:// workdir
        from train import checkpoint

        try:
            variables, _, used_ema = checkpoint.restore_weights(source, ema=None if ema else False)
        except FileNotFoundError as e:
            raise ConfigError(f"config.{field}={source!r}: {e}") from None
        what = " (its EMA weights)" if used_ema else ""
    elif os.path.isfile(source):
        variables = _from_torch_file(source, model, field)
    else:
        variables = _from_pretrained(source, model, arch, field)
    variables, head_note = _fit_head(variables, fresh, source, new_head)
    _check_fits(variables, fresh, source, model, field)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), variables["params"])
    batch_stats = jax.tree.map(lambda x: np.asarray(x, np.float32), variables.get("batch_stats", {}))
    note = f"Initialised from {source}{what}: every tensor loaded exactly" + (
        f"; {head_note}" if head_note else "."
    )
    state = host_state.replace(params=params, batch_stats=batch_stats)
    if state.ema is not None:  # this run's EMA starts from the imported weights, as the references'
        state = state.replace(ema=jax.tree.map(np.copy, {"params": params, "batch_stats": batch_stats}))
    return state, note


def init_from_torch(path: str, model: Any, host_state: steps.TrainState) -> steps.TrainState:
    """``host_state`` with params and BatchNorm statistics from a PyTorch state_dict file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config.init_from_torch={path!r}: no such file.")
    return import_weights(path, model, host_state, field="init_from_torch")[0]


def _from_torch_file(path: str, model: Any, field: str) -> dict[str, Any]:
    from resnet_jax.convert import StateDictMismatchError, load_torch_checkpoint, torch_to_flax

    try:
        state_dict = load_torch_checkpoint(path)
        classes = _classes_in(state_dict)
        if classes is not None and getattr(model, "num_classes", None) not in (None, classes):
            model = model.clone(num_classes=classes)  # convert its head as it is; _fit_head decides
        return torch_to_flax(state_dict, model)
    except StateDictMismatchError as e:
        raise ConfigError(_mismatch_message(e, path, model, field)) from None
    except Exception as e:  # unreadable, not a state_dict, a pickle with code, ...
        raise ConfigError(f"config.{field}={path!r} cannot be read: {str(e).splitlines()[0]}") from None


def _classes_in(state_dict: Any) -> int | None:
    for key, value in state_dict.items():  # ResNet's fc (linear), or ResNetV2's head.fc (1x1 conv)
        if key in ("fc.weight", "head.fc.weight") and len(np.shape(value)) in (2, 4):
            return int(np.shape(value)[0])
    return None


def _from_pretrained(name: str, model: Any, arch: str, field: str) -> dict[str, Any]:
    from resnet_jax import pretrained

    try:
        entry = pretrained.info(name)
    except KeyError as e:
        raise ConfigError(
            f"config.{field}={name!r} is not a file, a run's workdir or a pretrained name "
            f"({str(e).strip(chr(39))})."
        ) from None
    if arch and entry.arch != arch:
        raise ConfigError(
            f"config.{field}={name!r} holds {entry.arch} weights but config.model.arch={arch!r}; "
            f"set --config.model.arch={entry.arch}."
        )
    try:
        path, _ = pretrained.locate(entry)
    except Exception as e:  # offline and not cached, or a file that fails its hash check
        # The library's advice is its Python API's (path=); here the file goes in the config.
        said, n = re.subn(r"\s*\(?or pass path=[^)]*\)?\.?$", "", str(e).strip())
        if n or isinstance(e, pretrained.WeightsNotFoundError):
            said = f"{said.rstrip('.')}; or download it anywhere and set --config.{field}=FILE."
        raise ConfigError(f"config.{field}={name!r}: {said}") from None
    return _from_torch_file(str(path), model, field)


def _fit_head(
    variables: dict[str, Any], fresh: dict[str, Any], source: str, new_head: bool
) -> tuple[dict[str, Any], str]:
    """Keep the fresh classifier when the loaded one has another class count (or ``new_head``)."""
    name = "head" if "head" in fresh["params"] else "fc"  # ResNetV2's head.fc, or ResNet's fc
    theirs, ours = variables["params"].get(name), fresh["params"].get(name)
    if theirs is None or ours is None:
        return variables, ""
    if not new_head and jax.tree.map(np.shape, theirs) == jax.tree.map(np.shape, ours):
        return variables, ""
    variables = {**variables, "params": {**variables["params"], name: ours}}
    theirs, ours = theirs.get("fc", theirs), ours.get("fc", ours)
    note = (
        f"the classifier (fc) is freshly initialised: {np.shape(theirs['kernel'])[-1]} classes in "
        f"{source}, {np.shape(ours['kernel'])[-1]} in this dataset"
        + (" (config.new_head)." if new_head else ".")
    )
    return variables, note


def _check_fits(
    variables: dict[str, Any], fresh: dict[str, Any], source: str, model: Any, field: str
) -> None:
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    want = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(fresh)}
    if got == want:
        return
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    problems = [
        f"{title} ({len(items)}), e.g. {items[0]}"
        + (f": {got[items[0]]} vs {want[items[0]]}" if title == "wrong shapes" else "")
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
        if items
    ]
    raise ConfigError(
        f"config.{field}={source!r} does not fit config.model ({type(model).__name__}): "
        f"{'; '.join(problems)}. Set config.model (arch, overrides) to the architecture the "
        f"weights were saved from."
    )


def _mismatch_message(e: Any, path: str, model: Any, field: str) -> str:
    # The library's error lists every key; one line with counts, an example and its hint is enough.
    kinds = (("missing keys", e.missing), ("unexpected keys", e.unexpected), ("wrong shapes", e.wrong_shapes))
    problems = "; ".join(f"{title} ({len(items)}), e.g. {items[0]}" for title, items in kinds if items)
    hint = f" The state_dict looks like {e.looks_like}." if e.looks_like else ""
    return (
        f"config.{field}={path!r} does not fit config.model ({type(model).__name__}): "
        f"{problems or e.message.rstrip('.')}.{hint} Set config.model (arch, overrides) to the architecture "
        f"the state_dict was saved from."
    )
