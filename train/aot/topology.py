"""TPU generations (HBM per chip, axes, megacore), the slice names users type, and libtpu's
compile-only devices for a slice."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import jax

GIB = 1024**3
INSTALL_HINT = 'pip install -e ".[tpu]"'

# ----------------------------------------------------------------------------------------------
# TPU generations and topology names.


@dataclasses.dataclass(frozen=True)
class Generation:
    """What train.aot needs to know about one TPU generation."""

    libtpu_name: str  # the prefix libtpu's topology names use
    hbm_gib: float  # HBM per chip
    dims: int  # 2 (v2, v3, v5e, v6e) or 3 (v4, v5p): the torus the chips form
    cores_in_name: bool  # accelerator types count TensorCores (2 per chip), not chips
    megacore: bool  # the chip's two cores are one JAX device (chip_config_name='megacore')
    devices_per_chip: int  # JAX devices per chip: 2 where each of two cores is one (v2, v3)
    max_host_chips: int  # the most chips one host holds (a slice up to this is one host)


# Per-chip HBM from Cloud TPU's system architecture pages. v2 and v3 chips have two cores that
# JAX sees as two devices, each with half the chip's HBM.
GENERATIONS = {
    "v2": Generation("v2", 16, 2, True, False, 2, 4),
    "v3": Generation("v3", 32, 2, True, False, 2, 4),
    "v4": Generation("v4", 32, 3, True, True, 1, 4),
    "v5e": Generation("v5e", 16, 2, False, False, 1, 8),
    "v5p": Generation("v5p", 95, 3, True, True, 1, 4),
    "v6e": Generation("v6e", 32, 2, False, False, 1, 8),
}
# `--topology=cpu`: this machine's CPU devices, the memory being the host's. Not a TPU: it is
# there to test `--save` and its reuse by `python -m train` where there is no TPU.
CPU = Generation(
    "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1, False, False, 1, 1 << 30
)
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6lite": "v6e"}
HOST_BOUNDS = (2, 2, 1)  # chips per host on multi-host slices

ACCEPTED_FORMS = (
    "an accelerator type (v4-8, v5p-128, v5litepod-8 or v5e-8, v6e-8, v2-8, v3-32: the number "
    "counts cores on v2/v3/v4/v5p and chips on v5e/v6e) or a topology (v5e:2x2, v6e:2x4, "
    "v4:2x2x1, v5p:4x4x4; chips along each axis), or cpu (this machine's CPU devices, to test --save)"
)


class AotError(ValueError):
    """train.aot cannot do what was asked; the message says why and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice (or ``num_slices`` identical slices) as libtpu's topology description wants it."""

    name: str  # as the user typed it
    generation: str  # key of GENERATIONS
    shape: tuple[int, ...]  # chips along each axis of one slice
    num_slices: int = 1

    @property
    def gen(self) -> Generation:
        return CPU if self.generation == "cpu" else GENERATIONS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def topology(self) -> str:
        return f"{self.gen.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, ...]:
        shape3 = (*self.shape, 1) if len(self.shape) == 2 else self.shape
        if math.prod(self.shape) <= self.gen.max_host_chips:
            return shape3  # one host, e.g. v5litepod-8 and v6e-8 (8 chips), v4-8 (4 chips)
        return tuple(min(b, s) for b, s in zip(HOST_BOUNDS, shape3))

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host_bounds)

    @property
    def hbm_per_device(self) -> float:
        """Bytes of HBM per JAX device: a chip, or one core of a v2/v3 chip (CPU devices share
        the host's memory)."""
        if self.generation == "cpu":
            return self.gen.hbm_gib * GIB / self.chips
        return self.gen.hbm_gib * GIB / self.gen.devices_per_chip

    @property
    def device_word(self) -> str:
        if self.generation == "cpu":
            return "device"
        return "chip" if self.gen.devices_per_chip == 1 else "core"


def _doubling_shape(start: Sequence[int], chips: int) -> tuple[int, ...] | None:
    """Cloud TPU's default slice shapes: from the smallest, double the last of the shortest axes."""
    shape = list(start)
    while math.prod(shape) < chips:
        shortest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == shortest)
        shape[last] *= 2
    return tuple(shape) if math.prod(shape) == chips else None


def parse_topology(name: str, num_slices: int = 1) -> Slice:
    """``v5e:2x2``, ``v5p:4x4x4``, ``v4-8``, ``v5litepod-16``, ... -> a :class:`Slice`."""
    if num_slices < 1:
        raise AotError(f"--num_slices must be >= 1; got {num_slices}.")
    text = name.strip().lower()
    if text == "cpu":
        if num_slices != 1:
            raise AotError("--topology=cpu is this machine's CPU devices: --num_slices must be 1.")
        return Slice(name, "cpu", (len(jax.devices("cpu")),))
    unknown = AotError(f"unknown --topology {name!r}; use {ACCEPTED_FORMS}.")
    match = re.fullmatch(r"([a-z0-9]+)(?:[:=]((?:\d+x)+\d+)|-(\d+))", text)
    if not match:
        raise unknown
    generation = ALIASES.get(match.group(1), match.group(1))
    if generation not in GENERATIONS:
        raise unknown
    gen = GENERATIONS[generation]
    if match.group(2):
        shape = tuple(int(s) for s in match.group(2).split("x"))
        if len(shape) != gen.dims or min(shape) < 1:
            example = "v4:2x2x1" if gen.dims == 3 else "v5e:2x2"
            raise AotError(
                f"--topology {name!r}: a {generation} topology has {gen.dims} axes (e.g. {example})."
            )
        return Slice(name, generation, shape, num_slices)
    count = int(match.group(3))
    chips = count // 2 if gen.cores_in_name else count
    if gen.cores_in_name and count % 2:
        raise unknown
    if generation in ("v5e", "v6e") and chips == 1:
        return Slice(name, generation, (1, 1), num_slices)
    start = (2, 2, 1) if gen.dims == 3 else (2, 2)
    shape = _doubling_shape(start, chips) if chips >= 4 else None
    if shape is None:
        raise AotError(
            f"--topology {name!r}: no standard {generation} slice has {chips} chips; give the "
            f"topology itself, e.g. {gen.libtpu_name}:{'x'.join(['2'] * gen.dims)}."
        )
    return Slice(name, generation, shape, num_slices)


def libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise AotError(f"train.aot needs libtpu (the TPU compiler); install it with: {INSTALL_HINT}")


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[Any]:
    """Send the process's stderr (file descriptor 2) to a scratch file: libtpu's C++ start-up
    warns about the TPU VM metadata it cannot find, which is noise when compiling on a CPU.
    Its errors still reach the caller, as the exception."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(slice_: Slice) -> list[Any]:
    """The compile-only devices of ``slice_`` (libtpu's topology description; no TPU needed), or
    this machine's CPU devices for ``--topology=cpu``."""
    if slice_.generation == "cpu":
        return jax.devices("cpu")
    require_libtpu()
    from jax.experimental import topologies

    # libtpu otherwise takes /tmp/libtpu_lockfile, and a second compile (or a TPU job on this
    # machine) could not start; nothing here opens a TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = {"chips_per_host_bounds": slice_.chips_per_host_bounds}
    if slice_.gen.megacore:
        kwargs["chip_config_name"] = "megacore"
    if slice_.num_slices > 1:
        kwargs["num_slices"] = slice_.num_slices
    try:
        with _stderr_to_file():
            desc = topologies.get_topology_desc(slice_.topology, "tpu", **kwargs)
    except Exception as e:  # libtpu's errors (a JaxRuntimeError) name the problem in one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(f"libtpu cannot build topology {slice_.topology!r}: {message}") from None
    return list(desc.devices)
