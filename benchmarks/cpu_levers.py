"""XLA:CPU's options against PyTorch, one process per option (issue 47).

``python -m benchmarks.cpu_levers --arch resnet18 --batch 32 --image-size 224 --rounds 2
[--tries baseline,onednn] [--what train,infer,layers] [--output F]``

XLA reads ``XLA_FLAGS`` once, when JAX starts, so each try is its own process: the training-step
benchmark (``benchmarks.train_step --compare-torch``) and the inference one
(``benchmarks.cpu_inference``), and with ``--what layers`` one convolution layer's forward and
gradients (``benchmarks.conv_layers``), each with ``XLA_FLAGS`` set to the try's options. PyTorch runs in
the same process, alternating with ours, so each process gives a ratio ours / PyTorch's that load
on the machine hits alike; the tries are compared by those ratios. Tries take turns in each round
(order reversed every other round), and the report keeps every process's figures and the median
ratio per try.

Model-level tries (BatchNorm's variance, fused BatchNorm, the max-pool's backward) run in one
process with ``benchmarks.train_step --compare-bn-two-pass --compare-bn-fused
--compare-maxpool-elementwise``; this module is for the compiler's options.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks.report import emit_json, host_environment

# name -> XLA_FLAGS. The defaults of jax 0.10's XLA:CPU are the baseline: there, convolutions and
# dots are YNNPACK fusions (``__ynn_fusion`` in the compiled HLO), other ops XLA's own loops.
_YNN = "--xla_cpu_experimental_ynn_fusion_type="
_ONEDNN_TYPE = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type="
# ``import resnet_jax`` itself turns YNNPACK off where the user's flags leave it free to
# (resnet_jax.platform); "baseline" is that default, "ynn_convolutions" XLA's own defaults (a "+"
# of a type already on changes nothing, and any YNNPACK flag of the user's stops the import's).
TRIES = {
    "baseline": "",
    "ynn_convolutions": _YNN + "+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "no_ynnpack_no_rewrites": _YNN,
    "no_ynnpack": _YNN,  # Eigen's convolutions and dots
    "ynn_dots_only": _YNN + "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",  # Eigen's convolutions
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn_dot_eltwise": _ONEDNN_TYPE + "+LIBRARY_FUSION_TYPE_DOT,+LIBRARY_FUSION_TYPE_ELTWISE",
    "onednn_convolution": _ONEDNN_TYPE + "+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn_convolution": "--xla_cpu_experimental_xnn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "vector_width_128": "--xla_cpu_prefer_vector_width=128",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
}
# Tries that also set environment variables: without YNNPACK, and resnet_jax.conv_grad's
# rewrites off (1x1 convolutions stay XLA's convolutions).
TRY_ENV = {"no_ynnpack_no_rewrites": {"RESNET_JAX_CPU_CONV_GRAD": "0"}}


def _child(
    module: str, argv: list[str], flags: str, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m module argv --output F`` with ``XLA_FLAGS=flags``; its JSON (or the error)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **(extra_env or {}))
        proc = subprocess.run(
            [sys.executable, "-m", module, *argv, f"--output={out}"], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0 or not os.path.exists(out):
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
        with open(out) as f:
            return json.load(f)


def _train_ratio(report: dict[str, Any]) -> float | None:
    return (report.get("ratios") or {}).get("jax_over_torch_images_per_s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    tries = args.tries
    train_argv = [
        f"--arch={args.arch}",
        f"--batch={args.batch}",
        f"--image-size={args.image_size}",
        "--dtype=float32",
        "--steps=1",
        "--warmup=2",
        f"--rounds={args.step_rounds}",
        "--compare-torch",
        "--no-compilation-cache",
    ]
    infer_argv = [
        f"--arch={args.arch}",
        f"--image-size={args.image_size}",
        f"--batches={args.infer_batches}",
        f"--rounds={args.step_rounds}",
    ]
    layers_argv = [f"--batch={args.layer_batch}", f"--rounds={args.step_rounds}"]
    if args.layer_torch:
        layers_argv.append("--compare-torch")
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for name in tries if r % 2 == 0 else tries[::-1]:
            flags = TRIES[name]
            record: dict[str, Any] = {"try": name, "round": r, "xla_flags": flags, "env": TRY_ENV.get(name)}
            if "train" in args.what:
                print(f"[cpu_levers] round {r} {name}: train step", file=sys.stderr, flush=True)
                report = _child("benchmarks.train_step", train_argv, flags, TRY_ENV.get(name))
                record["train"] = report.get("error") or {
                    "jax_over_torch": _train_ratio(report),
                    "jax_images_per_s": report["jax"]["images_per_s"],
                    "torch_images_per_s": report["torch"]["images_per_s"],
                    "jax_compile_s": report["jax"].get("compile_time_s"),
                }
            if "layers" in args.what:
                print(f"[cpu_levers] round {r} {name}: layers", file=sys.stderr, flush=True)
                report = _child("benchmarks.conv_layers", layers_argv, flags, TRY_ENV.get(name))
                record["layers"] = report.get("error") or report["layers"]
            if "infer" in args.what:
                print(f"[cpu_levers] round {r} {name}: inference", file=sys.stderr, flush=True)
                report = _child("benchmarks.cpu_inference", infer_argv, flags, TRY_ENV.get(name))
                record["infer"] = report.get("error") or report["batches"]
            print(f"[cpu_levers] {json.dumps(record)}", file=sys.stderr, flush=True)
            runs.append(record)
    summary: dict[str, Any] = {}
    for name in tries:
        mine = [x for x in runs if x["try"] == name]
        row: dict[str, Any] = {"xla_flags": TRIES[name]}
        train = [x["train"]["jax_over_torch"] for x in mine if isinstance(x.get("train"), dict)]
        if train and all(t is not None for t in train):
            row["train_ours_over_torch"] = statistics.median(train)
        for x in mine:
            if isinstance(x.get("train"), str) or isinstance(x.get("infer"), str):
                row["error"] = x.get("train") if isinstance(x.get("train"), str) else x.get("infer")
        infer = [x["infer"] for x in mine if isinstance(x.get("infer"), dict)]
        for batch in infer[0] if infer else []:
            row[f"infer_b{batch}_ours_over_torch"] = statistics.median(
                i[batch]["ours_over_torch"] for i in infer
            )
            row[f"infer_b{batch}_first_call_s"] = statistics.median(
                i[batch]["first_call_s"]["ours"] for i in infer
            )
        layers = [x["layers"] for x in mine if isinstance(x.get("layers"), list)]
        if layers:
            row["layers_ms"] = {
                lay["layer"]: {
                    key[: -len("_ms")]: statistics.median(rep[i][key] for rep in layers)
                    for key in lay
                    if key.endswith("_ms")
                }
                for i, lay in enumerate(layers[0])
            }
        summary[name] = row
    return {
        "benchmark": "cpu_levers",
        "command": " ".join(["python -m benchmarks.cpu_levers", *sys.argv[1:]]),
        "environment": host_environment(),
        "summary": summary,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--infer-batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=1, help="turns of every try (a process each)")
    parser.add_argument("--step-rounds", type=int, default=3, help="alternations with PyTorch per process")
    parser.add_argument("--tries", type=lambda s: s.split(","), default=list(TRIES))
    parser.add_argument(
        "--what",
        type=lambda s: s.split(","),
        default=["train", "infer"],
        help="any of train, infer, layers (benchmarks.conv_layers per try)",
    )
    parser.add_argument("--layer-batch", type=int, default=16)
    parser.add_argument("--layer-torch", action="store_true", help="layers: PyTorch's too, per process")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    unknown = [t for t in args.tries if t not in TRIES]
    if unknown:
        parser.error(f"unknown tries {unknown}; choose from {', '.join(TRIES)}")
    emit_json(run(args), args.output)


if __name__ == "__main__":
    main()
