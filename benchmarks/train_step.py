"""Training-step benchmark: ``python -m benchmarks.train_step --arch resnet50 --batch 256 --dtype bfloat16``.

Times the training program's own step (``train.steps.make_train_step`` compiled by
``train.parallel.jit_train_step`` over a device mesh) on synthetic data generated on the device:
compile time (lowering + XLA compile, measured apart from the timed steps), then the median of
``--steps`` device-synchronised steps after ``--warmup`` untimed ones. Prints one JSON object.

* ``--compare-torch``: the same architecture, batch, loss (label-smoothed cross-entropy) and
  optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4 on conv/dense kernels) in PyTorch in
  the same process: channels_last, autocast to ``--dtype`` when it is not float32, and
  ``torch.compile`` on CUDA (eager if compiling fails; the mode that ran is reported).
* ``--compare-minimal``: a hand-written Flax ResNet (``benchmarks.minimal_resnet``) of the same
  architecture through the same step, to show what the library's structure costs.
* ``--compare-nnx``: the same model from ``resnet_jax.nnx`` trained with ``nnx.Optimizer``
  and the same loss, optimizer and metrics, to show what the NNX API costs over the Linen step:
  ``nnx`` compiles it as Flax advises for a hot loop (``nnx.split`` once, ``jax.jit`` of a pure
  merge-step-split function), ``nnx_jit`` with ``nnx.jit`` on the modules, as the tutorials do.
* ``--compare-recipe``: the same step with the recipes' extras on (issue 43): timm's BCE loss,
  drop path at ResNet strikes back A1's rate and an EMA updated every step.
* ``--compare-grad-accum K``: the same step taking its batch as K micro-batches
  (``grad_accum_steps``); the ratio of images/s is what accumulation costs per image.
* ``--rounds R``: the contenders take turns R times (order reversed every round) and medians are
  over all rounds, so load changes on a shared machine hit them alike.
* ``--measure-cache``: runs the benchmark twice in fresh processes sharing an empty persistent
  compilation cache and reports the cold and the warm compile (and start-up) times.

FLOPs are counted analytically from the model's jaxpr (multiply-accumulates of every
convolution and dense layer for one image, x2 for FLOPs); a training step is counted as 3x the
forward pass (backward = 2x forward), the usual convention: 24.5 GFLOP per 224x224 image for
ResNet-50 (4.09 GMAC forward). XLA's own ``cost_analysis`` of the compiled step, which also
counts normalisation and element-wise work, is reported beside it. MFU divides the achieved model
FLOP/s by the device's dense peak from ``PEAK_TFLOPS`` (or ``--peak-tflops``); null when unknown.

Needs only jax, flax, optax and numpy (and torch for ``--compare-torch``).

This file is the command line. The parts: ``step_common`` (clock, log, hyperparameters),
``step_flops`` (FLOP counting, device peaks), ``step_jax`` and ``step_torch`` (the contenders),
``step_run`` (one run and its JSON) and ``step_cache`` (``--measure-cache``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

# isort: split
# First of the project's modules, before anything imports JAX: the time-to-first-step clock starts here.
import benchmarks.step_common  # noqa: F401

# isort: split
import resnet_jax
from benchmarks.report import emit_json
from benchmarks.step_cache import measure_cache
from benchmarks.step_run import DTYPES, run
from resnet_jax.platform import skip_absent_tpu
from train import compile_cache


def _int_tuple(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 3,4,6,3; got {text!r}")
    return values


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model, batch and timing: what every run needs."""
    p.add_argument("--arch", default="resnet50", choices=sorted(resnet_jax.PRESETS))
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--small-stem", action="store_true", help="3x3 stem without max-pool (CIFAR)")
    p.add_argument(
        "--stage-sizes",
        type=_int_tuple,
        default=None,
        metavar="N,N,...",
        help="blocks per stage, replacing the preset's (e.g. 1,1 for a quick two-stage network)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--rounds", type=int, default=1, help="timing rounds, contenders alternating")
    p.add_argument("--seed", type=int, default=0)


def _add_comparison_flags(p: argparse.ArgumentParser) -> None:
    """What else to time in the same process, beside the library's step."""
    p.add_argument("--compare-torch", action="store_true", help="also time PyTorch in this run")
    p.add_argument(
        "--torch-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile the PyTorch model (auto: on CUDA only)",
    )
    p.add_argument(
        "--torch-compile-mode",
        default="default",
        help="torch.compile mode; several, comma-separated (default,max-autotune), each timed",
    )
    p.add_argument(
        "--torch-compile-timeout",
        type=float,
        default=0,
        metavar="S",
        help="give up on a torch.compile mode after S seconds (0: no limit)",
    )
    p.add_argument(
        "--compare-bn-two-pass",
        action="store_true",
        help="also time the library with BatchNorm(variance='two_pass')",
    )
    p.add_argument("--compare-minimal", action="store_true", help="also time a minimal Flax ResNet")
    p.add_argument(
        "--compare-maxpool-elementwise",
        action="store_true",
        help="also time the library with the stem max-pool's backward as elementwise ops "
        "(ops.max_pool_3x3_elementwise) instead of select_and_scatter",
    )
    p.add_argument(
        "--compare-maxpool-xla",
        action="store_true",
        help="also time the library with XLA's own max-pool gradient (select_and_scatter, as on a GPU "
        "or TPU) instead of the CPU's first-maximum selects (ops.max_pool_3x3_first_max)",
    )
    p.add_argument(
        "--compare-xla-conv-grad",
        action="store_true",
        help="also time the library with XLA's own convolution weight gradient "
        "(RESNET_JAX_CPU_CONV_GRAD=0), against the matmul one it uses on a CPU (resnet_jax.conv_grad)",
    )
    p.add_argument(
        "--compare-ynn",
        action="append",
        metavar="TYPES",
        help="also time the library compiled with XLA:CPU's YNNPACK for these fusion types "
        "(comma-separated: INDIVIDUAL_DOT,INDIVIDUAL_CONVOLUTION, jax 0.10's own default); repeatable",
    )
    p.add_argument(
        "--compare-bn-fused",
        action="store_true",
        help="also time the library with ResNet(bn_fused=True): each BatchNorm with its add and "
        "ReLU as one custom VJP (batchnorm.batch_norm(fused=True))",
    )
    p.add_argument(
        "--compare-nnx",
        action="store_true",
        help="also time the resnet_jax.nnx model (split + jax.jit, and nnx.jit)",
    )
    p.add_argument(
        "--compare-recipe",
        action="store_true",
        help="also time the step with BCE loss, drop path and an EMA of the weights (issue 43's extras)",
    )
    p.add_argument(
        "--compare-grad-accum",
        type=int,
        default=0,
        metavar="K",
        help="also time the step with grad_accum_steps=K (K >= 2; K must divide --batch)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The compilation cache, library experiments, profiling and output."""
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--compilation-cache",
        default=compile_cache.AUTO,
        metavar="DIR",
        help=f"persistent compilation cache directory (default: ${compile_cache.ENV_VAR} or "
        f"{compile_cache.DEFAULT_DIR})",
    )
    cache.add_argument("--no-compilation-cache", action="store_true")
    p.add_argument(
        "--measure-cache",
        action="store_true",
        help="report cold and warm compile times from two fresh processes sharing a new cache",
    )
    p.add_argument("--no-donate", action="store_true", help="do not donate the state (experiment)")
    p.add_argument(
        "--bn-variance",
        default="shifted",
        choices=("shifted", "two_pass"),
        help="the library's BatchNorm variance (default: shifted, as configs/imagenet_resnet50.py)",
    )
    p.add_argument("--bn-recompute", action="store_true", help="ResNet(bn_recompute=True) (experiment)")
    p.add_argument(
        "--stem-pad-channels", type=int, default=0, help="ResNet(stem_pad_channels=N) (experiment)"
    )
    p.add_argument("--pipelined", action="store_true", help="also time steps dispatched back to back")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="write a jax.profiler trace of 5 steps to DIR, and its summary by op kind and phase; "
        "with --compare-torch on a CPU, also torch.profiler's of PyTorch's step (benchmarks.profile_torch)",
    )
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: one line naming a bad value, and exit status 2."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description="Time the compiled training step on synthetic data (JSON on stdout).",
    )
    _add_model_flags(p)
    _add_comparison_flags(p)
    _add_run_flags(p)
    args = p.parse_args(argv)
    for name in ("batch", "image_size", "num_classes", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.compare_grad_accum == 1 or args.compare_grad_accum < 0:
        p.error("--compare-grad-accum must be >= 2 (0: off)")
    if args.compare_grad_accum and args.batch % args.compare_grad_accum:
        p.error(f"--compare-grad-accum {args.compare_grad_accum} must divide --batch {args.batch}")
    if args.compare_grad_accum and args.dtype == "float16":
        p.error("--compare-grad-accum does not run with --dtype float16 (its loss scaling)")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step is never timed)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv``), run, and print the JSON result (and write it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    skip_absent_tpu()  # libtpu installed but no TPU here: no TPU start-up attempt and warnings
    if args.measure_cache:
        result = measure_cache(args, argv)
    else:
        if args.compare_torch:
            # JAX would otherwise reserve 75% of GPU memory up front and starve PyTorch.
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        compile_cache.enable_compilation_cache("off" if args.no_compilation_cache else args.compilation_cache)
        result = run(args)
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
