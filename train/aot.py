"""Compile a run for a Cloud TPU slice on any machine, before renting the slice.

``python -m train.aot --config=configs/imagenet_resnet50.py --topology=v5e:2x2`` compiles the
run's own train and eval steps (``train.build.build_steps``, wrapped by the same jit driver, mesh,
shardings and donation as ``python -m train``) for the TPU topology that libtpu describes
(``jax.experimental.topologies.get_topology_desc``). Nothing runs and no device memory is
allocated; a CPU is enough. It reports, and writes as JSON with ``--json``:

* memory per chip (arguments, outputs and how much of them alias the donated state, temporaries,
  generated code) against the chip's HBM, and one verdict line, ``fits: 9.1 of 16 GiB per chip``
  or ``does not fit: needs X GiB, the chip has Y``;
* FLOPs per chip and per image (XLA's cost analysis of the per-chip SPMD program), the
  collectives in the compiled HLO (all-reduce, all-gather, reduce-scatter, ...: count and bytes)
  and the compile time;
* with ``--find_max_batch``: the largest per-chip batch that fits, searched over compiles
  (:func:`largest_batch`);
* with ``--save FILE``: the serialized executables, which ``python -m train
  --config.aot_executable=FILE`` loads instead of compiling (``train/executables.py``);
* with ``--topology=cpu``: the same for this machine's CPU devices (no libtpu), to try ``--save``.

The dataset is never read: class count, image channels and training-set size come from
:data:`KNOWN_DATASETS` or, for ``dataset='synthetic'``, from the config's ``synthetic_*`` fields.

Needs libtpu, the TPU compiler: ``pip install -e ".[tpu]"``. JAX itself stays on the CPU backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.sharding import DATA_AXIS, make_data_mesh
from train import executables, input_pipeline, steps
from train.build import Steps, build_steps
from train.config import ConfigError, validate_config

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


# ----------------------------------------------------------------------------------------------
# The dataset's shape, without reading it.


@dataclasses.dataclass(frozen=True)
class KnownDataset:
    num_classes: int
    channels: int
    num_train_examples: int


# TFDS image-classification sets (their `train` split sizes, from the TFDS catalog).
KNOWN_DATASETS = {
    "imagenet2012": KnownDataset(1000, 3, 1_281_167),
    "imagenette": KnownDataset(10, 3, 9_469),
    "cifar10": KnownDataset(10, 3, 50_000),
    "cifar100": KnownDataset(100, 3, 50_000),
    "mnist": KnownDataset(10, 1, 60_000),
    "fashion_mnist": KnownDataset(10, 1, 60_000),
    "svhn_cropped": KnownDataset(10, 3, 73_257),
    "food101": KnownDataset(101, 3, 75_750),
    "oxford_flowers102": KnownDataset(102, 3, 1_020),
    "oxford_iiit_pet": KnownDataset(37, 3, 3_680),
    "stanford_dogs": KnownDataset(120, 3, 12_000),
    input_pipeline.DIGITS: KnownDataset(10, 1, 1_797 - input_pipeline.DIGITS_TEST_SIZE),
}


def dataset_info(config: Any) -> tuple[input_pipeline.DatasetInfo, Any]:
    """``DatasetInfo`` for ``config.dataset`` without reading it, and the batches' image dtype."""
    name = config.dataset
    if name == input_pipeline.SYNTHETIC:
        known = KnownDataset(
            int(config.synthetic_num_classes),
            int(config.synthetic_channels),
            int(config.synthetic_num_examples),
        )
    elif name.split(":")[0].split("/")[0] in KNOWN_DATASETS:
        known = KNOWN_DATASETS[name.split(":")[0].split("/")[0]]
    else:
        raise AotError(
            f"train.aot does not know dataset {name!r} (it reads no data; it knows "
            f"{', '.join(sorted(KNOWN_DATASETS))}). Describe it instead: --config.dataset=synthetic "
            f"--config.synthetic_num_classes=N --config.synthetic_channels=C "
            f"--config.synthetic_num_examples=TRAIN_SIZE (the same step for any uint8 image set)."
        )
    num_classes, image_dtype = known.num_classes, np.uint8
    size = int(config.image_size)
    if name == input_pipeline.DIGITS:
        # scikit-learn's digits are 8x8, normalised float32 on the host, whatever image_size says.
        size, image_dtype = 8, np.float32
        num_classes = len(config.class_subset or ()) or num_classes
    try:
        mean, std = input_pipeline._norm_stats(
            config, known.channels, input_pipeline._default_stats(known.channels)
        )
    except input_pipeline.DatasetError as e:
        raise AotError(str(e)) from None
    info = input_pipeline.DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_shape=(size, size, known.channels),
        num_train_examples=known.num_train_examples,
        num_eval_examples=0,
        class_names=(),  # not needed to compile; a synthetic set may have millions of classes
        mean=mean,
        std=std,
    )
    return info, image_dtype


# ----------------------------------------------------------------------------------------------
# Compiling and reading the compiled program.


@dataclasses.dataclass
class StepReport:
    """What one compiled step costs per device."""

    name: str
    global_batch: int
    compile_s: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    flops_per_device: float = 0.0
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    program: str = ""  # fingerprint of the lowered program (train/executables.py)
    out_of_memory: str = ""  # the compiler's message when it ran out of HBM
    needed_bytes: int = 0  # from that message

    @property
    def total_bytes(self) -> int:
        """Peak HBM of one device: inputs, outputs not written over donated inputs, temporaries
        and the program itself."""
        if self.out_of_memory:
            return self.needed_bytes
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


_COLLECTIVE = re.compile(
    r"=\s*(\([^\n]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4}


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype == "token":
            continue
        bits = _BITS.get(dtype) or int(re.sub(r"[^0-9]", "", dtype) or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{op: {'count': n, 'bytes': b}}`` for the collectives of a compiled HLO module.

    Bytes are the op's result (an async ``-start`` op's result also holds its operands, so
    those are halved: all-reduce's input and output are the same size)."""
    found: dict[str, dict[str, int]] = {}
    for shape, op, start in _COLLECTIVE.findall(hlo_text):
        nbytes = _shape_bytes(shape)
        if start and op in ("all-reduce", "collective-permute") and shape.startswith("("):
            nbytes //= 2
        entry = found.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return found


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


# XLA:TPU's out-of-HBM errors: "Used 20.5G of 15.75G hbm" or "the total memory required for HLO
# temporaries (24.68G) exceeds available HBM (15.75G)".
_OOM_NEEDED = (
    re.compile(r"Used ([0-9.]+)([KMGT]?)\S* of [0-9.]+[KMGT]?\S* hbm", re.IGNORECASE),
    re.compile(r"required for [^(]*\(([0-9.]+)([KMGT]?)\S*\) exceeds available HBM", re.IGNORECASE),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _out_of_memory(message: str) -> tuple[str, int] | None:
    """The compiler's out-of-HBM error (its first line) and the bytes it says the program needs
    (0 when it does not say)."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    needed = 0
    for pattern in _OOM_NEEDED:
        found = pattern.search(message)
        if found:
            needed = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
            break
    lines = message.strip().splitlines() or [message]
    line = next((x for x in lines if "memory" in x.lower()), lines[0])
    return line.strip(), needed


def compile_step(name: str, jitted: Any, args: Sequence[Any], global_batch: int) -> tuple[StepReport, Any]:
    """Lower and compile ``jitted(*args)``; the report, and the compiled step (None when the
    compiler ran out of HBM, which it reports as an error on TPU)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    program = executables.fingerprint(lowered)
    try:
        compiled = lowered.compile()
    except Exception as e:
        oom = _out_of_memory(str(e))
        if oom is None:
            raise
        seconds = time.perf_counter() - t0
        return StepReport(
            name, global_batch, seconds, program=program, out_of_memory=oom[0], needed_bytes=oom[1]
        ), None
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    report = StepReport(
        name,
        global_batch,
        seconds,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops_per_device=float(_cost(compiled).get("flops", 0.0)),
        collectives=collectives(compiled.as_text()),
        program=program,
    )
    return report, compiled


def abstract_inputs(
    parts: Steps,
    mesh: Mesh,
    info: Any,
    image_dtype: Any,
    global_batch: int,
    *,
    eval_batch: bool = False,
    shardings: bool = True,
) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
    """The train state and one batch as ``ShapeDtypeStruct``s with the run's shardings.

    ``shardings=False`` drops them, which on an explicit-axes mesh silently compiles the whole
    global batch on every chip (the check in :func:`check_sharding` exists for this)."""
    replicated = NamedSharding(mesh, P()) if shardings else None
    data = NamedSharding(mesh, P(DATA_AXIS)) if shardings else None
    state = jax.eval_shape(parts.create_state)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch, *info.image_shape), image_dtype, sharding=data),
        "label": jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=data),
    }
    if eval_batch:
        batch["mask"] = jax.ShapeDtypeStruct((global_batch,), np.float32, sharding=data)
    return state, batch


def gradient_bytes(parts: Steps) -> int:
    """Bytes of one gradient at the compute precision (XLA reduces bfloat16 gradients before it
    casts them to the float32 parameters' type)."""
    params = jax.eval_shape(parts.create_state).params
    itemsize = min(np.dtype(parts.dtype).itemsize, 4)
    return sum(x.size for x in jax.tree.leaves(params)) * itemsize


def check_sharding(
    train: StepReport, num_devices: int, grad_bytes: int, auto_flops: float | None = None
) -> None:
    """Refuse a compile that does not shard the batch: the gradient all-reduce must be there
    (at least half a gradient's bytes all-reduced), and (explicit axes) per-device FLOPs must
    match the auto-axes compile's within 5%."""
    if train.out_of_memory or num_devices == 1:
        return
    reduced = train.collectives.get("all-reduce", {}).get("bytes", 0)
    if reduced < grad_bytes / 2:
        raise AotError(
            f"the compiled train step all-reduces {reduced / 2**20:.2f} MiB but the gradients are "
            f"{grad_bytes / 2**20:.2f} MiB: the batch is not split over the {num_devices} devices "
            f"(abstract inputs without shardings on an explicit-axes mesh do this), so the "
            f"memory and FLOPs would be wrong. Please report this as a train.aot bug."
        )
    if auto_flops:
        ratio = train.flops_per_device / auto_flops
        if abs(ratio - 1.0) > 0.05:
            raise AotError(
                f"per-device FLOPs of the explicit-axes compile are {ratio:.2f}x those of the "
                f"auto-axes compile of the same step: the batch is not sharded as intended."
            )


# ----------------------------------------------------------------------------------------------
# The whole check.


@dataclasses.dataclass
class AotResult:
    slice: Slice
    config: Any
    info: Any
    dtype: str
    num_devices: int
    train: StepReport
    eval: StepReport | None
    max_batch_per_device: int | None = None
    # Each train-step compile of the search: batch per device, fits, bytes needed, compile time.
    max_batch_trials: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict)
    devices: list[Any] = dataclasses.field(default_factory=list)  # the devices compiled for

    @property
    def batch_per_device(self) -> int:
        return self.train.global_batch // self.num_devices

    @property
    def needed_bytes(self) -> int:
        return max(r.total_bytes for r in (self.train, self.eval) if r is not None)

    @property
    def fits(self) -> bool:
        return not any(r.out_of_memory for r in (self.train, self.eval) if r is not None) and (
            self.needed_bytes <= self.slice.hbm_per_device
        )

    def verdict(self) -> str:
        need, have, word = self.needed_bytes / GIB, self.slice.hbm_per_device / GIB, self.slice.device_word
        if self.fits:
            return f"fits: {need:.1f} of {have:.4g} GiB per {word}"
        if not need:  # the compiler ran out of HBM without saying how much it needed
            return f"does not fit: needs more than the {have:.4g} GiB the {word} has"
        return f"does not fit: needs {need:.1f} GiB, the {word} has {have:.4g}"

    def to_json(self) -> dict[str, Any]:
        def step(r: StepReport | None) -> dict[str, Any] | None:
            if r is None:
                return None
            d = dataclasses.asdict(r)
            d["total_bytes"] = r.total_bytes
            d["flops_per_image"] = r.flops_per_device * self.num_devices / r.global_batch
            return d

        return {
            "topology": self.slice.name,
            "libtpu_topology": self.slice.topology,
            "generation": self.slice.generation,
            "num_slices": self.slice.num_slices,
            "chips": self.slice.chips,
            "hosts": self.slice.hosts,
            "devices": self.num_devices,
            "hbm_bytes_per_device": self.slice.hbm_per_device,
            "arch": self.config.model.arch,
            "dataset": self.info.name,
            "image_shape": list(self.info.image_shape),
            "num_classes": self.info.num_classes,
            "dtype": self.dtype,
            "mesh_axis_types": self.config.mesh_axis_types,
            "batch_size": self.train.global_batch,
            "batch_per_device": self.batch_per_device,
            "fits": self.fits,
            "verdict": self.verdict(),
            "needed_bytes_per_device": self.needed_bytes,
            "train_step": step(self.train),
            "eval_step": step(self.eval),
            "max_batch_per_device": self.max_batch_per_device,
            "max_batch_trials": self.max_batch_trials,
            "jax": jax.__version__,
            "libtpu": libtpu_version(),
        }


class Compiler:
    """Builds the run's steps for ``slice_`` and compiles them at any batch size."""

    def __init__(self, config: Any, slice_: Slice, devices: Sequence[Any] | None = None):
        if config.parallelism != "jit":
            raise AotError(
                "train.aot compiles the jit driver (a mesh over the slice); pmap cannot be compiled "
                "for a topology ahead of time. Use --config.parallelism=jit (the same step)."
            )
        if config.dtype == "float64" and slice_.generation != "cpu":
            raise AotError("TPUs have no float64; use --config.dtype=auto (bfloat16) or float32.")
        self.config, self.slice = config, slice_
        self.devices = list(devices) if devices is not None else topology_devices(slice_)
        self.info, self.image_dtype = dataset_info(config)
        self.explicit = config.mesh_axis_types == "explicit"
        self.mesh = make_data_mesh(devices=self.devices, explicit=self.explicit, process_ordered=True)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def parts(self, global_batch: int) -> Steps:
        steps_per_epoch = max(self.info.num_train_examples // global_batch, 1)
        total = int(self.config.num_train_steps)
        if total <= 0:
            total = max(round(self.config.num_epochs * steps_per_epoch), 1)
        platform = "cpu" if self.slice.generation == "cpu" else "tpu"
        return build_steps(self.config, self.info, steps_per_epoch, total, platform=platform)

    def train(self, global_batch: int, *, mesh: Mesh | None = None, shardings: bool = True):
        mesh = mesh or self.mesh
        parts = self.parts(global_batch)
        args = abstract_inputs(parts, mesh, self.info, self.image_dtype, global_batch, shardings=shardings)
        return compile_step("train_step", steps.jit_train_step(parts.train_step, mesh), args, global_batch)

    def eval(self, global_batch: int):
        parts = self.parts(self.config.batch_size)
        args = abstract_inputs(parts, self.mesh, self.info, self.image_dtype, global_batch, eval_batch=True)
        return compile_step("eval_step", steps.jit_eval_step(parts.eval_step, self.mesh), args, global_batch)

    def auto_flops(self, global_batch: int) -> float:
        """Per-device FLOPs of the same train step on an auto-axes mesh (the reference)."""
        report, _ = self.train(
            global_batch, mesh=make_data_mesh(devices=self.devices, explicit=False, process_ordered=True)
        )
        return report.flops_per_device

    def fits(self, report: StepReport) -> bool:
        return not report.out_of_memory and report.total_bytes <= self.slice.hbm_per_device


@dataclasses.dataclass(frozen=True)
class Trial:
    """One compile of the search: did the train step fit, and the bytes per device it needs
    (from the compile, or from the compiler's out-of-HBM message; 0 when it did not say)."""

    batch: int
    fits: bool
    needed_bytes: int


def _grid_up(x: float) -> int:
    """The smallest batch the search may try at or above ``x``: 1 to 8, then multiples of 8."""
    b = max(math.ceil(x), 1)
    return b if b <= 8 else -(-b // 8) * 8


def _grid_next(b: int) -> int:
    return b + 1 if b < 8 else (b // 8 + 1) * 8


def _grid_prev(b: int) -> int:
    return b - 1 if b <= 8 else (b - 1) // 8 * 8


def _crossing(tried: dict[int, Trial], lo: int, hi: int, capacity: float) -> float | None:
    """Where the bytes needed reach ``capacity``, interpolated from the compiles so far: the
    line through the largest fit and the smallest failure (regula falsi), and the line through
    the two smallest failures (secant). Both undershoot when the compiler rematerialises near
    the limit, so the higher is taken. None when the compiler gave no sizes to interpolate."""
    need_hi = tried[hi].needed_bytes
    if not need_hi:
        return None
    estimates = []
    need_lo = tried[lo].needed_bytes if lo else 0
    if need_lo and need_hi > need_lo:
        estimates.append(lo + (capacity - need_lo) * (hi - lo) / (need_hi - need_lo))
    failed = sorted(b for b, t in tried.items() if not t.fits and t.needed_bytes)
    if len(failed) >= 2:
        (b1, t1), (b2, t2) = ((b, tried[b]) for b in failed[:2])
        if t2.needed_bytes > t1.needed_bytes:
            estimates.append(
                b1 - (t1.needed_bytes - capacity) * (b2 - b1) / (t2.needed_bytes - t1.needed_bytes)
            )
    return max(estimates) if estimates else None


def largest_batch(
    measure: Callable[[int], Trial], start: int, capacity: float, *, limit: int = 1 << 16
) -> tuple[int, list[Trial]]:
    """The largest batch ``b`` whose compile fits, with the next batch up (``b + 8``; ``b + 1``
    below 8) compiled and not fitting. ``measure(b)`` compiles at ``b``; fitting must be
    monotone in ``b``.

    The search is shaped by what compiles cost: one that fits takes minutes, one that runs out of
    HBM ends in seconds and says how many bytes it needed. So it spends failures to save fits:
    from ``start``, it jumps to 4x the batch that a linear scaling of ``start``'s memory would
    fill, which fails (if it fits, it jumps again). Then each try goes halfway from the
    interpolated batch where the memory needed reaches ``capacity`` (:func:`_crossing`) up to
    the smallest batch that failed: the interpolation undershoots (XLA rematerialises to fit as
    the limit nears, so the memory curve bends), and a try that fits costs as much as a hundred
    that fail. Without sizes to interpolate it bisects. About one or two fitting compiles and
    ten failing ones per search, as the unit tests count on model memory curves.

    Returns ``(b, trials)`` in the order tried; ``b`` is 0 when not even 1 fits."""
    tried: dict[int, Trial] = {}

    def test(b: int) -> Trial:
        if b not in tried:
            tried[b] = measure(b)
        return tried[b]

    lo, hi = 0, None
    b = max(int(start), 1)
    while hi is None:
        trial = test(b)
        if not trial.fits:
            hi = b
        elif b >= limit:
            return b, list(tried.values())
        else:
            lo = b
            linear = b * capacity / trial.needed_bytes if trial.needed_bytes else 0
            b = min(max(2 * b, _grid_up(4 * linear)), limit)
    while _grid_next(lo) < hi:
        estimate = _crossing(tried, lo, hi, capacity)
        b = (lo + hi) // 2 if estimate is None else estimate + (hi - estimate) / 2
        b = min(max(_grid_up(b), _grid_next(lo)), _grid_prev(hi))
        if test(b).fits:
            lo = b
        else:
            hi = b
    return lo, list(tried.values())


def run_aot(
    config: Any,
    slice_: Slice,
    *,
    find_max_batch: bool = False,
    devices: Sequence[Any] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> AotResult:
    """Compile ``config``'s train and eval steps for ``slice_``; see the module docstring.

    Args:
        config: The run's config (``parallelism='jit'``, not float64).
        slice_: The TPU slice to compile for.
        find_max_batch: Also search the largest per-device batch whose train step fits in
            device memory (one compile per size tried).
        devices: Devices to compile for; None: the compile-only devices of ``slice_``'s topology.
        progress: Called with one line before each compile.

    Returns:
        An :class:`AotResult`, with the compiled steps in ``compiled``.

    Raises:
        AotError: The config cannot run on the slice; the message says why.
    """
    compiler = Compiler(config, slice_, devices)
    n = compiler.num_devices
    try:
        validate_config(config, device_count=n, process_count=slice_.hosts)
    except ConfigError as e:
        raise AotError(str(e)) from None
    batch = int(config.batch_size)
    progress(f"compiling the train step for {slice_.topology} ({n} devices, batch {batch}) ...")
    train, compiled_train = compiler.train(batch)
    auto_flops = None
    if compiler.explicit and not train.out_of_memory and n > 1:
        progress("compiling it again on an auto-axes mesh, to check the sharding ...")
        auto_flops = compiler.auto_flops(batch)
    check_sharding(train, n, gradient_bytes(compiler.parts(batch)), auto_flops)
    progress(f"compiling the eval step (batch {config.eval_batch_size}) ...")
    evaluation, compiled_eval = compiler.eval(int(config.eval_batch_size))
    dtype = np.dtype(compiler.parts(batch).dtype).name
    result = AotResult(slice_, config, compiler.info, dtype, n, train, evaluation)
    result.compiled = {"train_step": compiled_train, "eval_step": compiled_eval}
    result.devices = compiler.devices
    if find_max_batch:
        known = {batch // n: train} if batch % n == 0 else {}

        def measure(b: int) -> Trial:
            report = known.get(b) or compiler.train(b * n)[0]
            trial = Trial(b, compiler.fits(report), report.total_bytes)
            result.max_batch_trials.append(
                {
                    "batch_per_device": b,
                    "fits": trial.fits,
                    "needed_bytes": trial.needed_bytes,
                    "compile_s": round(report.compile_s, 1),
                }
            )
            progress(
                f"  batch {b} per {slice_.device_word}: {report.total_bytes / GIB:.1f} GiB, "
                f"fits: {trial.fits} ({report.compile_s:.0f} s)"
            )
            return trial

        result.max_batch_per_device, _ = largest_batch(measure, batch // n, slice_.hbm_per_device)
    return result


# ----------------------------------------------------------------------------------------------
# Saving the executables.


def save_executables(result: AotResult, path: str) -> None:
    """Write the compiled steps with what they depend on, for ``python -m train
    --config.aot_executable=PATH`` (``train/executables.py`` says when they are reused)."""
    steps_ = {
        r.name: (r.program, result.compiled.get(r.name)) for r in (result.train, result.eval) if r is not None
    }
    executables.save(
        path,
        steps_,
        result.devices,
        topology=result.slice.topology,
        num_slices=result.slice.num_slices,
        config=result.config.to_json_best_effort(),
    )


# ----------------------------------------------------------------------------------------------
# Printing.


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def format_report(result: AotResult) -> str:
    s, info = result.slice, result.info
    word = s.device_word
    lines = [
        f"{result.config.model.arch} on {info.name} {'x'.join(map(str, info.image_shape))}, "
        f"{info.num_classes} classes, {result.dtype} compute; batch {result.train.global_batch} "
        f"({result.batch_per_device} per {word}); jit over {result.num_devices} devices "
        f"({result.config.mesh_axis_types} axes)",
        f"topology {s.topology} ({s.name}): {s.chips} chips in {s.num_slices} slice(s), {s.hosts} "
        f"host(s), {s.gen.hbm_gib:.4g} GiB {'host memory' if s.generation == 'cpu' else 'HBM per chip'}; "
        f"jax {jax.__version__}, libtpu {libtpu_version()}",
    ]
    for r in (result.train, result.eval):
        if r is None:
            continue
        if r.out_of_memory:
            lines.append(
                f"{r.name} (batch {r.global_batch}): out of HBM after {r.compile_s:.1f} s: {r.out_of_memory}"
            )
            continue
        lines.append(
            f"{r.name} (batch {r.global_batch}): compiled in {r.compile_s:.1f} s; per {word}: "
            f"arguments {_gib(r.argument_bytes)}, outputs {_gib(r.output_bytes)} "
            f"({_gib(r.alias_bytes)} aliased), temp {_gib(r.temp_bytes)}, code {_gib(r.code_bytes)}: "
            f"total {_gib(r.total_bytes)}"
        )
        per_image = r.flops_per_device * result.num_devices / r.global_batch
        lines.append(f"  compute: {_flops(r.flops_per_device)} per {word}, {_flops(per_image)} per image")
        comm = ", ".join(
            f"{op} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for op, v in sorted(r.collectives.items())
        )
        lines.append(f"  collectives: {comm or 'none'}")
    if result.max_batch_per_device is not None:
        tried = ", ".join(
            f"{t['batch_per_device']} ({'fits' if t['fits'] else 'no'})" for t in result.max_batch_trials
        )
        lines.append(
            f"largest train batch that fits: {result.max_batch_per_device} per {word} "
            f"({result.max_batch_per_device * result.num_devices} global); tried {tried}"
        )
    lines.append(result.verdict())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line.


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py).")
    flags.DEFINE_string("topology", None, f"The TPU slice: {ACCEPTED_FORMS}.")
    flags.DEFINE_integer("num_slices", 1, "Number of identical slices (multi-slice over DCN).")
    flags.DEFINE_integer(
        "batch_per_chip", 0, "Set config.batch_size to this many images per chip (0: keep the config's)."
    )
    flags.DEFINE_bool("find_max_batch", False, "Also find the largest per-device batch that fits.")
    flags.DEFINE_string("save", None, "Write the serialized executables to this file.")
    flags.DEFINE_string("json", None, "Write the report as JSON to this file.")
    flags.mark_flags_as_required(["config", "topology"])
    return config


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # compiling for a TPU needs no device at all
    FLAGS = flags.FLAGS
    config = _CONFIG.value
    try:
        slice_ = parse_topology(FLAGS.topology, FLAGS.num_slices)
        if slice_.generation != "cpu":
            require_libtpu()
        if FLAGS.batch_per_chip > 0:
            config.batch_size = FLAGS.batch_per_chip * slice_.chips
        result = run_aot(
            config,
            slice_,
            find_max_batch=FLAGS.find_max_batch,
            progress=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except AotError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_report(result), flush=True)
    if FLAGS.json:
        from etils import epath

        epath.Path(FLAGS.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if FLAGS.save:
        save_executables(result, FLAGS.save)
        print(
            f"saved the executables to {FLAGS.save}; python -m train --config.aot_executable={FLAGS.save} "
            f"loads them when jax, libtpu, flags, devices and the program match"
        )


if __name__ == "__main__":
    from absl import app

    _CONFIG = _flags()
    app.run(main)
