"""The whole check: compile a run's train and eval steps for a slice, the result and its report,
and saving the executables."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_jax.sharding import make_data_mesh
from train import compile_cache, executables, parallel
from train.aot.datasets import dataset_info
from train.aot.programs import StepReport, abstract_inputs, check_sharding, compile_step, gradient_bytes
from train.aot.search import Trial, largest_batch
from train.aot.topology import GIB, AotError, Slice, libtpu_version, topology_devices
from train.build import Steps, build_steps
from train.config import ConfigError, validate_config
from train.data.eval_resize import EvalOptions


def eval_image_shape(config: Any, info: Any) -> tuple[int, int, int]:
    """The eval batches' image shape: ``config.eval_image_size`` (0: the training size)."""
    return EvalOptions.from_config(config, info.image_shape[0]).shape(info.image_shape[-1])


@dataclasses.dataclass
class AotResult:
    """What ``run_aot`` found: the train and eval steps' reports for the slice, and the search's."""

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
    devices: list[Any] = dataclasses.field(default_factory=list)  # the mesh's devices, in its order

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
            "eval_image_shape": list(eval_image_shape(self.config, self.info)),
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
        self.mesh = make_data_mesh(
            devices=self.devices, explicit=self.explicit, process_ordered=True, num_slices=slice_.num_slices
        )

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
        return compile_step("train_step", parallel.jit_train_step(parts.train_step, mesh), args, global_batch)

    def eval(self, global_batch: int):
        parts = self.parts(self.config.batch_size)
        # The eval batches' own size (config.eval_image_size): the step the run compiles for them.
        shape = eval_image_shape(self.config, self.info)
        args = abstract_inputs(
            parts, self.mesh, self.info, self.image_dtype, global_batch, eval_batch=True, image_shape=shape
        )
        return compile_step(
            "eval_step", parallel.jit_eval_step(parts.eval_step, self.mesh), args, global_batch
        )

    def auto_flops(self, global_batch: int) -> float:
        """Per-device FLOPs of the same train step on an auto-axes mesh (the reference)."""
        report, _ = self.train(
            global_batch,
            mesh=make_data_mesh(
                devices=self.devices, explicit=False, process_ordered=True, num_slices=self.slice.num_slices
            ),
        )
        return report.flops_per_device

    def fits(self, report: StepReport) -> bool:
        return not report.out_of_memory and report.total_bytes <= self.slice.hbm_per_device


def run_aot(
    config: Any,
    slice_: Slice,
    *,
    find_max_batch: bool = False,
    devices: Sequence[Any] | None = None,
    progress: Callable[[str], None] = lambda message: None,
    for_saving: bool = False,
) -> AotResult:
    """Compile ``config``'s train and eval steps for ``slice_``; see the module docstring.

    Args:
        config: The run's config (``parallelism='jit'``, not float64).
        slice_: The TPU slice to compile for.
        find_max_batch: Also search the largest per-device batch whose train step fits in
            device memory (one compile per size tried).
        devices: Devices to compile for; None: the compile-only devices of ``slice_``'s topology.
        progress: Called with one line before each compile.
        for_saving: The steps will go to :func:`save_executables`: compile them without the
            persistent compilation cache (``train.compile_cache.bypassed`` says why).

    Returns:
        An :class:`AotResult`, with the compiled steps in ``compiled``.

    Raises:
        AotError: The config cannot run on the slice; the message says why.
    """
    with compile_cache.bypassed() if for_saving else contextlib.nullcontext():
        return _compile(config, slice_, find_max_batch, devices, progress)


def _compile(
    config: Any,
    slice_: Slice,
    find_max_batch: bool,
    devices: Sequence[Any] | None,
    progress: Callable[[str], None],
) -> AotResult:
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
    result.devices = list(compiler.mesh.devices.flat)  # in the mesh's order, as python -m train has them
    if find_max_batch:
        known = {batch // n: train} if batch % n == 0 else {}

        def measure(b: int) -> Trial:
            report = known.get(b) or compiler.train(b * n)[0]
            trial = Trial(b, compiler.fits(report), report.total_bytes, report.available_bytes)
            result.max_batch_trials.append(
                {
                    "batch_per_device": b,
                    "fits": trial.fits,
                    "needed_bytes": trial.needed_bytes,
                    "out_of_memory": bool(report.out_of_memory),
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
