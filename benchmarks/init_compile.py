"""Compile time of a model's random initialisation, per PRNG: ``python -m benchmarks.init_compile``.

A model's ``init`` draws every parameter from the key. Under ``jax.jit`` that is one program, and
XLA compiles one random-bits kernel per parameter shape. On a CPU the cost of those kernels
depends on the generator: threefry2x32 in JAX's "partitionable" form (the default since JAX 0.5),
threefry2x32 in its earlier form (``jax_threefry_partitionable=False``), or ``rbg``. This command
compiles ``jit(model.init)`` for each generator in turn, alternating over ``--rounds``, with JAX's
in-memory and persistent caches out of the way (a fresh function each time, no cache directory),
and reports the median seconds per generator and their ratios to the default. JSON on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks.report import emit_json, host_environment

GENERATORS = {
    "threefry_partitionable": ("threefry2x32", True),
    "threefry_legacy": ("threefry2x32", False),
    "rbg": ("rbg", True),
}


def compile_seconds(arch: str, image_size: int, generator: str, stage_sizes: tuple[int, ...] = ()) -> float:
    """Seconds to lower and compile ``jit(model.init)`` of ``arch`` (with other ``stage_sizes``
    if given) with ``generator``."""
    import jax
    import jax.numpy as jnp

    import resnet_jax

    impl, partitionable = GENERATORS[generator]
    jax.config.update("jax_threefry_partitionable", partitionable)
    model = resnet_jax.get_model(arch, num_classes=1000)
    if stage_sizes:
        model = model.clone(stage_sizes=stage_sizes)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    key = jax.random.key(0, impl=impl)
    # A new function object each time, so nothing of an earlier round is reused.
    init = jax.jit(lambda k, x: model.init(k, x, train=False))
    start = time.perf_counter()
    init.lower(key, x).compile()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.init_compile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--arch", default="resnet18,resnet50", help="comma-separated presets")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--stage-sizes", default="", help="e.g. 1,1: a shallower model (for a quick check)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    result: dict[str, Any] = {"benchmark": "init_compile", "environment": host_environment()}
    result["environment"].update(jax=jax.__version__, backend=jax.default_backend())
    stage_sizes = tuple(int(n) for n in args.stage_sizes.split(",") if n)
    result["config"] = {
        "image_size": args.image_size,
        "stage_sizes": list(stage_sizes),
        "rounds": args.rounds,
    }
    for arch in args.arch.split(","):
        times: dict[str, list[float]] = {g: [] for g in GENERATORS}
        for _ in range(args.rounds):
            for generator in GENERATORS:  # alternating, so drift in the machine hits all alike
                times[generator].append(compile_seconds(arch, args.image_size, generator, stage_sizes))
        median = {g: statistics.median(t) for g, t in times.items()}
        result[arch] = {
            "compile_s": times,
            "median_s": median,
            "ratio_to_partitionable": {g: m / median["threefry_partitionable"] for g, m in median.items()},
        }
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
