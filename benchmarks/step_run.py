"""One run of ``python -m benchmarks.train_step``: build the contenders, prepare them, time them
in alternating rounds, and assemble the JSON result (step times, FLOPs and MFU, ratios, profile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import resnet_jax
from benchmarks.minimal_resnet import minimal_resnet
from benchmarks.report import host_environment
from benchmarks.step_common import OPTIMIZER_DESC, RECIPE_DROP_PATH_RATE, Contender, log
from benchmarks.step_flops import peak_tflops
from benchmarks.step_jax import (
    ElementwiseMaxPoolContender,
    JaxContender,
    NNXContender,
    RecipeContender,
    XlaConvGradContender,
    YnnContender,
    peak_memory_bytes,
)
from benchmarks.step_torch import TorchContender

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def environment() -> dict[str, Any]:
    """The host, the JAX stack's versions and the devices: the report's ``environment``."""
    import flax
    import jaxlib

    dev = jax.devices()[0]
    env = {
        **host_environment(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return env


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The model and batch being timed, as the JSON reports them."""
    return {
        "arch": args.arch,
        "batch": args.batch,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "num_classes": args.num_classes,
        "small_stem": args.small_stem,
        "stage_sizes": list(args.stage_sizes or resnet_jax.PRESETS[args.arch]["stage_sizes"]),
    }


def summarize_times(times: Sequence[float], batch: int, flops_per_step: float | None, peak: float | None):
    """Median step time and images/s of ``times``, with achieved TFLOP/s and MFU when counted."""
    median = statistics.median(times)
    out: dict[str, Any] = {
        "images_per_s": batch / median,
        "step_time_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "timed_steps": len(times),
    }
    if flops_per_step:
        tflops = flops_per_step / median / 1e12
        out["achieved_tflops"] = tflops
        out["mfu"] = tflops / peak if peak else None
    return out


def build_contenders(args: argparse.Namespace, backend: str) -> list[Contender]:
    """The library's step first, then each comparison the flags ask for."""
    common = dict(num_classes=args.num_classes, small_stem=args.small_stem, dtype=DTYPES[args.dtype])
    if args.stage_sizes:
        common["stage_sizes"] = args.stage_sizes

    # Library-only options (experiments); the minimal ResNet gets the plain architecture.
    options: dict[str, Any] = {"bn_variance": args.bn_variance}
    if args.bn_recompute:
        options["bn_recompute"] = True
    if args.stem_pad_channels:
        options["stem_pad_channels"] = args.stem_pad_channels
    library = resnet_jax.get_model(args.arch, **common, **options)
    contenders: list[Contender] = [JaxContender("jax", library, args)]
    if args.compare_minimal:
        contenders.append(JaxContender("minimal", minimal_resnet(args.arch, **common), args))
    if args.compare_nnx:
        contenders.append(NNXContender("nnx", library, args, functional=True))
        contenders.append(NNXContender("nnx_jit", library, args, functional=False))
    if args.compare_bn_two_pass:
        two_pass = resnet_jax.get_model(args.arch, **common, **{**options, "bn_variance": "two_pass"})
        contenders.append(JaxContender("jax_bn_two_pass", two_pass, args))
    if args.compare_xla_conv_grad:
        contenders.append(XlaConvGradContender("jax_xla_conv_grad", library, args))
    for types in args.compare_ynn or []:
        contenders.append(YnnContender("jax_ynn_" + types.lower(), library, args, types.split(",")))
    if args.compare_maxpool_xla:
        contenders.append(ElementwiseMaxPoolContender("jax_maxpool_xla", library, args, "_max_pool_3x3_xla"))
    if args.compare_maxpool_elementwise:
        contenders.append(ElementwiseMaxPoolContender("jax_maxpool_elementwise", library, args))
    if args.compare_bn_fused:
        fused = resnet_jax.get_model(args.arch, **common, **{**options, "bn_fused": True})
        contenders.append(JaxContender("jax_bn_fused", fused, args))
    if args.compare_recipe:
        dropping = resnet_jax.get_model(args.arch, **common, **options, drop_path_rate=RECIPE_DROP_PATH_RATE)
        contenders.append(RecipeContender("jax_recipe", dropping, args, recipe=True))
    if args.compare_grad_accum > 1:
        name = f"jax_grad_accum_{args.compare_grad_accum}"
        contenders.append(
            RecipeContender(name, library, args, recipe=False, grad_accum_steps=args.compare_grad_accum)
        )
    if args.compare_torch:
        for mode in args.torch_compile_mode.split(","):
            contenders.append(TorchContender(args, backend, mode.strip()))
    return contenders


def prepare_all(
    contenders: Sequence[Contender], warmup: int
) -> tuple[dict[str, dict[str, Any]], list[Contender]]:
    """Prepare each contender: what each reports (or its error), and those that are ready.

    The library's step must prepare; any other contender that fails is reported and skipped.
    """
    infos: dict[str, dict[str, Any]] = {}
    ready: list[Contender] = []
    for c in contenders:
        log(f"preparing {c.name} (build, compile, {warmup} warm-up steps)")
        try:
            infos[c.name] = c.prepare()
            ready.append(c)
        except Exception as e:
            if c.name == "jax":
                raise
            log(f"{c.name} failed: {type(e).__name__}: {e}")
            infos[c.name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if c.name == "jax":
            # Right after the library's compile and warm-up, before anything else allocates.
            infos["jax"]["peak_memory_bytes"] = peak_memory_bytes()
        elif isinstance(c, JaxContender) and c.name in infos:
            # JAX keeps no per-executable peak: the process peak so far bounds this one's.
            infos[c.name]["process_peak_memory_bytes_so_far"] = peak_memory_bytes()
    return infos, ready


def time_rounds(ready: Sequence[Contender], steps: int, rounds: int) -> dict[str, list[float]]:
    """``steps`` timed steps of each contender per round, the order reversed every round."""
    times: dict[str, list[float]] = {c.name: [] for c in ready}
    order = list(ready)
    for r in range(rounds):
        for c in order:
            log(f"round {r + 1}/{rounds}: timing {steps} steps of {c.name}")
            times[c.name] += c.timed_steps(steps)
        order.reverse()
    return times


def flops_report(args: argparse.Namespace, jax_info: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """The counted FLOPs of one step (from the library's forward MACs) and the peak used for MFU."""
    macs = jax_info["forward_macs_per_image"]
    flops_img = 3 * 2 * macs
    return {
        "method": "analytic: conv + dense multiply-accumulates from the model's jaxpr; "
        "FLOPs = 2 x MACs; train step = 3 x forward",
        "forward_macs_per_image": macs,
        "forward_flops_per_image": 2 * macs,
        "train_flops_per_image": flops_img,
        "train_flops_per_step": flops_img * args.batch,
        "xla_cost_analysis_flops_per_step": jax_info.get("xla_flops_per_step"),
        "peak_tflops": peak,
        "peak_source": "--peak-tflops"
        if args.peak_tflops
        else ("PEAK_TFLOPS table" if peak else "unknown device: MFU is null"),
    }


def ratios(
    args: argparse.Namespace,
    result: dict[str, Any],
    times: dict[str, list[float]],
    ready: Sequence[Contender],
) -> dict[str, Any]:
    """Images/s of the library over each comparison timed in this run (null where not timed)."""

    def ratio(a: str, b: str) -> float | None:
        if a in times and b in times:
            return result[a]["images_per_s"] / result[b]["images_per_s"]
        return None

    torch_names = [c.name for c in ready if isinstance(c, TorchContender)]
    best_torch = max(torch_names, key=lambda n: result[n]["images_per_s"], default=None)
    out = {
        "jax_over_torch_images_per_s": ratio("jax", "torch") if args.compare_torch else None,
        "jax_over_best_torch_images_per_s": ratio("jax", best_torch) if best_torch else None,
        "best_torch": best_torch,
        "jax_over_best_torch_pipelined_images_per_s": (
            result["jax"]["pipelined_images_per_s"] / result[best_torch]["pipelined_images_per_s"]
        )
        if args.pipelined and best_torch and "pipelined_images_per_s" in result.get("jax", {})
        else None,
        "bn_shifted_over_two_pass_images_per_s": ratio("jax", "jax_bn_two_pass")
        if args.compare_bn_two_pass
        else None,
        "library_over_minimal_images_per_s": ratio("jax", "minimal") if args.compare_minimal else None,
        "maxpool_elementwise_over_xla_images_per_s": ratio("jax_maxpool_elementwise", "jax")
        if args.compare_maxpool_elementwise
        else None,
        "library_over_maxpool_xla_images_per_s": ratio("jax", "jax_maxpool_xla")
        if args.compare_maxpool_xla
        else None,
        "bn_fused_over_unfused_images_per_s": ratio("jax_bn_fused", "jax") if args.compare_bn_fused else None,
        "cpu_conv_grad_over_xla_images_per_s": ratio("jax", "jax_xla_conv_grad")
        if args.compare_xla_conv_grad
        else None,
        "nnx_over_linen_images_per_s": ratio("nnx", "jax") if args.compare_nnx else None,
        "nnx_jit_over_linen_images_per_s": ratio("nnx_jit", "jax") if args.compare_nnx else None,
        "recipe_over_plain_images_per_s": ratio("jax_recipe", "jax") if args.compare_recipe else None,
        "grad_accum_over_plain_images_per_s": ratio(f"jax_grad_accum_{args.compare_grad_accum}", "jax")
        if args.compare_grad_accum > 1
        else None,
        "note": "measured side by side in this one run"
        + (", contenders alternating" if args.rounds > 1 else ""),
    }
    if args.compare_torch and jax.device_count() > 1:
        # PyTorch runs on one device; compare like with like by hiding the others.
        out["warning"] = (
            f"JAX used {jax.device_count()} devices and PyTorch one; rerun with one visible device "
            "(e.g. CUDA_VISIBLE_DEVICES=0) for a per-device ratio"
        )
    return out


def profile(jax_c: JaxContender, profile_dir: str) -> dict[str, Any]:
    """Trace 5 steps of the library into ``profile_dir``; their summary by op (or the error)."""
    from benchmarks import profile_ops

    log(f"profiling 5 steps into {profile_dir}")
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        jax_c.timed_steps(5)
    try:
        return profile_ops.summarize(profile_dir, jax_c.step.as_text(), steps=5)
    except Exception as e:  # a trace format this parser does not know: keep the raw trace
        log(f"profile summary failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare and time every contender; the JSON result."""
    env = environment()
    log(f"{env['backend']} x{env['device_count']} ({env['device_kind']}), load {env['load_average']}")
    peak = args.peak_tflops or peak_tflops(env["device_kind"], args.dtype)
    contenders = build_contenders(args, env["backend"])

    result: dict[str, Any] = {
        "benchmark": "train_step",
        "config": {
            **model_config(args),
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "step": "train.steps.make_train_step via train.parallel.jit_train_step (mesh of all devices)",
            "optimizer": OPTIMIZER_DESC,
            "data": "synthetic, generated on device (float32 images, int32 labels)",
        },
        "environment": env,
        "command": "python -m benchmarks.train_step " + " ".join(sys.argv[1:]),
    }
    infos, ready = prepare_all(contenders, args.warmup)
    times = time_rounds(ready, args.steps, args.rounds)
    result["flops"] = flops_report(args, infos["jax"], peak)
    flops_per_step = result["flops"]["train_flops_per_step"]
    for c in contenders:
        entry = dict(infos[c.name])
        if c.name in times:
            entry.update(summarize_times(times[c.name], args.batch, flops_per_step, peak))
            entry["step_times_s"] = times[c.name]
        if isinstance(c, TorchContender) and c.name in times and c.device.type == "cuda":
            entry["peak_memory_bytes"] = int(c.torch.cuda.max_memory_allocated())
        result[c.name] = entry

    if args.pipelined:
        for c in ready:
            if c.name in times:
                t = c.pipelined(args.steps)
                result[c.name]["pipelined_step_time_s"] = t
                result[c.name]["pipelined_images_per_s"] = args.batch / t

    result["ratios"] = ratios(args, result, times, ready)
    for types in args.compare_ynn or []:  # the default (no YNNPACK) over each YNNPACK variant
        name = "jax_ynn_" + types.lower()
        if "images_per_s" in result.get(name, {}) and "images_per_s" in result.get("jax", {}):
            result["ratios"][f"default_over_{name}_images_per_s"] = (
                result["jax"]["images_per_s"] / result[name]["images_per_s"]
            )
    if hasattr(os, "getloadavg"):
        result["environment"]["load_average_end"] = list(os.getloadavg())
    if args.profile:
        result["profile_dir"] = args.profile
        result["profile"] = profile(ready[0], args.profile)
        for c in ready:
            if isinstance(c, TorchContender) and c.device.type == "cpu":
                from benchmarks import profile_torch

                log(f"profiling 5 steps of {c.name} with torch.profiler")
                result[f"profile_{c.name}"] = profile_torch.summarize(c._step, steps=5)
    return result
