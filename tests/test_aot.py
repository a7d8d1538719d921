"""train.aot: the run's steps compiled for TPU topologies on this CPU (libtpu's compiler, no TPU).

A tiny ResNet at 32 px keeps each compile to a few seconds. The compiled programs are checked
against references computed apart from them: the per-chip FLOPs of two slice sizes against each
other, the all-reduced bytes against the gradient's size, the memory against the state's bytes
and the forward FLOPs against XLA:CPU's count for the same eval step on one CPU device.
"""

import dataclasses
import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax import platform as platform_lib
from resnet_jax.sharding import make_data_mesh
from train import aot, executables, parallel

ROOT = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason=f"libtpu is not installed (the TPU compiler train.aot uses): {aot.INSTALL_HINT}"
)
# One worker compiles the shared programs once.
pytestmark = pytest.mark.xdist_group("aot")

BATCH = 128  # global: 32 per chip on 4 chips, 8 on 16 (TPU pads per-chip batches below 8)


def tiny_config(**fields):
    from runpy import run_path

    c = run_path(str(ROOT / "configs" / "default.py"))["get_config"]()
    c.dataset = "cifar10"  # in train.aot's table: nothing is read
    c.image_size = 32
    c.model.arch = "resnet_base"
    c.model.overrides = {"n_blocks": (1,), "n_channels": (8,), "first_kernel_size": 3}
    c.dtype = "auto"
    c.batch_size = BATCH
    c.eval_batch_size = BATCH
    c.num_train_steps = 100
    for k, v in fields.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def four_chips():
    """The train and eval steps for v5e:2x2 (4 chips, one host)."""
    return aot.run_aot(tiny_config(), aot.parse_topology("v5e:2x2"))


@pytest.fixture(scope="module")
def multi_host():
    """The train step for v5e:4x4 (16 chips on 4 hosts), same global batch."""
    config = tiny_config()
    slice_ = aot.parse_topology("v5e:4x4")
    compiler = aot.Compiler(config, slice_)
    report, _ = compiler.train(BATCH)
    return slice_, compiler, report


@pytest.fixture(scope="module")
def two_slices():
    """The train step for two v5e:2x2 slices (Multislice: 8 chips, DCN between the slices), same
    global batch; its compiler and the compiled program's text."""
    compiler = aot.Compiler(tiny_config(), aot.parse_topology("v5e:2x2", num_slices=2))
    report, compiled = compiler.train(BATCH)
    return compiler, report, compiled.as_text()


# ---------------------------------------------------------------------------------------------
# Topology names (no compile).


@pytest.mark.parametrize(
    "name, topology, chips, hosts",
    [
        ("v5e:2x2", "v5e:2x2", 4, 1),
        ("v5litepod-8", "v5e:2x4", 8, 1),
        ("v5e-16", "v5e:4x4", 16, 4),
        ("v6e-256", "v6e:16x16", 256, 64),
        ("v4-8", "v4:2x2x1", 4, 1),
        ("v4-32", "v4:2x2x4", 16, 4),
        ("v5p-128", "v5p:4x4x4", 64, 16),
        ("V5P:4x4x4", "v5p:4x4x4", 64, 16),
        ("v4-4096", "v4:8x16x16", 2048, 512),
        ("v3-32", "v3:4x4", 16, 4),
    ],
)
def test_topology_names_as_users_type_them(name, topology, chips, hosts):
    s = aot.parse_topology(name)
    assert (s.topology, s.chips, s.hosts) == (topology, chips, hosts)


@pytest.mark.parametrize("name", ["v7x-8", "tpu", "v5e", "a100", "v4-7"])
def test_unknown_topology_names_list_the_accepted_forms(name):
    with pytest.raises(aot.AotError) as e:
        aot.parse_topology(name)
    message = str(e.value)
    assert message.startswith(f"unknown --topology {name!r}") and "\n" not in message
    assert all(form in message for form in ("v4-8", "v5p-128", "v5litepod-8", "v5e:2x2", "v5p:4x4x4"))


@pytest.mark.parametrize(
    "name, fix",
    [("v5e:2x2x2", "v5e:2x2"), ("v4:2x2", "v4:2x2x1"), ("v5p-24", "v5p:2x2x2"), ("v5e-2", "v5e:2x2")],
)
def test_malformed_topologies_say_what_a_valid_one_looks_like(name, fix):
    with pytest.raises(aot.AotError, match=f"--topology {name!r}.*{fix}"):
        aot.parse_topology(name)


def test_bad_topology_is_one_line_from_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "train.aot", "--config=configs/default.py", "--topology=v9z-8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown --topology 'v9z-8'"), proc.stderr
    assert "v4-8" in lines[0] and "v5p:4x4x4" in lines[0]


def test_without_libtpu_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(aot.AotError, match=r'pip install -e "\.\[tpu\]"'):
        aot.require_libtpu()


def test_unknown_dataset_asks_for_its_shape_instead_of_reading_it():
    with pytest.raises(aot.AotError, match="synthetic_num_classes"):
        aot.dataset_info(tiny_config(dataset="my_private_set"))
    info, dtype = aot.dataset_info(tiny_config(dataset="imagenet2012", image_size=224))
    assert (info.num_classes, info.image_shape, info.num_train_examples) == (1000, (224, 224, 3), 1_281_167)
    assert dtype == np.uint8


GIB = 2**30
HBM = 16 * GIB


def linear_memory(state_gib, gib_per_image):
    """A fake compile: memory linear in the batch; fits up to the 16 GiB of HBM."""

    def measure(b):
        need = int((state_gib + gib_per_image * b) * GIB)
        return aot.Trial(b, need <= HBM, need)

    return measure


def remat_memory(largest, gib_per_image=0.036, limit=15.75, say_limit=True):
    """A fake compile shaped as XLA:TPU's for ResNet-50 on v5e (BENCHMARKS.md): memory grows
    with the batch until the compiler rematerialises to stay just under its limit (15.75 of
    v5e's 16 GiB, which its out-of-HBM errors state), so it bends flat below ``largest``, and
    jumps above it (the sizes those errors report)."""

    def measure(b):
        if b <= largest:
            need = min(0.3 + gib_per_image * b, limit - 1.25 + 1.1 * b / largest)
            return aot.Trial(b, True, int(need * GIB))
        need = int((limit + 0.55 + 0.02 * (b - largest)) * GIB)
        return aot.Trial(b, False, need, int(limit * GIB) if say_limit else 0)

    return measure


def silent(measure):
    """The same fits, but no sizes (an out-of-HBM message that names none)."""
    return lambda b: aot.Trial(b, measure(b).fits, 0)


def brute_force(measure, limit=1 << 16):
    """The largest batch on the search's grid (1..8, then multiples of 8) that fits."""
    grid = [*range(1, 8), *range(8, limit + 1, 8)]
    return max((b for b in grid if measure(b).fits), default=0)


@pytest.mark.parametrize(
    "measure, start, hbm",
    [
        (remat_memory(1024), 256, HBM),  # ResNet-50 on v5e
        (remat_memory(1024), 128, HBM),
        (remat_memory(1536), 256, HBM),
        (remat_memory(600), 256, HBM),
        (remat_memory(4000, gib_per_image=0.01), 256, HBM),
        # v4: the compiler has 30.75 of the 32 GiB, and failures just above its limit need
        # less than 32 (as measured: 31.3 GiB at 2192 per chip)
        (remat_memory(2000, gib_per_image=0.033, limit=30.75), 256, 2 * HBM),
        (remat_memory(1024, say_limit=False), 256, HBM),
        (linear_memory(0.3, 0.036), 256, HBM),  # 432 fits
        (linear_memory(10, 0.01), 128, HBM),  # a big state: 568
        (linear_memory(0.3, 0.036), 250, HBM),  # a start off the grid
    ],
)
def test_largest_batch_costs_one_or_two_fitting_compiles(measure, start, hbm):
    best, trials = aot.largest_batch(measure, start, hbm)
    assert best == brute_force(measure)
    tried = {t.batch: t for t in trials}
    assert len(tried) == len(trials)  # no batch compiled twice
    assert all(t == measure(t.batch) for t in trials)
    # The answer compiled and fits, and the next step up compiled and did not.
    assert tried[best].fits and not tried[best + 8].fits
    assert trials[0].batch == start
    fits = sum(t.fits for t in trials[1:])  # minutes each; `start` is compiled anyway
    fails = sum(not t.fits for t in trials)  # seconds each
    assert 1 <= fits <= 2 and fails <= 15, [(t.batch, t.fits) for t in trials]


@pytest.mark.parametrize(
    "measure, start, hbm",
    [
        (remat_memory(2184, gib_per_image=0.0135, limit=30.75), 3688, 2 * HBM),  # v4, as measured
        (remat_memory(1024), 4096, HBM),
        (remat_memory(300), 8192, HBM),
        (linear_memory(0.3, 0.036), 1024, HBM),
    ],
)
def test_largest_batch_from_a_start_that_fails_costs_one_fit(measure, start, hbm):
    # A search resumed above the answer (the fitting compile at the start batch already done in
    # an earlier run) compiles one fit: the answer.
    best, trials = aot.largest_batch(measure, start, hbm)
    assert best == brute_force(measure)
    assert not trials[0].fits
    assert sum(t.fits for t in trials) == 1 and len(trials) <= 16, [(t.batch, t.fits) for t in trials]


@pytest.mark.parametrize(
    "measure, start, expected",
    [
        (linear_memory(0.3, 0.036), 1024, 432),  # start does not fit: the search goes down
        (linear_memory(15.96, 0.01), 256, 4),  # below 8 the steps are 1
        (linear_memory(17, 0.01), 256, 0),  # nothing fits
        (linear_memory(0, 1e-9), 256, 1 << 16),  # everything fits: stop at the limit
        (silent(remat_memory(1024)), 256, 1024),  # no sizes: bisection
        (silent(linear_memory(0.3, 0.036)), 7, 432),
    ],
)
def test_largest_batch_edges(measure, start, expected):
    best, trials = aot.largest_batch(measure, start, HBM)
    assert best == expected == brute_force(measure)
    tried = {t.batch: t.fits for t in trials}
    assert len(tried) == len(trials) <= 40
    if 0 < best < 1 << 16:
        assert tried[best] and not tried[best + (8 if best >= 8 else 1)]


# ---------------------------------------------------------------------------------------------
# Compiled for TPU topologies.


@needs_libtpu
def test_megacore_chip_is_one_device():
    assert len(aot.topology_devices(aot.parse_topology("v4-8"))) == 4  # 4 chips, 8 cores
    devices = aot.topology_devices(aot.parse_topology("v5p:2x2x2"))
    assert len(devices) == 8 and len({d.process_index for d in devices}) == 2
    assert len(aot.topology_devices(aot.parse_topology("v5e:2x2", num_slices=2))) == 8


@needs_libtpu
def test_four_chip_compile_fits_with_dtype_for_tpu(four_chips):
    r = four_chips
    assert jax.default_backend() == "cpu"  # the suite, and the compile, stay on the CPU backend
    assert r.num_devices == 4 and r.dtype == "bfloat16"  # dtype='auto' resolved for the TPU
    assert r.fits and r.verdict().startswith("fits: 0.0 of 16 GiB per chip")
    # Donation: the whole train state (its float32 parameters, momentum, BatchNorm statistics)
    # comes back in place, and the arguments hold at least the state and a quarter of the batch.
    state = jax.eval_shape(aot.Compiler(tiny_config(), r.slice).parts(BATCH).create_state)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    batch_bytes = BATCH // 4 * (32 * 32 * 3 + 4)
    assert r.train.alias_bytes >= state_bytes - 8  # all but the step counter (an int32 scalar)
    assert r.train.argument_bytes >= state_bytes + batch_bytes
    assert 0 < r.train.total_bytes < r.slice.hbm_per_device


@needs_libtpu
def test_gradient_all_reduce_is_in_the_hlo(four_chips):
    parts = aot.Compiler(tiny_config(), four_chips.slice).parts(BATCH)
    params = jax.eval_shape(parts.create_state).params
    grad_bf16 = sum(x.size for x in jax.tree.leaves(params)) * 2
    reduced = four_chips.train.collectives["all-reduce"]["bytes"]
    # Gradients (bfloat16) plus the BatchNorm statistics; nothing else is all-reduced.
    assert grad_bf16 <= reduced <= grad_bf16 + 16 * 1024
    assert "all-gather" not in four_chips.train.collectives  # the batch is never gathered


@needs_libtpu
def test_flops_per_chip_scale_as_one_over_chips(four_chips, multi_host):
    slice_, _, report = multi_host
    assert (slice_.chips, slice_.hosts) == (16, 4)
    ratio = four_chips.train.flops_per_device / report.flops_per_device
    assert ratio == pytest.approx(4.0, rel=0.03)
    assert report.collectives["all-reduce"]["bytes"] == four_chips.train.collectives["all-reduce"]["bytes"]


@needs_libtpu
def test_two_slices_reduce_over_ici_within_a_slice_then_over_dcn(two_slices):
    compiler, report, hlo = two_slices
    devices = list(compiler.mesh.devices.flat)
    # The run's mesh (make_driver: make_data_mesh over jax.devices(), whatever their order, the
    # slices taken from slice_index) is the one compiled here.
    shuffled = random.Random(0).sample(compiler.devices, len(compiler.devices))
    run_mesh = parallel.make_driver(
        "jit", mesh=make_data_mesh(devices=shuffled, explicit=False, process_ordered=True)
    )
    assert list(run_mesh.mesh.devices.flat) == devices
    assert [d.slice_index for d in devices] == [0] * 4 + [1] * 4
    # The same split into slices as MaxText's create_hybrid_device_mesh (DCN axis outermost).
    from jax.experimental import mesh_utils

    hybrid = list(mesh_utils.create_hybrid_device_mesh((4,), (2,), devices=compiler.devices).flat)
    assert [set(hybrid[:4]), set(hybrid[4:])] == [set(devices[:4]), set(devices[4:])]
    # Each gradient all-reduce runs over one slice's 4 chips (ICI), and its result goes on to a
    # Megascale all-reduce across the slices (DCN).
    groups = re.findall(r" all-reduce(?:-start)?\(.*?replica_groups=(\{[^ ]*\}),", hlo)
    assert groups and set(groups) == {"{{0,1,2,3}}"}
    dcn = re.findall(r' send\(.*_xla_megascale_transfer_type="ALL_REDUCE"', hlo)
    assert len(dcn) >= len(groups) == report.collectives["all-reduce"]["count"]


@needs_libtpu
def test_forward_flops_match_xla_cpu_on_one_device(four_chips):
    # The eval step compiled for one CPU device by XLA:CPU: an independent count of the same
    # forward pass (bfloat16 on both; per image).
    compiler = aot.Compiler(tiny_config(), four_chips.slice)
    parts = compiler.parts(BATCH)
    cpu_mesh = make_data_mesh(devices=jax.devices("cpu")[:1], explicit=False, process_ordered=True)
    args = aot.abstract_inputs(parts, cpu_mesh, compiler.info, compiler.image_dtype, 16, eval_batch=True)
    cpu = aot._cost(parallel.jit_eval_step(parts.eval_step, cpu_mesh).lower(*args).compile())["flops"] / 16
    tpu = four_chips.eval.flops_per_device * 4 / BATCH
    assert tpu == pytest.approx(cpu, rel=0.05)


@needs_libtpu
def test_explicit_axes_trap_is_caught(four_chips):
    """Abstract inputs without shardings on an explicit-axes mesh compile the whole global batch
    on every chip; both checks see it."""
    config = tiny_config(mesh_axis_types="explicit")
    compiler = aot.Compiler(config, four_chips.slice)
    trapped, _ = compiler.train(BATCH, shardings=False)
    grad = aot.gradient_bytes(compiler.parts(BATCH))
    assert trapped.flops_per_device > 3 * four_chips.train.flops_per_device
    with pytest.raises(aot.AotError, match="not split over the 4 devices"):
        aot.check_sharding(trapped, 4, grad)
    with_reduce = dataclasses.replace(trapped, collectives=four_chips.train.collectives)
    with pytest.raises(aot.AotError, match="FLOPs of the explicit-axes compile"):
        aot.check_sharding(with_reduce, 4, grad, auto_flops=four_chips.train.flops_per_device)
    # With shardings the explicit mesh gives the auto mesh's program, which passes.
    good, _ = compiler.train(BATCH)
    aot.check_sharding(good, 4, grad, auto_flops=four_chips.train.flops_per_device)


@needs_libtpu
def test_too_big_does_not_fit():
    # 250M classes: parameters and momentum alone (float32) are 14.9 GiB of v5e's 16.
    config = tiny_config(dataset="synthetic", synthetic_num_classes=250_000_000, image_size=8, batch_size=32)
    slice_ = aot.parse_topology("v5e:2x2")
    compiler = aot.Compiler(config, slice_)
    report, compiled = compiler.train(32)
    assert compiled is None and report.out_of_memory
    state_bytes = 250_000_000 * 8 * 4 * 2
    assert report.needed_bytes > max(state_bytes, slice_.hbm_per_device)
    result = aot.AotResult(slice_, config, compiler.info, "bfloat16", 4, report, None)
    assert not result.fits
    assert result.verdict().startswith("does not fit: needs ") and result.verdict().endswith(
        "the chip has 16"
    )


@needs_libtpu
def test_find_max_batch_records_every_compile(monkeypatch):
    # run_aot's search end to end, with every train-step compile after the first replaced by a
    # fake memory curve (a real search costs minutes of compiles per try): the answer, and each
    # try in the JSON with its bytes and whether the compiler ran out of HBM.
    from train.aot import check, programs

    curve = remat_memory(40)
    real_train = check.Compiler.train
    calls = []

    def train(self, global_batch, **kw):
        calls.append(global_batch)
        if len(calls) == 1:  # the start: a real compile, which the sharding check reads
            return real_train(self, global_batch, **kw)
        t = curve(global_batch // 4)
        if t.fits:
            return programs.StepReport("train_step", global_batch, 1.0, temp_bytes=t.needed_bytes), None
        message = "RESOURCE_EXHAUSTED: Ran out of memory on HBM"
        report = programs.StepReport(
            "train_step", global_batch, 1.0, out_of_memory=message, needed_bytes=t.needed_bytes
        )
        report.available_bytes = t.limit_bytes
        return report, None

    monkeypatch.setattr(check.Compiler, "train", train)
    result = aot.run_aot(tiny_config(batch_size=32), aot.parse_topology("v5e:2x2"), find_max_batch=True)
    assert result.max_batch_per_device == 40 == brute_force(curve)
    trials = result.to_json()["max_batch_trials"]
    assert trials[0]["batch_per_device"] == 8 and trials[0]["fits"] and not trials[0]["out_of_memory"]
    assert [t["batch_per_device"] * 4 for t in trials] == calls
    for t in trials[1:]:
        assert t["out_of_memory"] == (not t["fits"])
        assert t["needed_bytes"] == curve(t["batch_per_device"]).needed_bytes
    assert {t["batch_per_device"]: t["fits"] for t in trials}[48] is False


@needs_libtpu
def test_save_writes_the_executables_with_their_versions(four_chips, tmp_path):
    path = tmp_path / "steps.aot"
    aot.save_executables(four_chips, str(path))
    payload = executables.read(str(path))
    assert payload["environment"]["jax"] == jax.__version__
    assert payload["environment"]["libtpu"] == aot.libtpu_version()
    assert payload["topology"] == "v5e:2x2"
    assert payload["devices"]["platform"] == "tpu" and payload["devices"]["num_devices"] == 4
    # v5e:2x2: each chip's host, its (x, y, z) in the torus, and its core.
    assert sorted(payload["devices"]["layout"]) == [[0, x, y, 0, 0] for x in (0, 1) for y in (0, 1)]
    serialized, in_tree, _ = payload["steps"]["train_step"]["executable"]
    assert len(serialized) > 1000
    assert in_tree == four_chips.compiled["train_step"].in_tree
    assert payload["steps"]["train_step"]["fingerprint"] == four_chips.train.program
    # This CPU is not the slice: python -m train would warn and compile.
    why = executables.mismatch(payload, "train_step", None, jax.devices())
    assert why == "it was compiled for platform='tpu', this run has 'cpu'"


@needs_libtpu
def test_json_report(four_chips):
    d = four_chips.to_json()
    assert d["fits"] and d["devices"] == 4 and d["batch_per_device"] == 32 and d["dtype"] == "bfloat16"
    train = d["train_step"]
    assert train["flops_per_image"] == pytest.approx(train["flops_per_device"] * 4 / BATCH)
    assert set(train) >= {
        "argument_bytes",
        "output_bytes",
        "alias_bytes",
        "temp_bytes",
        "code_bytes",
        "compile_s",
    }
    assert "fits:" in aot.format_report(four_chips).splitlines()[-1]


def test_conftest_keeps_jax_on_the_cpu():
    assert os.environ.get("JAX_PLATFORMS") == "cpu" and jax.default_backend() == "cpu"


@needs_libtpu
def test_training_entry_point_skips_the_tpu_start_up_without_a_tpu():
    # What `python -m train` does first; without it libtpu's start-up prints its warnings here.
    code = (
        "from resnet_jax.platform import skip_absent_tpu; import jax; print(skip_absent_tpu(), jax.devices())"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    if platform_lib._tpu_on_pci_bus() or platform_lib._other_accelerator():
        pytest.skip("this machine has an accelerator: the entry point leaves JAX to use it")
    assert proc.stdout.split()[0] == "True" and "CpuDevice" in proc.stdout
    assert "TPU" not in proc.stderr, proc.stderr
