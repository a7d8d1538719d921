"""FLOPs of a training step for ``python -m benchmarks.train_step``, and the devices' peaks for MFU.

Counted analytically from the model's jaxpr (multiply-accumulates of every convolution and dense
layer); XLA's own cost analysis of the compiled step is read beside it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from train.utilisation import compiled_flops, count_macs  # noqa: F401  (the run logs them too)

# How far XLA's cost analysis of a train step may be from the analytic count (3 x 2 x forward
# MACs per image) for a ResNet at 32 px or more: XLA counts only the kernel taps that fall inside
# the (unpadded) image, leaves out the input gradient of the stem, which nothing needs, and adds
# the normalisation, element-wise and optimizer work. Below 32 px the padding dominates and XLA
# counts much less. BENCHMARKS.md ("FLOPs and MFU") has the measured gaps.
XLA_FLOPS_RTOL = 0.10

# Dense (no sparsity) peak TFLOP/s per device by precision, from the vendors' data sheets.
# Matched against ``device.device_kind`` in order, first substring wins. float32 entries are
# TF32 tensor-core peaks (XLA and cuDNN use TF32 for float32 convolutions by default on these).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 418.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),  # SXM
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
]


def forward_macs_per_image(model: Any, image_size: int, channels: int = 3) -> int:
    """Analytic MACs of one image's forward pass (abstract evaluation only: nothing runs)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False), x
    )
    # Eval mode: identical convolutions, and BatchNorm needs no batch statistics for batch 1.
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return count_macs(jaxpr.jaxpr)


# XLA's own count of a compiled step (per device), as the training program logs it.
xla_flops = compiled_flops


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The dense peak TFLOP/s of ``device_kind`` at ``dtype`` from ``PEAK_TFLOPS``; None if unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None
