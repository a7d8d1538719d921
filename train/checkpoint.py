"""Checkpoints with orbax-checkpoint: ``WORKDIR/checkpoints/<step>/{state,meta}``.

``Checkpointer`` wraps an orbax ``CheckpointManager`` (keep the last N, atomic step
directories). The saved ``state`` item is the ``TrainState`` as a nested dict of numpy arrays
(``flax.serialization.to_state_dict``), so it can be read back without knowing the optimizer:
``restore_variables(workdir)`` gives ``{'params', 'batch_stats'}`` for inference and export (with
``ema=True`` those of the EMA, ``train/ema.py``, saved as the state's ``ema``).
``meta`` is a small JSON object (step, epoch, batch size, seed, ...) describing where training
stood, for resuming the input stream at the same place.

Every process of a multi-host run calls ``save``/``restore`` (orbax coordinates them; the
replicated arrays are written once). The workdir may be a ``gs://`` bucket path (orbax writes
through tensorstore and etils.epath).
"""

from __future__ import annotations

import posixpath
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from train import paths

CHECKPOINT_SUBDIR = "checkpoints"
# Unreadable checkpoints are moved here (kept for inspection, out of orbax's step list). Nothing
# in it is ever deleted or overwritten: a step moved twice gets a new name (``7.2``, ``7.3``, ...).
DAMAGED_SUBDIR = "checkpoints_damaged"


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose arrays are not those of the state this config builds (saved
    with another model, dtype or optimizer): not damage, so it is never moved aside."""


def checkpoint_dir(workdir: str) -> str:
    return paths.join(paths.resolve(workdir), CHECKPOINT_SUBDIR)


def _state_dict(host_state: Any) -> dict[str, Any]:
    sd = serialization.to_state_dict(host_state)
    # orbax cannot store a None leaf; an absent loss scale is restored from the template.
    return {k: v for k, v in sd.items() if v is not None}


class Checkpointer:
    """Periodic and final saves, keep-last-N, and restore of the newest readable step."""

    def __init__(self, workdir: str, max_to_keep: int = 3, *, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        self.damaged_directory = paths.join(paths.resolve(workdir), DAMAGED_SUBDIR)
        # (step, reason) of checkpoints that ``restore`` found unreadable and moved aside.
        self.damaged: list[tuple[int, str]] = []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep > 0 else None,
            # Not orbax's read_only mode: it only adds warnings; reading never writes anyway.
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, host_state: Any, meta: Mapping[str, Any]) -> None:
        """Save ``host_state`` (numpy pytree, e.g. a driver's ``to_host(state)``) at ``step``."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_dict(host_state)),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
        )

    def restore_raw(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The saved state dict (numpy leaves) and meta of ``step``."""
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
        state = jax.tree.map(np.asarray, restored.state)
        return state, dict(restored.meta or {})

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """Restore into the structure of ``template`` (arrays or ``jax.ShapeDtypeStruct``).

        With ``step=None`` the newest step is tried first and, if it cannot be read, the ones
        before it. Returns ``(numpy state, meta)`` or ``None`` when there is no checkpoint.
        """
        candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if step is not None and step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}."
            )
        for candidate in candidates:
            try:
                raw, meta = self.restore_raw(candidate)
            except Exception as e:
                if step is not None:
                    raise
                self._set_aside(candidate, e)
                continue
            differences = state_differences(raw, template)
            if differences:
                raise CheckpointMismatchError(
                    f"checkpoint {candidate} in {self.directory} holds another state than this config "
                    f"builds ({'; '.join(differences)})."
                )
            try:
                target = serialization.to_state_dict(template)
                for key, value in target.items():
                    raw.setdefault(key, value)
                restored = serialization.from_state_dict(template, raw)
                _check_finite(restored, candidate)
                return restored, meta
            except Exception as e:
                if step is not None:
                    raise
                self._set_aside(candidate, e)
        return None

    def _set_aside(self, step: int, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        logging.warning(
            "checkpoint %d in %s is unreadable (%s); trying the previous one.", step, self.directory, reason
        )
        self._move_aside(step)
        self.damaged.append((step, reason))

    def _move_aside(self, step: int) -> None:
        # Out of the step list, so that the resumed run saves this step afresh instead of
        # skipping it as already present, and no later resume trips over it again.
        if jax.process_index() == 0:
            _move_tree(paths.Path(self.directory) / str(step), paths.Path(self.damaged_directory) / str(step))
        if jax.process_count() > 1:
            from orbax.checkpoint import multihost

            multihost.get_jax_distributed_client().wait_at_barrier(f"resnet_jax_damaged_{step}", 600_000)
        self._manager.reload()

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def mismatch(workdir: str, template: Any, step: int | None = None) -> tuple[int, list[str]] | None:
    """``(step, differences)`` when the checkpoint a restore would use (``step``, else the
    newest) holds other arrays than ``template`` (see ``state_differences``), else None.

    Reads only the saved tree's metadata (names, shapes, dtypes) and writes nothing, so a run can
    refuse before it touches its workdir. No ``CheckpointManager``: nothing here is a collective,
    so each process of a multi-host run may call it alone. Steps whose metadata cannot be read
    are skipped (``Checkpointer.restore`` treats them as damaged); the first readable one decides.
    """
    directory = paths.Path(checkpoint_dir(workdir))
    if not directory.is_dir():
        return None
    steps = ocp.utils.checkpoint_steps(directory)  # finalized steps only
    candidates = [step] if step in steps else sorted(steps, reverse=True)
    for candidate in candidates:
        try:
            saved = ocp.StandardCheckpointHandler().metadata(directory / str(candidate) / "state")
        except Exception:
            continue
        differences = state_differences(getattr(saved, "tree", saved), template)
        return (candidate, differences) if differences else None
    return None


def _free_name(dst: Any) -> Any:
    """``dst``, or ``dst.2``, ``dst.3``, ... : the first name not taken (nothing is replaced)."""
    n = 1
    while True:
        candidate = dst if n == 1 else dst.parent / f"{dst.name}.{n}"
        if not candidate.exists():
            return candidate
        n += 1


def _move_tree(src: Any, dst: Any) -> None:
    """Move the directory ``src`` to ``dst``, or to a free name beside it when ``dst`` exists:
    one rename on a local disk; in a bucket, where a directory is a name prefix, a copy of each
    object, then the deletion."""
    if not src.is_dir():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst = _free_name(dst)
    if not paths.is_remote(src):
        shutil.move(src, dst)
        return
    top = _without_scheme(src)
    for root, _, files in src.walk():
        # Backends differ in whether the roots they yield keep the gs:// prefix.
        relative = posixpath.relpath(_without_scheme(root), top)
        for name in files:
            target = dst / relative / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (src / relative / name).copy(target, overwrite=True)
    # First the marker orbax reads as "finished" in a bucket: if the deletion is cut short, the
    # rest is an unfinished step that orbax ignores, not a damaged one that looks finished.
    marker = src / "commit_success.txt"
    if marker.exists():
        marker.unlink()
    src.rmtree()


def _leaf_specs(tree: Any, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    """``{'params/conv1/kernel': (shape, dtype name)}`` of a nested dict of arrays, array
    metadata or ``jax.ShapeDtypeStruct``; empty containers and None leaves have no entry."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        if tree is None:
            return {}
        dtype = tree.dtype if hasattr(tree, "dtype") else np.asarray(tree).dtype
        return {prefix: (tuple(np.shape(tree)), np.dtype(dtype).name)}
    specs = {}
    for key, value in items:
        specs.update(_leaf_specs(value, f"{prefix}/{key}" if prefix else str(key)))
    return specs


def state_differences(saved: Any, template: Any, limit: int = 3) -> list[str]:
    """How the arrays of a saved state dict differ from ``template`` (a state, or its
    ``jax.eval_shape``): up to ``limit`` lines such as ``params/layer1_1 is not in the
    checkpoint`` or ``params/fc/kernel is (128, 10) there, (128, 3) here``; [] when they fit.

    A part of the state that the checkpoint lacks altogether (a loss scale, say) is not a
    difference: ``restore`` takes it from the template. The EMA is: a fresh one in its place
    would silently restart the average."""
    have = _leaf_specs(saved)
    want = {k: v for k, v in _leaf_specs(_state_dict(template)).items() if k.split("/")[0] in saved}
    lines = []
    if EMA_KEY in _state_dict(template) and EMA_KEY not in saved:
        lines.append(f"{EMA_KEY} is not in the checkpoint")
    for path in sorted(have.keys() | want.keys(), key=lambda p: (not p.startswith("params/"), p)):
        if path not in have or path not in want:
            missing = path not in have
            # Name the smallest differing subtree once (params/layer1_1, not each of its arrays).
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                head = "/".join(parts[:depth])
                other = have if missing else want  # the side that lacks it
                if not any(k == head or k.startswith(head + "/") for k in other):
                    break
            line = f"{head} is {'not in the checkpoint' if missing else 'in the checkpoint only'}"
        elif have[path] != want[path]:
            (s1, d1), (s2, d2) = have[path], want[path]
            there, here = (s1, s2) if s1 != s2 else (d1, d2)
            line = f"{path} is {there} there, {here} here"
        else:
            continue
        if line not in lines:
            lines.append(line)
    return lines[:limit] + ([f"{len(lines) - limit} more"] if len(lines) > limit else [])


def _without_scheme(path: Any) -> str:
    return str(path).split("://", 1)[-1].strip("/")


def _check_finite(state: Any, step: int) -> None:
    for leaf in jax.tree.leaves(state):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            raise ValueError(f"checkpoint {step} holds NaN or Inf")


EMA_KEY = "ema"  # the TrainState's field holding the EMA's {'params', 'batch_stats'}


class Weights(NamedTuple):
    """A checkpoint's weights for inference: ``variables`` (``{'params', 'batch_stats'}``), the
    ``step`` they were saved at, and whether they are the EMA's."""

    variables: dict[str, Any]
    step: int
    ema: bool


def restore_weights(workdir: str, step: int | None = None, *, ema: bool | None = False) -> Weights:
    """The weights of the latest or the given checkpoint: the trained ones (``ema=False``), the
    EMA's (``ema=True``; ``ValueError`` when the run kept none), or the EMA's when it has them
    (``ema=None``)."""
    state, step = _restore_state(workdir, step)
    saved = state.get(EMA_KEY)
    if ema and saved is None:
        raise ValueError(
            f"checkpoint {step} in {checkpoint_dir(workdir)} holds no EMA weights (its run had "
            f"config.ema_decay=0)."
        )
    if saved is not None and ema is not False:
        state = saved
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    return Weights(variables, step, saved is not None and ema is not False)


def restore_variables(workdir: str, step: int | None = None, *, ema: bool | None = False) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` (numpy trees) of the latest or the given checkpoint: the
    trained weights, or with ``ema`` the EMA's (see ``restore_weights``).

    Ready for ``model.apply(variables, x, train=False)``.
    """
    return restore_weights(workdir, step, ema=ema).variables


def _restore_state(workdir: str, step: int | None) -> tuple[dict[str, Any], int]:
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if not paths.Path(ckpt.directory).is_dir() or not ckpt.all_steps():
            raise FileNotFoundError(f"no checkpoints in {ckpt.directory}.")
        step = ckpt.latest_step() if step is None else step
        if step not in ckpt.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {ckpt.directory}; have {ckpt.all_steps()}."
            )
        state, _ = ckpt.restore_raw(step)
    finally:
        ckpt.close()
    return state, step
