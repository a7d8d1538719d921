"""Paths of a run that may be local or in Cloud Storage (``gs://bucket/run``).

Everything the training program reads or writes goes through ``etils.epath``, which orbax uses
too: on a TPU VM the workdir is a bucket (the local disk is small, lost on preemption and not
shared by the hosts). Local paths are made absolute, so that a run's summary names where it is.
"""

from __future__ import annotations

import os

from etils import epath

Path = epath.Path


def is_remote(path: str | os.PathLike) -> bool:
    """A URL such as ``gs://bucket/run`` (as opposed to a path on this machine's disk)."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """``gs://...`` as given (without a trailing ``/``); a local path made absolute."""
    path = os.fspath(path)
    if is_remote(path):
        return str(epath.Path(path))
    return os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    return str(epath.Path(base).joinpath(*parts))
