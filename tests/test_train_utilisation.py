"""What a run reports about itself, piece by piece (no training here; the digits and synthetic
runs of test_train_loop.py, test_train_configs.py and test_train_robustness.py check them in a
run): the chips' peaks, the FLOP counts XLA leaves out of loops, goodput's bookkeeping, the config
fields' one-line errors, and the slice-major order of a Multislice mesh on fake devices."""

import dataclasses
import random
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_worker import tiny_config  # noqa: E402

from resnet_jax.sharding import slice_major_order  # noqa: E402
from train import goodput, utilisation  # noqa: E402
from train.config import ConfigError, validate_config  # noqa: E402


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v5p", 459.0),
        ("TPU v6 lite", 918.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("cpu", None),
    ],
)
def test_peak_by_device_kind(kind, peak):
    assert utilisation.peak_tflops(kind) == peak
    assert utilisation.peak_tflops(kind, override=123.0) == 123.0


def test_rates_leave_out_mfu_without_a_peak():
    # 100 images/s at batch 10 on 2 chips: 10 steps/s of 3e12 FLOPs per chip = 30 TFLOP/s per chip.
    assert utilisation.rates(100.0, 10, 2, 3e12, None) == {
        "images_per_sec_per_chip": 50.0,
        "tflops_per_chip": 30.0,
    }
    assert utilisation.rates(100.0, 10, 2, 3e12, 60.0)["mfu"] == 0.5
    assert utilisation.rates(100.0, 10, 2, None, 60.0) == {"images_per_sec_per_chip": 50.0}


def test_xla_counts_a_loop_body_once_and_the_loop_factor_corrects_it():
    """The reason for ``loop_factor``: a scan of k matmuls costs k times one, but XLA's count of
    the compiled loop is one body's (checked here against XLA's count of one matmul)."""
    w = jnp.ones((64, 64))

    def body(carry, x):
        return carry + jnp.sum(x @ w), None

    def looped(x):
        return jax.lax.scan(body, 0.0, x)[0]

    one = utilisation.compiled_flops(jax.jit(lambda x: x @ w).lower(jnp.ones((32, 64))).compile())
    x = jnp.ones((4, 32, 64))
    counted = utilisation.compiled_flops(jax.jit(looped).lower(x).compile())
    assert counted == pytest.approx(one, rel=0.02)  # one body, not four
    assert utilisation.loop_factor(looped, x) == 4.0
    assert utilisation.loop_factor(lambda x: x @ w, jnp.ones((32, 64))) == 1.0
    # Unrolled (train/accum.py does so on a CPU), XLA counts every copy it compiled.
    for unroll, copies in ((True, 4), (2, 2)):
        scanned = lambda x, unroll=unroll: jax.lax.scan(body, 0.0, x, unroll=unroll)[0]  # noqa: E731
        counted = utilisation.compiled_flops(jax.jit(scanned).lower(x).compile())
        assert counted == pytest.approx(copies * one, rel=0.02), unroll
        assert utilisation.loop_factor(scanned, x) == 4 / copies


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_goodput_charges_every_second_to_one_part_and_adds_to_the_previous_run():
    clock = _Clock()
    g = goodput.Goodput(previous={"goodput/productive_s": 10.0, "goodput/redone_steps": 2}, clock=clock)
    clock.now = 3.0  # start-up
    g.switch("input_wait")
    clock.now = 3.5
    g.switch("productive")
    clock.now = 9.5  # first step: 5 s of it compiling
    g.move(5.0, "compile")
    with g.part("eval"):
        clock.now = 11.5
    clock.now = 12.0
    t = g.totals()
    assert t["goodput/startup_s"] == 3.0 and t["goodput/input_wait_s"] == 0.5
    assert t["goodput/compile_s"] == 5.0 and t["goodput/eval_s"] == 2.0
    assert t["goodput/productive_s"] == 10.0 + 1.0 + 0.5  # the previous run's, then 9.5 - 3.5 - 5 and 0.5
    assert t["goodput/wall_s"] == 10.0 + 12.0 and t["goodput/redone_steps"] == 2
    assert t["goodput/fraction"] == pytest.approx(11.5 / 22.0)
    assert g.input_wait_fraction() == pytest.approx(0.5 / 2.0)  # of the time in the step loop
    assert goodput.summary_line(t) == (
        "52.3% productive of 22.0 s (2 step(s) redone); "
        "compile 5.0 s, input wait 0.5 s, eval 2.0 s, startup 3.0 s"
    )


def test_goodput_of_a_killed_run_is_its_last_logged_totals():
    records = [
        {"step": 1, "split": "train", "compile_time_s": 1.0},
        {"step": 5, "split": "train", "loss": 1.0, "goodput/wall_s": 5.0, "goodput/productive_s": 2.0},
        {"step": 5, "split": "eval", "loss": 1.0},
        {"step": 10, "split": "train", "loss": 1.0, "goodput/wall_s": 9.0, "goodput/productive_s": 4.0},
    ]
    previous, furthest = goodput.from_metrics(records)
    assert furthest == 10 and previous == {"goodput/wall_s": 9.0, "goodput/productive_s": 4.0}
    assert goodput.from_metrics([]) == (None, 0)


def test_goodput_file_is_what_a_resume_reads_and_the_records_are_the_fallback(tmp_path):
    records = [{"step": 10, "split": "train", "loss": 1.0, "goodput/wall_s": 9.0}]
    assert goodput.load(str(tmp_path), records) == ({"goodput/wall_s": 9.0}, 10)  # a workdir from before
    goodput.save(str(tmp_path), {"goodput/wall_s": 12.5, "goodput/redone_steps": 3}, 14)
    assert goodput.load(str(tmp_path), records) == ({"goodput/wall_s": 12.5, "goodput/redone_steps": 3}, 14)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["goodput.json"]  # replaced whole, nothing left
    (tmp_path / "goodput.json").write_text("{not json")
    assert goodput.load(str(tmp_path), records) == ({"goodput/wall_s": 9.0}, 10)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"peak_tflops": -1.0}, "config.peak_tflops must be >= 0"),
        ({"profile_num_steps": -2}, "config.profile_num_steps must be >= 0"),
        ({"num_slices": -1}, "config.num_slices must be >= 0"),
        ({"profile_num_steps": 2, "profile_start_step": 0}, "config.profile_start_step must be >= 1"),
    ],
)
def test_bad_fields_are_one_line(fields, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate_config(tiny_config(**fields), device_count=1, process_count=1)
    assert "\n" not in str(e.value)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int


def _two_slices():
    """2 slices of 2 hosts of 2 chips; ids as a TPU pod numbers them, processes not in slice order."""
    return [
        FakeDevice(id=s * 100 + c, process_index=(1 - s) * 2 + c // 2, slice_index=s)
        for s in range(2)
        for c in range(4)
    ]


def test_multislice_order_is_slice_major_then_host_contiguous():
    devices = _two_slices()
    shuffled = random.Random(0).sample(devices, len(devices))
    ordered = slice_major_order(shuffled, num_slices=2)
    assert ordered == slice_major_order(shuffled)  # num_slices=0: from slice_index
    assert [d.slice_index for d in ordered] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.process_index for d in ordered] == [2, 2, 3, 3, 0, 0, 1, 1]  # each host contiguous
    assert [d.id for d in ordered] == [0, 1, 2, 3, 100, 101, 102, 103]


@pytest.mark.parametrize(
    "devices, num_slices, message",
    [
        (_two_slices(), 3, "num_slices=3 but the devices form 2 slices"),
        (_two_slices()[:6], 0, "different device counts"),
        ([FakeDevice(i, 0, 0) for i in range(6)], 4, "num_slices=4 does not divide the 6 devices"),
    ],
)
def test_multislice_mismatch_is_one_line(devices, num_slices, message):
    with pytest.raises(ValueError, match=message):
        slice_major_order(devices, num_slices)


def test_num_slices_the_devices_cannot_form_is_one_line():
    from train import parallel

    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"num_slices={n + 1} does not divide the {n} devices"):
        parallel.make_driver("jit", num_slices=n + 1)
    with pytest.raises(ValueError, match="num_slices > 1 needs config.parallelism='jit'"):
        parallel.make_driver("pmap", num_slices=2)
    assert parallel.make_driver("jit", num_slices=1).num_devices == n
