"""Inference on a CPU, ours against PyTorch's, side by side (issue 47).

``python -m benchmarks.cpu_inference --arch resnet50 --batches 1,32 --rounds 5 [--output F]``

* **Ours**: the model in eval mode through ``jax.jit`` of ``apply`` followed by a softmax,
  float32 NHWC: the forward pass that ``train.predict`` compiles.
* **PyTorch's**: the same architecture (``resnet_jax.torch_reference``) in eval mode, eager,
  under ``torch.inference_mode()``, channels_last, float32, with PyTorch's own thread count.

Both take the same images (copied into each framework's layout once, outside the clock). Per batch
size, each round times ``--calls`` calls of ours, then of PyTorch's (the first swapped every round),
each call synchronised; the figures are medians over all rounds. The first call of each side is
timed apart: for ours it traces and compiles (the persistent cache is off unless
``--compilation-cache``), for PyTorch it is the first eager pass. ``--profile DIR`` then traces
``--calls`` calls of each side per batch size (``jax.profiler`` into ``DIR/b{batch}``, and
``torch.profiler``) and adds their time by op kind (``benchmarks.profile_ops``,
``benchmarks.profile_torch``) to the JSON. ``XLA_FLAGS`` in the environment
applies to ours, so ``benchmarks.cpu_levers`` runs this module once per XLA:CPU option.
Prints (and with ``--output`` writes) one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from benchmarks.report import emit_json, host_environment


def _ours(arch: str, num_classes: int, size: int):
    """A jitted ``images -> probabilities`` of our model with random (fixed-seed) variables."""
    import jax
    import jax.numpy as jnp

    import resnet_jax

    model = resnet_jax.get_model(arch, num_classes=num_classes)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False))(
        jax.random.key(0, impl="rbg")
    )
    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False), axis=-1))

    def call(x):
        return jax.block_until_ready(forward(variables, x))

    call.hlo_text = lambda x: forward.lower(variables, x).compile().as_text()
    return call


def _theirs(arch: str, num_classes: int):
    """PyTorch's ``images -> probabilities`` (eager, eval, inference mode, channels_last)."""
    import torch

    from resnet_jax.torch_reference import torch_resnet

    torch.manual_seed(0)
    model = torch_resnet(arch, num_classes).eval().to(memory_format=torch.channels_last)

    def call(x):
        with torch.inference_mode():
            return torch.softmax(model(x), dim=-1)

    return call


def _profile(
    args: argparse.Namespace, batch: int, ours: Any, x_ours: Any, theirs: Any, x_theirs: Any
) -> dict:
    """Each side's time by op kind over ``args.calls`` calls (ours traced into DIR/b{batch})."""
    import os

    import jax

    from benchmarks import profile_ops, profile_torch

    trace_dir = os.path.join(args.profile, f"b{batch}")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.calls):
            ours(x_ours)
    return {
        "ours": profile_ops.summarize(trace_dir, ours.hlo_text(x_ours), steps=args.calls, forward_only=True),
        "torch": profile_torch.summarize(lambda: theirs(x_theirs), steps=args.calls),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import torch

    from train import compile_cache

    compile_cache.enable_compilation_cache(None if args.compilation_cache else "off")
    ours, theirs = _ours(args.arch, args.num_classes, args.image_size), _theirs(args.arch, args.num_classes)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "benchmark": "cpu_inference",
        "command": " ".join(["python -m benchmarks.cpu_inference", *sys.argv[1:]]),
        "environment": {
            **host_environment(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "arch": args.arch,
        "image_size": args.image_size,
        "batches": {},
    }
    for batch in args.batches:
        images = rng.normal(size=(batch, args.image_size, args.image_size, 3)).astype(np.float32)
        x_ours = jax.device_put(images)
        x_theirs = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        first = {}
        for name, call, x in (("ours", ours, x_ours), ("torch", theirs, x_theirs)):
            t = time.perf_counter()
            out = call(x)
            first[name] = time.perf_counter() - t
        np.testing.assert_equal(np.asarray(out).shape, (batch, args.num_classes))
        times: dict[str, list[float]] = {"ours": [], "torch": []}
        for r in range(args.rounds):
            order = [("ours", ours, x_ours), ("torch", theirs, x_theirs)]
            for name, call, x in order if r % 2 == 0 else order[::-1]:
                for _ in range(args.calls):
                    t = time.perf_counter()
                    call(x)
                    times[name].append(time.perf_counter() - t)
        ours_s, torch_s = statistics.median(times["ours"]), statistics.median(times["torch"])
        result["batches"][str(batch)] = {
            "ours_images_per_s": batch / ours_s,
            "torch_images_per_s": batch / torch_s,
            "ours_over_torch": torch_s / ours_s,
            "ours_ms_per_call": 1e3 * ours_s,
            "torch_ms_per_call": 1e3 * torch_s,
            "first_call_s": {"ours": first["ours"], "torch": first["torch"]},
            "first_call_ours_over_torch": first["torch"] / first["ours"],
            "calls_timed": len(times["ours"]),
        }
        if args.profile:
            result["batches"][str(batch)]["profile"] = _profile(args, batch, ours, x_ours, theirs, x_theirs)
        print(
            f"[cpu_inference] {args.arch} batch {batch}: ours {batch / ours_s:.1f} img/s, torch "
            f"{batch / torch_s:.1f} img/s, ratio {torch_s / ours_s:.2f}; first call {first['ours']:.1f} s "
            f"vs {first['torch']:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per side per round")
    parser.add_argument("--compilation-cache", action="store_true", help="use the persistent cache")
    parser.add_argument("--profile", metavar="DIR", help="also profile each side, op by op")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    emit_json(run(args), args.output)


if __name__ == "__main__":
    main()
