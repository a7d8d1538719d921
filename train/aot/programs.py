"""Compiling one step for the slice, and reading the compiled program: memory per device,
FLOPs, collectives, out-of-HBM errors; and the check that the batch is really sharded."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.sharding import DATA_AXIS
from train import executables
from train.aot.topology import AotError
from train.build import Steps


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
    available_bytes: int = 0  # the HBM the compiler had for the program, from that message

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
    re.compile(r"Used ([0-9.]+)([KMGT]?)\S* of ([0-9.]+)([KMGT]?)\S* hbm", re.IGNORECASE),
    re.compile(
        r"required for [^(]*\(([0-9.]+)([KMGT]?)\S*\) exceeds available HBM \(([0-9.]+)([KMGT]?)",
        re.IGNORECASE,
    ),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _out_of_memory(message: str) -> tuple[str, int, int] | None:
    """The compiler's out-of-HBM error (its first line), the bytes it says the program needs
    and the bytes it says the chip has for it (less than the HBM: 15.75 of v5e's 16 GiB, 30.75
    of v4's 32); 0 for either when it does not say."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    needed = available = 0
    for pattern in _OOM_NEEDED:
        found = pattern.search(message)
        if found:
            needed = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
            available = int(float(found.group(3)) * _UNITS[found.group(4).upper()])
            break
    lines = message.strip().splitlines() or [message]
    line = next((x for x in lines if "memory" in x.lower()), lines[0])
    return line.strip(), needed, available


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
            name,
            global_batch,
            seconds,
            program=program,
            out_of_memory=oom[0],
            needed_bytes=oom[1],
            available_bytes=oom[2],
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
    image_shape: tuple[int, ...] | None = None,
) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
    """The train state and one batch as ``ShapeDtypeStruct``s with the run's shardings; the
    images are ``image_shape`` (the eval batches' size for the eval step), else ``info``'s.

    ``shardings=False`` drops them, which on an explicit-axes mesh silently compiles the whole
    global batch on every chip (the check in :func:`check_sharding` exists for this)."""
    replicated = NamedSharding(mesh, P()) if shardings else None
    data = NamedSharding(mesh, P(DATA_AXIS)) if shardings else None
    state = jax.eval_shape(parts.create_state)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (global_batch, *(image_shape or info.image_shape)), image_dtype, sharding=data
        ),
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
