"""benchmarks.train_step, benchmarks.input_pipeline and train.compile_cache on tiny configurations (CPU).

Timings are only checked for consistency (images/s = batch / median step time), never against
targets: those are in BENCHMARKS.md.
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import resnet_jax  # noqa: E402
from benchmarks import step_cache, step_flops  # noqa: E402
from benchmarks.minimal_resnet import minimal_resnet  # noqa: E402
from train import compile_cache  # noqa: E402

# Two one-block stages, 3x3 stem, 16x16 inputs, 10 classes: compiles in seconds.
TINY = [
    "--arch=resnet18",
    "--stage-sizes=1,1",
    "--small-stem",
    "--image-size=16",
    "--num-classes=10",
    "--dtype=float32",
]
# Its forward multiply-accumulates, counted by hand (output pixels x out ch x in ch x k x k):
TINY_MACS = (
    16 * 16 * 64 * 3 * 9  # stem 3x3, 3 -> 64
    + 2 * 16 * 16 * 64 * 64 * 9  # layer1: two 3x3, 64 -> 64 at 16x16
    + 8 * 8 * 128 * 64 * 9  # layer2 conv1: 3x3 stride 2, 64 -> 128, out 8x8
    + 8 * 8 * 128 * 128 * 9  # layer2 conv2: 3x3, 128 -> 128
    + 8 * 8 * 128 * 64  # layer2 downsample: 1x1 stride 2, 64 -> 128
    + 128 * 10  # fc
)
assert TINY_MACS == 33_998_080


def _run(module: str, *args: str, timeout: int = 300, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def hand_macs(arch: str, size: int, num_classes: int = 1000, small_stem: bool = False) -> int:
    """Forward MACs of a torchvision-layout ResNet from its layer list, written out by shape."""
    preset = resnet_jax.PRESETS[arch]
    groups = preset.get("groups", 1)
    width_per_group = preset.get("width_per_group", 64)
    bottleneck = preset.get("block", "bottleneck") == "bottleneck"

    def conv(out_hw, cin, cout, k, g=1):
        return out_hw * out_hw * cout * (cin // g) * k * k

    if small_stem:
        hw, macs = size, conv(size, 3, 64, 3)
    else:
        hw = (size + 6 - 7) // 2 + 1
        macs = conv(hw, 3, 64, 7)
        hw = (hw + 2 - 3) // 2 + 1  # max-pool
    cin = 64
    for i, n in enumerate(preset["stage_sizes"]):
        planes = 64 * 2**i
        cout = planes * 4 if bottleneck else planes
        width = int(planes * width_per_group / 64) * groups
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            out_hw = (hw + 2 - 3) // stride + 1
            if bottleneck:
                macs += conv(hw, cin, width, 1)
                macs += conv(out_hw, width, width, 3, groups)
                macs += conv(out_hw, width, cout, 1)
            else:
                macs += conv(out_hw, cin, planes, 3) + conv(out_hw, planes, planes, 3)
            if stride != 1 or cin != cout:
                macs += conv(out_hw, cin, cout, 1)
            hw, cin = out_hw, cout
    return macs + cin * num_classes


# ----------------------------------------------------------------------------------------------
# FLOP counting.


@pytest.mark.parametrize(
    "arch,size,small_stem",
    [("resnet50", 224, False), ("resnet18", 32, True), ("resnext50_32x4d", 224, False)],
)
def test_forward_macs_match_hand_count(arch, size, small_stem):
    model = resnet_jax.get_model(arch, small_stem=small_stem)
    assert step_flops.forward_macs_per_image(model, size) == hand_macs(arch, size, 1000, small_stem)


def test_resnet50_flops_are_the_usual_figure():
    macs = step_flops.forward_macs_per_image(resnet_jax.resnet50(), 224)
    assert macs == 4_089_184_256  # "about 4.1 GMAC"
    assert 24.4e9 < 6 * macs < 24.6e9  # "about 24.6 GFLOP per image for a training step"


def test_minimal_resnet_is_the_same_architecture():
    for arch, small_stem in (("resnet50", False), ("resnet18", True)):
        lib = resnet_jax.get_model(arch, num_classes=10, small_stem=small_stem)
        mini = minimal_resnet(arch, num_classes=10, small_stem=small_stem)
        assert step_flops.forward_macs_per_image(mini, 64) == step_flops.forward_macs_per_image(lib, 64)
    with pytest.raises(ValueError, match="no 'resnext50_32x4d'"):
        minimal_resnet("resnext50_32x4d")


def test_peak_table():
    assert step_flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert step_flops.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert step_flops.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert step_flops.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert step_flops.peak_tflops("cpu", "float32") is None


def test_benchmark_imports_neither_tensorflow_nor_torch():
    # The GPU machine has jax, flax, optax, orbax, chex, torch, torchvision: nothing else may be
    # needed, and torch only once --compare-torch asks for it.
    others = ("tensorflow", "tensorflow_datasets", "ml_collections", "sklearn", "torch", "orbax")
    code = f"import sys, benchmarks.train_step; print(sorted(m for m in {others!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# The CLI: library, minimal model, NNX model and PyTorch in one run.


def test_cli_library_minimal_nnx_and_torch_in_one_run():
    # One test, not a module fixture: pytest-xdist would run a shared fixture once per worker.
    args = [*TINY, "--batch=4", "--steps=2", "--warmup=1", "--rounds=2", "--peak-tflops=2.0"]
    r = _run(
        "benchmarks.train_step",
        *args,
        "--compare-torch",
        "--compare-minimal",
        "--compare-nnx",
        "--no-compilation-cache",
    )

    assert r["config"]["stage_sizes"] == [1, 1] and r["config"]["batch"] == 4
    assert r["environment"]["backend"] == "cpu" and r["environment"]["jax"]
    flops = r["flops"]
    assert flops["forward_macs_per_image"] == TINY_MACS
    assert flops["train_flops_per_step"] == 3 * 2 * TINY_MACS * 4
    # XLA's independent count also includes BatchNorm and element-wise work; same ballpark.
    assert 0.5 < flops["xla_cost_analysis_flops_per_step"] / flops["train_flops_per_step"] < 2.0
    for name in ("jax", "minimal", "torch", "nnx", "nnx_jit"):
        s = r[name]
        times = s["step_times_s"]
        assert len(times) == 2 * 2  # steps x rounds
        assert all(t > 0 for t in times)
        assert s["step_time_s"] == pytest.approx(statistics.median(times))
        assert s["images_per_s"] == pytest.approx(4 / s["step_time_s"])
        tflops = flops["train_flops_per_step"] / s["step_time_s"] / 1e12
        assert s["achieved_tflops"] == pytest.approx(tflops)
        assert s["mfu"] == pytest.approx(s["achieved_tflops"] / 2.0)

    lib = r["jax"]
    assert lib["compile_time_s"] == pytest.approx(lib["lower_time_s"] + lib["xla_compile_time_s"])
    assert lib["xla_compile_time_s"] > 0 and lib["donate_state"] is True
    assert lib["peak_memory_bytes"] is None  # the CPU backend keeps no allocator statistics
    assert "compilation_cache" not in lib

    # PyTorch: same batch, eager on CPU (torch.compile defaults to CUDA only), float32.
    t = r["torch"]
    assert "error" not in t, t
    assert t["device"] == "cpu" and t["mode"] == "eager"
    assert t["channels_last"] is True and t["autocast"] is None
    assert t["model"].startswith("resnet_jax.torch_reference")
    ratio = r["ratios"]["jax_over_torch_images_per_s"]
    assert ratio == pytest.approx(lib["images_per_s"] / t["images_per_s"])

    # The minimal hand-written model: same architecture, timed in the same run.
    mini = r["minimal"]
    assert mini["num_params"] == lib["num_params"]
    assert mini["forward_macs_per_image"] == lib["forward_macs_per_image"] == TINY_MACS
    ratio = r["ratios"]["library_over_minimal_images_per_s"]
    assert ratio == pytest.approx(lib["images_per_s"] / mini["images_per_s"])

    # The NNX twin of the same model with nnx.Optimizer: split + jax.jit, and nnx.jit.
    for name, how in (("nnx", "jax.jit"), ("nnx_jit", "nnx.jit")):
        entry = r[name]
        assert entry["num_params"] == lib["num_params"] and how in entry["step"]
        ratio = r["ratios"][f"{name}_over_linen_images_per_s"]
        assert ratio == pytest.approx(entry["images_per_s"] / lib["images_per_s"])


def test_maxpool_and_bn_fused_contenders_step_as_the_library():
    """``--compare-maxpool-xla``: that contender's compiled step has XLA's select_and_scatter while
    the library's (on a CPU, the first-maximum selects of ``ops.max_pool_3x3_first_max``) and
    ``--compare-maxpool-elementwise``'s (a custom VJP) have none; each swap is undone after its
    compile, and one step of each from the same state and batch gives the same parameters (the
    pool's gradient differs only in the order overlapping windows add). ``--compare-bn-fused``:
    the library's model with ``bn_fused=True``, whose step also gives the same parameters and
    running statistics."""
    import chex

    from benchmarks import step_run, train_step
    from resnet_jax import ops

    library_pool = ops.max_pool_3x3
    args = train_step.parse_args(
        ["--arch=resnet18", "--stage-sizes=1,1", "--image-size=32", "--num-classes=10", "--dtype=float32"]
        + ["--batch=4", "--warmup=1", "--compare-maxpool-xla", "--compare-maxpool-elementwise"]
        + ["--compare-bn-fused", "--no-compilation-cache"]
    )
    library, xla_pooled, pooled, fused = step_run.build_contenders(args, "cpu")
    assert xla_pooled.name == "jax_maxpool_xla" and pooled.name == "jax_maxpool_elementwise"
    assert pooled.model is library.model and xla_pooled.model is library.model
    assert fused.name == "jax_bn_fused" and fused.model == library.model.clone(bn_fused=True)
    for contender in (library, xla_pooled, pooled, fused):
        contender.prepare()  # builds, compiles and runs one step (warmup=1) from the seeded state
    chex.assert_trees_all_close(fused.state.params, library.state.params, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(fused.state.batch_stats, library.state.batch_stats, rtol=1e-5, atol=1e-6)
    assert ops.max_pool_3x3 is library_pool
    # XLA's max-pool gradient is a select_and_scatter (the CPU backend rewrites it as a scatter).
    scatter = re.compile(r" (select-and-scatter|scatter)\(")
    assert scatter.search(xla_pooled.step.as_text())
    assert not scatter.search(library.step.as_text())
    assert not scatter.search(pooled.step.as_text())
    for other in (xla_pooled, pooled):
        chex.assert_trees_all_close(other.state.params, library.state.params, rtol=1e-4, atol=1e-6)
    # The step really moved the stem (a wrong gradient there would show above).
    stem = jax.tree.leaves(library.state.params["conv1"])[0]
    assert float(jnp.abs(stem).max()) > 0


def test_ynn_contender_compiles_with_ynnpack_and_steps_as_the_library():
    """``--compare-ynn``: the library's step compiled with YNNPACK's fusions as a per-compile
    option (jax 0.10's own default, in the same process as the library's without), tracing the
    per-tap weight gradient as a YNNPACK process would; one step gives the same parameters."""
    import chex

    from benchmarks import step_run, train_step
    from resnet_jax import conv_grad

    args = train_step.parse_args(
        ["--arch=resnet18", "--stage-sizes=1,1", "--image-size=32", "--num-classes=10", "--dtype=float32"]
        + ["--batch=4", "--warmup=1", "--compare-ynn=INDIVIDUAL_DOT,INDIVIDUAL_CONVOLUTION"]
        + ["--no-compilation-cache"]
    )
    before = os.environ.get(conv_grad.ENV_VAR)
    library, ynn = step_run.build_contenders(args, "cpu")
    assert ynn.name == "jax_ynn_individual_dot,individual_convolution" and ynn.model is library.model
    library.prepare()
    info = ynn.prepare()
    assert info["compiler_options"] == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    }
    assert "__ynn_fusion" in ynn.step.as_text()
    if not conv_grad.ynn_convolutions():  # this process started without YNNPACK
        assert "__ynn_fusion" not in library.step.as_text()
    assert os.environ.get(conv_grad.ENV_VAR) == before  # the per-tap switch is undone after its trace
    chex.assert_trees_all_close(ynn.state.params, library.state.params, rtol=1e-4, atol=1e-6)


def test_cli_rejects_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--stage-sizes=0,1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "positive integers" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Persistent compilation cache.


def test_measure_cache_cold_then_warm():
    r = _run("benchmarks.train_step", *TINY, "--batch=4", "--measure-cache", "--compare-torch")
    cold, warm = r["cold"], r["warm"]
    assert cold["step_was_cached"] is False and cold["cache_entries_after"] > 0
    # The second process found every executable in the cache and wrote nothing new.
    assert warm["step_was_cached"] is True
    assert warm["cache_entries_after"] == cold["cache_entries_after"]
    assert r["compile_speedup"] == pytest.approx(cold["compile_time_s"] / warm["compile_time_s"])


def test_cache_dir_resolution(monkeypatch, tmp_path):
    import jax

    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    default = os.path.expanduser(os.path.join("~", ".cache", "resnet_jax", "xla"))
    assert compile_cache.resolve_cache_dir() == default
    assert compile_cache.resolve_cache_dir(None) == default
    assert compile_cache.resolve_cache_dir(str(tmp_path)) == str(tmp_path)
    suite_cache = jax.config.jax_compilation_cache_dir  # conftest.py's, through the environment
    try:
        for off in ("", "off", "None"):
            jax.config.update("jax_compilation_cache_dir", str(tmp_path / "on"))
            assert compile_cache.resolve_cache_dir(off) is None
            assert compile_cache.enable_compilation_cache(off) is None
            assert jax.config.jax_compilation_cache_dir is None  # off, whoever had turned it on
    finally:
        jax.config.update("jax_compilation_cache_dir", suite_cache)
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir("auto") == str(tmp_path / "env")
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir() is None


def test_strip_flags():
    argv = ["--arch=resnet18", "--steps", "5", "--compare-torch", "--output=x.json", "--batch", "8"]
    out = step_cache._strip_flags(argv, {"--compare-torch"}, {"--steps", "--output"})
    assert out == ["--arch=resnet18", "--batch", "8"]


# ----------------------------------------------------------------------------------------------
# Input pipeline.


def test_input_benchmark_on_a_few_jpegs(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from benchmarks import input_pipeline as benchmark_input
    from benchmarks import input_workers as benchmark_workers
    from train.data import core

    jpegs = benchmark_input.write_jpegs(str(tmp_path), 4)
    assert len(list(tmp_path.glob("*.jpg"))) == 4
    assert jpegs["count"] == 4 and 300 <= jpegs["mean_height"] <= 500
    assert 0.3 < jpegs["mean_bytes_per_pixel"] < 1.5  # photo-like, neither flat nor pure noise

    # The training preprocessing itself: stateless (a function of the seed), uint8 pixels.
    data = tf.constant((tmp_path / "img_00000.jpg").read_bytes())
    fn = benchmark_workers.training_preprocess_fn(48)
    seed = tf.constant([3, 7], tf.int64)
    a = fn(data, seed).numpy()
    b = fn(data, seed).numpy()
    c = fn(data, tf.constant([3, 8], tf.int64)).numpy()
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert (a == b).all() and not (a == c).all()
    # The benchmark's copy of those ops matches the pipeline exactly; its variants differ.
    replica = benchmark_workers.variant_preprocess_fn("replica", 48)
    assert (replica(data, seed).numpy() == a).all()
    # Host-normalised float32 (the old output) equals the uint8 pixels normalised later, up to
    # rounding the resized pixels (0.5 / std).
    floats = benchmark_workers.variant_preprocess_fn("float_out", 48)(data, seed).numpy()
    info = core.DatasetInfo("x", 1, (48, 48, 3), 0, 0, (), core.IMAGENET_MEAN, core.IMAGENET_STD)
    diff = np.abs(core.normalize_pixels(a, info) - floats)
    assert floats.dtype == np.float32 and diff.max() <= 0.5 / min(core.IMAGENET_STD) + 1e-5
    assert diff.max() > 0  # the pixels really were rounded, not compared with themselves

    # The CLI on those files, in a worker process pinned to one core.
    args = ["--image-size=32", "--batch=2", "--total-images=8", "--cores=1", "--model-rate=1000"]
    r = _run("benchmarks.input_pipeline", *args, f"--jpeg-dir={tmp_path}")
    assert r["jpegs"]["count"] == 4  # used the existing files
    (run,) = r["runs"]
    assert run["cores"] == 1 and run["threads"] == 1 and run["images"] == 8
    assert run["output_shape"] == [2, 32, 32, 3] and run["output_dtype"] == "uint8"
    assert run["images_per_s"] == pytest.approx(8 / run["seconds"])
    assert r["images_per_s_per_core"] == run["images_per_s_per_core"] > 0
    assert r["cores_to_feed_model_rate"] == math.ceil(1000 / r["images_per_s_per_core"])
    assert run["cpu_seconds"] >= 0  # this process's CPU time over the timed batches

    # The Grain variants: simplejpeg decodes the JPEGs, or (grain_pillow) it is hidden from the
    # worker process, and Pillow does; neither imports TensorFlow. --grain-workers=-1 is the
    # training default: no worker process on one core. work_only times the per-image work alone.
    r = _run(
        "benchmarks.input_pipeline",
        *args,
        "--variants=grain,grain_pillow,work_only",
        "--grain-workers=-1",
        f"--jpeg-dir={tmp_path}",
    )
    *grain_runs, alone = r["runs"]
    assert [run["jpeg_decoder"] for run in grain_runs] == ["simplejpeg", "pillow"]
    for run in grain_runs:
        assert run["output_shape"] == [2, 32, 32, 3] and run["tensorflow_imported"] is False
        assert run["grain_workers"] == 0
    assert alone["variant"] == "work_only" and alone["processes"] == 1 and alone["images"] == 8
    assert alone["output_shape"] == [1, 32, 32, 3] and alone["cpu_seconds"] > 0

    # The per-stage profile of the folder pipeline on the same files: every stage timed, and the
    # whole preprocessing costs more than its resize alone.
    p = _run("benchmarks.folder_profile", f"--jpeg-dir={tmp_path}", "--rounds=1", "--per-round=2")
    ms = {name: v["median"] for name, v in p["ms_per_image"].items()}
    assert {"decode_pillow", "decode_simplejpeg", "resize_antialiased", "tf_decode_and_crop"} <= set(ms)
    assert ms["train_image_simplejpeg"] > ms["resize_antialiased"] > 0
    assert p["files"] == 4 and 0.08 <= p["mean_crop_area_fraction"] <= 1.0


def test_augment_input_times_ours_and_the_references_alternating(tmp_path):
    """``benchmarks.augment_input`` on four small JPEGs: both recipes, both sides, two rounds on
    one pinned core; every run makes the images it was asked for, at the recipe's size (ours
    HWC, the references' CHW, both normalised float32), and the summary is computed from them."""
    pytest.importorskip("grain")
    from PIL import Image

    from benchmarks import augment_input

    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (40 + 4 * i, 52, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img_{i}.jpg", quality=90)
    recipes = ["ta_wide", "rand-m9-mstd0.5-inc1"]
    args = ["--cores=1", "--rounds=2", "--batch=2", "--total-images=4", "--image-size=32"]
    r = _run("benchmarks.augment_input", *args, "--warmup-batches=1", f"--jpeg-dir={tmp_path}")
    assert r["jpegs"]["count"] == 4 and r["config"]["images_per_run"] == 4
    assert {"torch", "torchvision", "timm", "grain"} <= set(r["environment"])
    runs = r["runs"]
    sides = [(run["round"], run["recipe"], run["variant"]) for run in runs]
    assert sides == [
        (0, recipes[0], "ours"),
        (0, recipes[0], "torchvision"),
        (0, recipes[1], "ours"),
        (0, recipes[1], "timm"),
        (1, recipes[0], "torchvision"),  # the other side first in the next round
        (1, recipes[0], "ours"),
        (1, recipes[1], "timm"),
        (1, recipes[1], "ours"),
    ]
    for run in runs:
        assert run["cores"] == 1 and run["images"] == 4 and run["output_dtype"] == "float32"
        if run["variant"] == "ours":
            assert run["output_shape"] == [2, 32, 32, 3] and run["workers"] == 0  # the 1-core default
            assert run["auto_augment"] == run["recipe"] and run["random_erase_prob"] == 0.1
        else:
            assert run["output_shape"] == [2, 3, 32, 32] and run["workers"] == 1
    assert list(r["recipes"]) == recipes
    for recipe in recipes:
        summary = r["recipes"][recipe]
        ref = summary["reference"]
        assert ref == ("timm" if recipe.startswith("rand-") else "torchvision")
        row = summary["1 core(s)"]
        pairs = [
            {
                run["variant"]: run["images_per_s"]
                for run in runs
                if run["recipe"] == recipe and run["round"] == k
            }
            for k in (0, 1)
        ]
        assert row["ours_images_per_s"] == pytest.approx(
            statistics.median(p["ours"] for p in pairs), abs=1e-3
        )
        assert row[f"{ref}_images_per_s"] == pytest.approx(statistics.median(p[ref] for p in pairs), abs=1e-3)
        ratio = statistics.median(p["ours"] / p[ref] for p in pairs)
        assert row[f"ours_over_{ref}"] == pytest.approx(ratio, abs=1e-3)
        assert row["cores_for_model_rate"] == math.ceil(7000 / row["ours_images_per_s_per_core"])
        assert summary["cores_one_accelerator_needs"] == row["cores_for_model_rate"]
    with pytest.raises(SystemExit):
        augment_input.parse_args(["--recipes=ta_wide,rand_m9"])


def test_grain_threads_accounts_for_every_thread(tmp_path):
    pytest.importorskip("grain")
    from benchmarks.input_pipeline import write_jpegs

    write_jpegs(str(tmp_path), 4)
    r = _run("benchmarks.grain_threads", f"--jpeg-dir={tmp_path}", "--workers=1", "--batches=4", "--batch=4")
    assert r["workers"] == 1 and r["images"] == 16
    cpu = r["cpu_ms_per_image"]
    for role, threads in cpu["per_thread"].items():
        assert sum(threads) == pytest.approx(cpu["per_process"][role], abs=1e-3)
    assert cpu["total"] == pytest.approx(sum(cpu["per_process"].values()), abs=1e-3)
    # The one Grain worker decodes every image: a child process doing at least the work alone's
    # half (its timer ticks at 10 ms over 16 images), while this process only receives batches.
    busy = [ms for role, ms in cpu["per_process"].items() if role.startswith("child_")]
    assert max(busy) > 0.5 * cpu["work_alone"] > 0
    assert cpu["per_process"].get("consumer", 0) < max(busy)
    assert cpu["overhead"] == pytest.approx(cpu["total"] - cpu["work_alone"], abs=1e-3)
    assert set(r["handoff_ms_per_image"]) == {"new_segment", "reused_memory"}


def test_train_image_threads_times_both_inputs_in_alternating_rounds(tmp_path):
    from benchmarks.input_pipeline import write_jpegs

    write_jpegs(str(tmp_path), 4)
    r = _run("benchmarks.train_image_threads", f"--jpeg-dir={tmp_path}", "--rounds=2", "--images=4")
    assert r["files"] == 4 and r["threads"] == 2 and len(r["rounds"]) == 2
    # Alternating order: the first timing of a round is the other input in the next round.
    assert [next(iter(row)) for row in r["rounds"]] == ["bytes_1t", "pillow_open_1t"]
    rates = r["median_images_per_s"]
    assert set(rates) == {f"{k}_{n}t" for k in ("bytes", "pillow_open") for n in (1, 2)}
    assert all(v > 0 for v in rates.values())
    ratios = r["median_ratios"]
    want = sorted(r["rounds"][i]["bytes_2t"] / r["rounds"][i]["pillow_open_2t"] for i in range(2))
    assert ratios["bytes_over_pillow_open_2t"] == pytest.approx(sum(want) / 2, abs=2e-3)


def test_handoff_copies_the_batch_and_leaves_no_segment():
    """What ``handoff`` times really moves the bytes: a segment made by ``copy_to_shm`` holds the
    batch, and the unlink removes it from /dev/shm."""
    pytest.importorskip("grain")
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this system: Grain's segments live elsewhere")
    import numpy as np
    from grain._src.python.ipc import shared_memory_array

    from benchmarks.grain_threads import handoff

    x = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    meta = shared_memory_array.copy_to_shm(x, min_size=0)
    seg = shared_memory_array.SharedMemoryArray.from_metadata(meta)
    np.testing.assert_array_equal(np.asarray(seg), x)
    path = f"/dev/shm/{meta.name.lstrip('/')}"
    assert os.path.exists(path)
    del seg
    shared_memory_array.unlink_shm(meta)
    assert not os.path.exists(path)
    ms = handoff(2, size=8, repeats=3)
    assert ms["new_segment"] > 0 and ms["reused_memory"] >= 0


def test_input_scaling_table():
    from benchmarks.input_pipeline import scaling

    runs = [
        {"variant": "grain", "cores": 1, "images_per_s": 500.0},
        {"variant": "grain", "cores": 1, "images_per_s": 520.0},
        {"variant": "grain", "cores": 1, "images_per_s": 400.0},  # median of three: 500
        {"variant": "work_only", "cores": 1, "images_per_s": 550.0},
        {"variant": "grain", "cores": 4, "images_per_s": 1800.0},
        {"variant": "grain", "cores": 4, "images_per_s": 1900.0},  # median of two: 1850
        {"variant": "work_only", "cores": 4, "images_per_s": 2090.0},
    ]
    table = scaling(runs)
    assert table["1 core(s)"] == {
        "grain_images_per_s": 500.0,
        "grain_scaling": 1.0,
        "work_only_images_per_s": 550.0,
        "work_only_scaling": 1.0,
        "grain_over_work_only": 0.909,
    }
    assert table["4 core(s)"]["grain_scaling"] == 3.7 and table["4 core(s)"]["work_only_scaling"] == 3.8
    assert table["4 core(s)"]["grain_over_work_only"] == 0.885


def test_input_scaling_table_keeps_other_worker_counts_apart():
    from benchmarks.input_pipeline import scaling

    # Defaults: no workers on 1 and 2 cores, one per core from 3 (train.data.image_folder).
    runs = [
        {"variant": "grain", "cores": 4, "grain_workers": 0, "images_per_s": 1700.0},
        {"variant": "grain", "cores": 4, "grain_workers": 4, "images_per_s": 1900.0},
        {"variant": "grain", "cores": 1, "grain_workers": 0, "images_per_s": 500.0},
        {"variant": "grain", "cores": 1, "grain_workers": 1, "images_per_s": 450.0},
        {"variant": "grain", "cores": 2, "grain_workers": 0, "images_per_s": 950.0},
        {"variant": "work_only", "cores": 4, "images_per_s": 2000.0},
    ]
    table = scaling(runs)
    assert list(table) == ["1 core(s)", "2 core(s)", "4 core(s)"]
    assert table["1 core(s)"] == {
        "grain_images_per_s": 500.0,
        "grain_scaling": 1.0,
        "grain_1_workers_images_per_s": 450.0,
        "grain_1_workers_scaling": 0.9,
        "grain_1_workers_over_grain": 0.9,
    }
    assert table["2 core(s)"]["grain_scaling"] == 1.9
    four = table["4 core(s)"]
    assert four["grain_images_per_s"] == 1900.0 and four["grain_scaling"] == 3.8  # 4 workers
    assert four["grain_in_process_scaling"] == 3.4 and four["grain_in_process_over_grain"] == 0.895
    assert four["grain_over_work_only"] == 0.95 and four["work_only_scaling"] == 1.0


def test_input_benchmark_without_tensorflow(tmp_path):
    """The GPU host has no TensorFlow: the benchmark writes its JPEGs with Pillow and times the
    Grain and work_only variants there, and the tf.data variant says what it needs."""
    pytest.importorskip("grain")
    from PIL import Image

    blocker = tmp_path / "no_tensorflow"
    blocker.mkdir()
    (blocker / "tensorflow.py").write_text("raise ImportError('hidden by the test: no TensorFlow here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
    jpegs = tmp_path / "jpegs"
    args = ["--image-size=32", "--batch=2", "--total-images=8", "--cores=1", "--num-images=3"]
    r = _run(
        "benchmarks.input_pipeline",
        *args,
        "--variants=grain,work_only",
        "--grain-workers=-1",
        f"--jpeg-dir={jpegs}",
        env=env,
    )
    assert r["jpegs"]["writer"] == "Pillow" and r["jpegs"]["count"] == 3
    assert 0.3 < r["jpegs"]["mean_bytes_per_pixel"] < 1.5  # photo-like, as TensorFlow's files
    for path in sorted(jpegs.glob("*.jpg")):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and 300 <= min(im.size) <= max(im.size) <= 500
    grain_run, alone = r["runs"]
    assert grain_run["tensorflow_imported"] is False and grain_run["output_shape"] == [2, 32, 32, 3]
    assert alone["variant"] == "work_only" and alone["images"] == 8
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.input_pipeline", *args, f"--jpeg-dir={jpegs}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "need TensorFlow" in proc.stderr and "--variants grain,work_only" in proc.stderr


def test_gpu_summary_reports_the_jax011_part(tmp_path):
    """``gpu_suite.sh ... jax011``'s results in the summary: the tests' exit status from
    steps.jsonl and each NNX parity verdict, failures named as failures."""
    import json

    from benchmarks import gpu_summary

    steps = [{"step": "jax011_tests", "exit": 1, "seconds": 80}, {"step": "nnx", "exit": 0, "seconds": 9}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "jax011_parity_resnet18.json").write_text(json.dumps({"ok": True, "worst": "logits"}))
    (tmp_path / "jax011_parity_labml.json").write_text(json.dumps({"ok": False, "worst": "grads"}))
    text = gpu_summary.summary(str(tmp_path))
    assert "tests/test_sharding.py tests/test_nnx.py: exit 1" in text
    assert "float64 resnet18: PASS, worst row logits" in text
    assert "float64 labml: FAIL, worst row grads" in text


def test_gpu_summary_reports_grain_scaling_and_the_in_process_rate(tmp_path):
    """``gpu_suite.sh ... grain``: a line per core count, from the ``scaling`` table that
    ``benchmarks.input_pipeline`` computes from its runs (here made up), with the in-process
    rate beside the default where both ran."""
    import json

    from benchmarks import gpu_summary
    from benchmarks.input_pipeline import scaling

    runs = [
        {"variant": "grain", "cores": 1, "grain_workers": 0, "images_per_s": 500.0},
        {"variant": "work_only", "cores": 1, "images_per_s": 520.0},
        {"variant": "grain", "cores": 4, "grain_workers": 4, "images_per_s": 1900.0},
        {"variant": "grain", "cores": 4, "grain_workers": 0, "images_per_s": 1710.0},
        {"variant": "work_only", "cores": 4, "images_per_s": 2000.0},
    ]
    (tmp_path / "grain.json").write_text(json.dumps({"scaling": scaling(runs)}))
    lines = gpu_summary.summary(str(tmp_path)).splitlines()
    one = next(x for x in lines if x.startswith("1 core(s):"))
    four = next(x for x in lines if x.startswith("4 core(s):"))
    assert "Grain 500 img/s (x1)" in one and "no workers" not in one
    assert "Grain 1900 img/s (x3.8)" in four and "Grain / work_only 0.95" in four
    assert "no workers (read threads) x0.9 the default" in four


def test_program_hash_is_the_same_for_the_same_program_and_differs_for_another():
    """The refactor check: a preset's fingerprint repeats; another architecture's differs."""
    from benchmarks import program_hash

    a, b = resnet_jax.get_model("resnet18", num_classes=10, stage_sizes=(1, 1)), None
    b = a.clone(stage_sizes=(1, 2))
    assert program_hash.linen_fingerprint(a, 32) == program_hash.linen_fingerprint(a.clone(), 32)
    assert program_hash.linen_fingerprint(a, 32) != program_hash.linen_fingerprint(b, 32)


def test_init_compile_times_every_generator_in_every_round(capsys):
    """benchmarks.init_compile: every generator compiled in each round, medians and ratios as its
    JSON says. The threefry form it sets last is put back (conftest.py chooses the suite's)."""
    import jax

    from benchmarks import init_compile

    before = jax.config.jax_threefry_partitionable
    try:
        r = init_compile.main(["--arch=resnet18", "--stage-sizes=1", "--image-size=16", "--rounds=2"])
    finally:
        jax.config.update("jax_threefry_partitionable", before)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(r))
    assert r["config"] == {"image_size": 16, "stage_sizes": [1], "rounds": 2}
    row = r["resnet18"]
    assert set(row["compile_s"]) == set(init_compile.GENERATORS)
    assert all(len(t) == 2 and min(t) > 0 for t in row["compile_s"].values())
    for g, m in row["median_s"].items():
        assert m == pytest.approx(statistics.median(row["compile_s"][g]))
        assert row["ratio_to_partitionable"][g] == pytest.approx(
            m / row["median_s"]["threefry_partitionable"]
        )
