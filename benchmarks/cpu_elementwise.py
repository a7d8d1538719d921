"""BatchNorm and elementwise work on a CPU, ours against PyTorch's, on one and on all cores
(issue 47): ``python -m benchmarks.cpu_elementwise [--shape 16,56,56,256] [--rounds 5]``.

After the convolutions, a ResNet step on a CPU is mostly passes over activations: BatchNorm's
statistics and normalisation, ReLU, the residual add, and their gradients. This times those
alone, at one activation shape of ResNet-50 (float32, channels last for ours, PyTorch's
``channels_last`` for theirs): each part is ``jax.jit`` of ``resnet_jax.batchnorm.batch_norm``
(train mode, with the residual add and ReLU it folds in) and of its gradient, against PyTorch's
``batch_norm`` + add + ``relu`` and their autograd backward, taking turns ``--rounds`` times.
Run in one process per core count (``--cores 1,all``: a child pinned with
``os.sched_setaffinity``), the figures show how each side scales from one core to all: a side
whose time does not drop runs those passes on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.report import emit_json, host_environment


def _measure(shape: tuple[int, ...], rounds: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from resnet_jax import batchnorm

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    r = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    c = shape[-1]
    scale, bias = np.ones(c, np.float32), np.zeros(c, np.float32)

    def ours(x, r, scale, bias):
        y, _, _ = batchnorm.batch_norm(
            x, scale, bias, jnp.zeros(c), jnp.ones(c), train=True, residual=r, relu=True
        )
        return y

    fwd = jax.jit(ours)
    bwd = jax.jit(lambda x, r, scale, bias, g: jax.vjp(ours, x, r, scale, bias)[1](g))
    xs = [jnp.asarray(a) for a in (x, r, scale, bias, g)]

    def nchw(a):
        return torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)

    xt, rt, gt = nchw(x), nchw(r), nchw(g)
    wt, bt = torch.from_numpy(scale), torch.from_numpy(bias)

    def theirs_fwd():
        with torch.no_grad():
            return torch.relu(torch.nn.functional.batch_norm(xt, None, None, wt, bt, True, 0.1, 1e-5) + rt)

    xg, wg, bg, rg = (t.clone().requires_grad_(True) for t in (xt, wt, bt, rt))

    def theirs_bwd():
        y = torch.relu(torch.nn.functional.batch_norm(xg, None, None, wg, bg, True, 0.1, 1e-5) + rg)
        return torch.autograd.grad(y, (xg, rg, wg, bg), gt)

    parts = {
        "ours_forward": lambda: jax.block_until_ready(fwd(*xs[:4])),
        "torch_forward": theirs_fwd,
        "ours_forward_backward": lambda: jax.block_until_ready(bwd(*xs)),
        "torch_forward_backward": theirs_bwd,
    }
    for fn in parts.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()} | {
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = tuple(int(n) for n in args.shape.split(","))
    rows = []
    for cores in args.cores.split(","):
        cmd = [sys.executable, "-m", "benchmarks.cpu_elementwise", "--child", f"--shape={args.shape}"]
        cmd.append(f"--rounds={args.rounds}")
        cpus = sorted(os.sched_getaffinity(0))
        pin = cpus if cores == "all" else cpus[: int(cores)]
        # Pinned before Python starts, so that both frameworks size their thread pools to it.
        out = subprocess.run(
            ["taskset", "-c", ",".join(map(str, pin)), *cmd], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[cpu_elementwise] {cores} cores: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return {
        "benchmark": "cpu_elementwise",
        "command": " ".join(["python -m benchmarks.cpu_elementwise", *sys.argv[1:]]),
        "environment": host_environment(),
        "shape": list(shape),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,56,56,256", help="an activation's NHWC shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cores", default="1,all")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(tuple(int(n) for n in args.shape.split(",")), args.rounds)))
        return
    emit_json(run(args), args.output)


if __name__ == "__main__":
    main()
