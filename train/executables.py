"""Compiled steps saved by ``python -m train.aot --save FILE``, and their reuse by ``python -m train``.

A saved file holds each step's serialized executable with what it depends on: the JAX, jaxlib
and (on TPU) libtpu versions, ``XLA_FLAGS`` and ``LIBTPU_INIT_ARGS``, the platform, device kind
and device and process counts, and a fingerprint of the step's lowered program. The program
text carries the shapes, dtypes, shardings, donation and every constant the config put in
(learning-rate schedule, label smoothing, ...), so one hash checks them all.

``python -m train --config.aot_executable=FILE`` lowers each step as usual (seconds), and loads
the saved executable instead of compiling only when everything matches. On a mismatch it prints
one line saying what differs and compiles: the program that runs is the same either way, only the
start-up is slower. A missing or unreadable file is a config error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
import sys
from typing import Any

import jax

from train.config import ConfigError

FORMAT = "resnet_jax train.aot executables, version 2"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(platform: str) -> dict[str, Any]:
    """What a compiled executable depends on, beyond its program, for ``platform``."""
    env = {"jax": jax.__version__, "jaxlib": _version("jaxlib"), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if platform == "tpu":
        env["libtpu"] = _version("libtpu")
        env["libtpu_init_args"] = os.environ.get("LIBTPU_INIT_ARGS", "")
    return env


def devices_summary(devices: list[Any]) -> dict[str, Any]:
    """Platform, device kind, device and process counts, and the layout (each device's host
    and, on TPU, its coordinates in the torus and core, in mesh order) of the devices a step
    runs on. The layout pins the slice's shape (2x4 and 4x2 have the same count)."""

    def place(d: Any) -> list[int]:
        coords = getattr(d, "coords", None)
        if coords is None:
            return [d.process_index, d.id]
        return [d.process_index, *coords, getattr(d, "core_on_chip", 0)]

    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "num_processes": len({d.process_index for d in devices}),
        "layout": [place(d) for d in devices],
    }


def fingerprint(lowered: Any) -> str:
    """A hash of a lowered step's program (StableHLO text without source locations)."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def save(path: str, steps: dict[str, tuple[str, Any]], devices: list[Any], **extra: Any) -> None:
    """Write ``{name: (fingerprint, compiled)}`` and what they depend on to ``path`` (may be gs://).

    ``extra`` (the topology, the config) is kept for the reader; the checks do not use it."""
    from etils import epath
    from jax.experimental import serialize_executable

    summary = devices_summary(devices)
    payload = {
        "format": FORMAT,
        "environment": environment(summary["platform"]),
        "devices": summary,
        "steps": {
            name: {
                "fingerprint": program,
                "executable": serialize_executable.serialize(compiled),
            }
            for name, (program, compiled) in steps.items()
            if compiled is not None
        },
        **extra,
    }
    epath.Path(path).write_bytes(pickle.dumps(payload))


def read(path: str) -> dict[str, Any]:
    """The payload of a file written by :func:`save`; ConfigError (one line) if it is not one."""
    from etils import epath

    try:
        payload = pickle.loads(epath.Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"config.aot_executable={path!r} does not exist; write it with python -m train.aot --save, "
            f"or set aot_executable=''."
        ) from None
    except Exception as e:  # truncated, or not a pickle at all
        raise ConfigError(
            f"config.aot_executable={path!r} cannot be read ({type(e).__name__}); write it again with "
            f"python -m train.aot --save."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(
            f"config.aot_executable={path!r} is not a file written by this version of python -m train.aot "
            f"--save; write it again."
        )
    return payload


def mismatch(payload: dict[str, Any], name: str, lowered: Any, devices: list[Any]) -> str | None:
    """Why the saved ``name`` step cannot stand in for ``lowered`` here (None: it can)."""
    if name not in payload["steps"]:
        return f"it holds no {name}"
    here = devices_summary(devices)
    saved_env, env = payload["environment"], environment(here["platform"])
    for what, saved, now in [
        *((key, payload["devices"].get(key), value) for key, value in here.items()),
        *((key, saved_env.get(key), value) for key, value in env.items()),
    ]:
        if saved != now and what == "layout":
            return "it was compiled for another device layout (the slice's shape, or the mesh's order)"
        if saved != now:
            return f"it was compiled for {what}={saved!r}, this run has {now!r}"
    if payload["steps"][name]["fingerprint"] != fingerprint(lowered):
        return (
            f"its {name} is a different program (another config, batch size, model or sharding than this "
            f"run's)"
        )
    return None


def load(payload: dict[str, Any], name: str, lowered: Any, devices: list[Any], path: str) -> Any | None:
    """The saved ``name`` step, loaded onto this process's devices, or None after one line on
    stderr saying why it does not match (the caller then compiles ``lowered``)."""
    from jax.experimental import serialize_executable

    why = mismatch(payload, name, lowered, devices)
    if why is None:
        try:
            return serialize_executable.deserialize_and_load(*payload["steps"][name]["executable"])
        except Exception as e:  # e.g. a runtime that cannot load it despite equal versions
            why = (
                f"loading it failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            )
    print(f"warning: not using {path} for {name}: {why}; compiling instead.", file=sys.stderr, flush=True)
    return None
