"""One convolution layer's three parts on a CPU: ``python -m benchmarks.conv_layers [--batch 16]``.

For ResNet's convolution shapes (3x3 and 1x1, stride 1 and 2), times ``jax.jit`` of the forward
pass, of the input gradient, and of the weight gradient two ways: XLA's own (a convolution over
the batch and the image) and ``resnet_jax.conv_grad``'s (one matmul per kernel tap), taking turns
``--rounds`` times; medians in milliseconds. Issue 47: where XLA:CPU loses the training step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
from jax import lax

from benchmarks.report import emit_json, host_environment
from resnet_jax import conv_grad

NHWC = ("NHWC", "HWIO", "NHWC")
# (input size, in, out, kernel, stride): layers of ResNet-18/50 at 224 px.
LAYERS = [
    (56, 64, 64, 3, 1),
    (56, 64, 128, 3, 2),
    (28, 128, 128, 3, 1),
    (7, 512, 512, 3, 1),
    (56, 64, 256, 1, 1),
    (56, 256, 128, 1, 2),
    (28, 128, 128, 1, 1),
]


def _time(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for size, cin, cout, k, s in LAYERS:
        pad = [(k // 2, k // 2)] * 2
        x = jax.random.normal(jax.random.key(0), (args.batch, size, size, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.01

        def conv(x, w, s=s, pad=pad):
            return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=NHWC)

        dy = jax.random.normal(jax.random.key(2), jax.eval_shape(conv, x, w).shape)
        parts = {
            "forward": (jax.jit(conv), x, w),
            "input_grad": (
                jax.jit(lambda x, dy, w=w, conv=conv: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0]),
                x,
                dy,
            ),
            "weight_grad_xla": (
                jax.jit(lambda x, dy, w=w, conv=conv: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0]),
                x,
                dy,
            ),
            "weight_grad_matmuls": (
                jax.jit(
                    lambda x, dy, k=k, s=s, pad=pad: conv_grad.weight_grad_taps(x, dy, (k, k), (s, s), pad)
                ),
                x,
                dy,
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in parts}
        for fn, *a in parts.values():
            _time(fn, *a)  # compile
        for _ in range(args.rounds):
            for name, (fn, *a) in parts.items():
                times[name].append(_time(fn, *a))
        row = {"layer": f"{k}x{k} {cin}->{cout} stride {s} at {size} px"}
        row.update({f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()})
        rows.append(row)
        print(
            "[conv_layers] "
            + ", ".join(f"{key} {v:.1f}" if isinstance(v, float) else v for key, v in row.items()),
            flush=True,
        )
    return {
        "benchmark": "conv_layers",
        "batch": args.batch,
        "rounds": args.rounds,
        "environment": {**host_environment(), "jax": jax.__version__, "backend": jax.default_backend()},
        "layers": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    emit_json(run(args), args.output)


if __name__ == "__main__":
    main()
