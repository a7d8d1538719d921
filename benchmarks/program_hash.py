"""Fingerprints of the programs the models lower to: ``python -m benchmarks.program_hash [ARCH ...]``.

For each preset, the StableHLO of a Linen train-mode forward and backward plus an eval forward,
and of the NNX model's forward and backward, with source locations stripped, hashed. A refactor
of the library that leaves these fingerprints unchanged leaves the compiled programs, and so
their speed and their values, unchanged. Prints one JSON object: ``{arch: [linen, nnx]}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp


def _fingerprint(text: str) -> str:
    text = re.sub(r"#loc\d* = .*", "", text)  # location definitions
    text = re.sub(r" ?loc\([^)]*\)", "", text)  # and their uses
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def linen_fingerprint(model, size: int = 64) -> str:
    """The Linen model's train-mode value-and-grad and its eval forward, on a batch of 2."""
    x = jnp.zeros((2, size, size, getattr(model, "img_channels", 3)))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def loss(params, stats, x):
        out, upd = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return out.sum(), upd

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(v["params"], v.get("batch_stats", {}), x)
    ev = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(v, x)
    return _fingerprint(grad.as_text() + ev.as_text())


def nnx_fingerprint(arch: str, size: int = 64) -> str:
    """The NNX preset's train-mode value-and-grad over its whole state, on a batch of 2."""
    from flax import nnx

    from resnet_jax import nnx as rnnx

    model = nnx.eval_shape(lambda: rnnx.get_model(arch, 10, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(model)
    x = jnp.zeros((2, size, size, 3))

    def loss(state, x):
        m = nnx.merge(graph, state)
        return m(x).sum(), nnx.state(m)

    return _fingerprint(jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(state, x).as_text())


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import resnet_jax

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.program_hash", description=__doc__.split("\n")[0]
    )
    parser.add_argument("archs", nargs="*", help="presets (default: all of resnet_jax.ALL_PRESETS)")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    archs = args.archs or list(resnet_jax.ALL_PRESETS)
    out = {}
    for arch in archs:
        model = resnet_jax.get_model(arch, num_classes=10)
        out[arch] = [linen_fingerprint(model, args.image_size), nnx_fingerprint(arch, args.image_size)]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    from resnet_jax import platform

    platform.skip_absent_tpu()
    main()
