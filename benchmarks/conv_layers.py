"""One convolution layer's three parts on a CPU: ``python -m benchmarks.conv_layers [--batch 16]``.

For ResNet's convolution shapes (3x3 and 1x1, stride 1 and 2), times ``jax.jit`` of the forward
pass, of the input gradient, and of the weight gradient three ways: XLA's own (a convolution over
the batch and the image), ``resnet_jax.conv_grad``'s (one matmul per kernel tap) and one im2col
matmul (:func:`weight_grad_im2col`), taking turns
``--rounds`` times; medians in milliseconds, and each part's GFLOP/s. Issue 47: where XLA:CPU
loses the training step.

``--nchw`` adds XLA's forward pass and input gradient with the channels first (PyTorch's layout;
the tensors are transposed outside the timed call), to tell the layout's cost from the kernels'.
``--compare-torch`` adds PyTorch's own three parts in the same rounds: ``torch.conv2d`` and
``aten.convolution_backward`` (what autograd calls) on channels-first tensors, with PyTorch's own
thread count. Run under ``benchmarks.cpu_levers --what layers`` to see XLA:CPU's options per layer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.report import emit_json, host_environment
from resnet_jax import conv_grad

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "HWIO", "NCHW")
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


def weight_grad_im2col(x: Any, dy: Any, kernel_hw: Any, strides: Any, padding: Any) -> Any:
    """``conv_grad.weight_grad_taps``'s weight gradient as one matmul: every tap's window side by
    side (``[batch*h*w, taps*in]``, the im2col matrix) times the output gradient. A try that was
    slower than the per-tap matmuls (BENCHMARKS.md, section 5), kept here to time it."""
    out_hw = dy.shape[1:3]
    cols = jnp.stack([w for _, w in conv_grad.tap_windows(x, kernel_hw, strides, padding, out_hw)], axis=3)
    dw = lax.dot_general(
        cols.reshape(-1, cols.shape[3] * cols.shape[4]),
        dy.reshape(-1, dy.shape[-1]),
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.promote_types(dy.dtype, jnp.float32),
    )
    return dw.reshape(*kernel_hw, x.shape[-1], dy.shape[-1])


def _torch_parts(x: Any, w: Any, dy: Any, s: int, p: int) -> dict[str, tuple[Any, ...]]:
    """PyTorch's forward, input gradient and weight gradient of one layer, channels first."""
    import numpy as np
    import torch

    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
    dyt = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())

    def backward(mask: list[bool]) -> Any:
        def run(xt: Any, dyt: Any) -> Any:
            return torch.ops.aten.convolution_backward(
                dyt, xt, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask
            )

        return run

    def timed(fn: Any) -> Any:
        def call(*a: Any) -> Any:
            with torch.no_grad():
                return fn(*a)

        return call

    return {
        "torch_forward": (timed(lambda xt, wt: torch.conv2d(xt, wt, None, s, p)), xt, wt),
        "torch_input_grad": (timed(backward([True, False, False])), xt, dyt),
        "torch_weight_grad": (timed(backward([False, True, False])), xt, dyt),
    }


def _time(fn: Any, *args: Any) -> float:
    """Seconds for one call; JAX's result is waited for, PyTorch's is ready when it returns."""
    start = time.perf_counter()
    out = fn(*args)
    if isinstance(out, jax.Array):
        jax.block_until_ready(out)
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
            "weight_grad_im2col": (
                jax.jit(lambda x, dy, k=k, s=s, pad=pad: weight_grad_im2col(x, dy, (k, k), (s, s), pad)),
                x,
                dy,
            ),
        }
        if args.nchw:
            xc, dyc = x.transpose(0, 3, 1, 2), dy.transpose(0, 3, 1, 2)

            def conv_nchw(x, w, s=s, pad=pad):
                return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=NCHW)

            parts["forward_nchw"] = (jax.jit(conv_nchw), xc, w)
            parts["input_grad_nchw"] = (
                jax.jit(lambda x, dy, w=w, conv=conv_nchw: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0]),
                xc,
                dyc,
            )
        if args.compare_torch:
            parts.update(_torch_parts(x, w, dy, s, k // 2))
        times: dict[str, list[float]] = {name: [] for name in parts}
        for fn, *a in parts.values():
            _time(fn, *a)  # compile, or PyTorch's first call
        for _ in range(args.rounds):
            for name, (fn, *a) in parts.items():
                times[name].append(_time(fn, *a))
        ho = -(-size // s)
        gflop = 2 * args.batch * ho * ho * cin * cout * k * k / 1e9
        row: dict[str, Any] = {"layer": f"{k}x{k} {cin}->{cout} stride {s} at {size} px", "gflop": gflop}
        row.update({f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()})
        row.update({f"{name}_gflop_per_s": gflop / statistics.median(t) for name, t in times.items()})
        rows.append(row)
        print(
            "[conv_layers] "
            + ", ".join(
                f"{key} {v:.1f}" if isinstance(v, float) else str(v)
                for key, v in row.items()
                if not key.endswith("_gflop_per_s")
            ),
            flush=True,
        )
    return {
        "benchmark": "conv_layers",
        "batch": args.batch,
        "rounds": args.rounds,
        "torch_threads": _torch_threads() if args.compare_torch else None,
        "environment": {**host_environment(), "jax": jax.__version__, "backend": jax.default_backend()},
        "layers": rows,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nchw", action="store_true", help="also XLA's convolutions channels first")
    parser.add_argument("--compare-torch", action="store_true", help="also PyTorch's, same rounds")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    emit_json(run(args), args.output)


if __name__ == "__main__":
    main()
