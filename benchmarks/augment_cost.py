"""Host cost of the per-image augmentation policies: ``python -m benchmarks.augment_cost``.

For each op of ``train.augment.apply_op`` (torchvision's convention, at a mid-range magnitude)
and each ``auto_augment`` policy, the median time per image over ``--repeats`` runs on one core,
on random ``uint8`` images of ``--size`` pixels (the RandomResizedCrop output); beside it,
torchvision's ``transforms.v2`` on the same uint8 tensor (one torch thread) when it imports, the
two alternating call by call. ``--interpolation`` is the geometric ops' sampling on both sides
(torchvision's policies default to nearest; its reference training script passes bilinear, as
``configs/imagenet_resnet50_tv_v2.py`` does). JSON on stdout (microseconds per image).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.report import emit_json, host_environment
from train.augment import OPS, apply_op
from train.data import autoaugment

# A mid-range magnitude per op, in torchvision's units (bin 15 of TrivialAugmentWide's 31, roughly).
MAGNITUDES = {
    "ShearX": 0.5,
    "ShearY": 0.5,
    "TranslateX": 16.0,
    "TranslateY": 16.0,
    "Rotate": 67.5,
    "Brightness": 0.5,
    "Color": 0.5,
    "Contrast": 0.5,
    "Sharpness": 0.5,
    "Posterize": 5,
    "Solarize": 0.5,
}
POLICIES = ("ta_wide", "ra", "aa", "rand-m9-mstd0.5-inc1", "rand-m7-mstd0.5")


def _median_us(*fns: Callable[[int], Any], repeats: int) -> list[float]:
    """Median microseconds per call of each of ``fns``, called in turn (alternating)."""
    times: list[list[float]] = [[] for _ in fns]
    for k in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn(k)
            out.append(time.perf_counter() - start)
    return [1e6 * statistics.median(t) for t in times]


def _torchvision() -> Any:
    try:
        from resnet_jax.torch_reference import import_reference

        import_reference("torchvision")
        import torch
        from torchvision.transforms import v2

        torch.set_num_threads(1)
        return torch, v2, v2.InterpolationMode
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--interpolation", default="nearest", choices=("nearest", "bilinear"))
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(4)]
    ref = _torchvision()
    tensors = [] if ref is None else [ref[0].from_numpy(im).permute(2, 0, 1).contiguous() for im in images]
    ops: dict[str, dict[str, float]] = {}
    for name in OPS:
        m = MAGNITUDES.get(name, 0.0)

        def ours(k, name=name, m=m):
            apply_op(images[k % 4], name, m, interpolation=args.interpolation)

        if ref is None:
            (ours_us,) = _median_us(ours, repeats=args.repeats)
            ops[name] = {"ours_us": ours_us}
            continue
        ta = ref[1].TrivialAugmentWide(interpolation=getattr(ref[2], args.interpolation.upper()))

        def tv(k, name=name, m=m, ta=ta):
            ta._apply_image_or_video_transform(
                tensors[k % 4], name, m, interpolation=ta.interpolation, fill=ta._fill
            )

        ours_us, tv_us = _median_us(ours, tv, repeats=args.repeats)
        ops[name] = {"ours_us": ours_us, "torchvision_us": tv_us}
    policies: dict[str, dict[str, float]] = {}
    for spec in POLICIES:
        policy = autoaugment.make_policy(spec, interpolation=args.interpolation)
        gen = np.random.default_rng(1)
        (us,) = _median_us(lambda k, p=policy, g=gen: p(images[k % 4], g), repeats=args.repeats)
        policies[spec] = {"ours_us": us}
    result = {
        "benchmark": "augment_cost",
        "image_size": args.size,
        "repeats": args.repeats,
        "interpolation": args.interpolation,
        "ops": ops,
        "policies": policies,
        **host_environment(),
    }
    emit_json(result, args.output)


if __name__ == "__main__":
    main()
