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
the dataset's source (``describe``: the TFDS sets of ``train.data.tfds.KNOWN_SETS``, the digits,
and for ``dataset='synthetic'`` the config's ``synthetic_*`` fields).

Needs libtpu, the TPU compiler: ``pip install -e ".[tpu]"``. JAX itself stays on the CPU backend.

Modules, in the order a check runs: ``topology`` (slice names, HBM per chip, libtpu's devices),
``datasets`` (a dataset's shape without reading it), ``programs`` (one compile and what it
costs), ``search`` (``--find_max_batch``), ``check`` (both steps, the result, its report and
``--save``) and ``__main__`` (the command line).
"""

from train.aot.check import AotResult, Compiler, format_report, run_aot, save_executables
from train.aot.datasets import dataset_info
from train.aot.programs import (
    StepReport,
    _cost,
    abstract_inputs,
    check_sharding,
    collectives,
    compile_step,
    gradient_bytes,
)
from train.aot.search import Trial, largest_batch
from train.aot.topology import (
    ACCEPTED_FORMS,
    GENERATIONS,
    GIB,
    INSTALL_HINT,
    AotError,
    Generation,
    Slice,
    libtpu_version,
    parse_topology,
    require_libtpu,
    topology_devices,
)

__all__ = [
    "ACCEPTED_FORMS",
    "GENERATIONS",
    "GIB",
    "INSTALL_HINT",
    "AotError",
    "AotResult",
    "Compiler",
    "Generation",
    "Slice",
    "StepReport",
    "Trial",
    "_cost",
    "abstract_inputs",
    "check_sharding",
    "collectives",
    "compile_step",
    "dataset_info",
    "format_report",
    "gradient_bytes",
    "largest_batch",
    "libtpu_version",
    "parse_topology",
    "require_libtpu",
    "run_aot",
    "save_executables",
    "topology_devices",
]
