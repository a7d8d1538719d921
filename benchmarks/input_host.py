"""JPEG training preprocessing with Pillow, for hosts without TensorFlow: images/s per core.

``python -m benchmarks.input_host [--cores 1,all] [--model-rate 7200]``

The training program's pipeline is tf.data (``python -m benchmarks.input_pipeline`` times it).
GPU images often ship without TensorFlow, so this replica of the same recipe answers "how many
GPUs' worth of images can this host decode" there: photo-like JPEGs of ImageNet sizes (300-500
px a side, quality 90, written here), then per image: decode, Inception random-resized crop
(area 8-100%, aspect 3/4-4/3, ten tries then the central crop), antialiased bilinear resize to
224 (Pillow's ``resize`` widens its filter when shrinking, as ``tf.image.resize(antialias=True)``),
random flip, ``uint8`` output. One process per core (``multiprocessing``), encoded bytes in
memory. JSON on stdout. Pillow decodes the whole JPEG where TensorFlow decodes only the crop.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.report import available_cpus, emit_json, host_environment


def write_jpegs(count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields, texture, noise): about ImageNet's bytes per pixel."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(300, 501, 2))
        coarse = Image.fromarray(rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)).resize(
            (w, h), Image.BICUBIC
        )
        fine = rng.normal(0, 70, (h // 3, w // 3, 3))
        fine_img = Image.fromarray(np.clip(fine + 128, 0, 255).astype(np.uint8)).resize(
            (w, h), Image.BILINEAR
        )
        pixels = np.asarray(coarse, np.float32) + np.asarray(fine_img, np.float32) - 128
        pixels += rng.normal(0, 14, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def crop_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """Inception-style random-resized crop: (left, top, right, bottom)."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return left, top, left + side, top + side


def preprocess(data: bytes, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = crop_box(rng, img.height, img.width)
    img = img.resize((size, size), Image.BILINEAR, box=box)
    if rng.uniform() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, np.uint8)


_IMAGES: list[bytes] = []


def _worker(args: tuple[int, int]) -> int:
    start, n = args
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        preprocess(_IMAGES[i % len(_IMAGES)], rng)
    return n


def measure(images: list[bytes], processes: int, per_process: int) -> dict[str, Any]:
    global _IMAGES
    _IMAGES = images
    ctx = mp.get_context("fork")
    with ctx.Pool(processes) as pool:
        pool.map(_worker, [(i * 7, 8) for i in range(processes)])  # warm up every worker
        chunks = [(i * per_process, per_process) for i in range(processes)]
        t = time.perf_counter()
        done = sum(pool.map(_worker, chunks, chunksize=1))
        wall = time.perf_counter() - t
    return {
        "processes": processes,
        "images": done,
        "wall_s": wall,
        "images_per_s": done / wall,
        "images_per_s_per_core": done / wall / processes,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.input_host", description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=256, help="distinct JPEGs written")
    p.add_argument("--per-core", type=int, default=400, help="images each process preprocesses")
    p.add_argument("--cores", default="1,all", help="process counts, e.g. 1,4,all")
    p.add_argument("--model-rate", type=float, default=7200.0, help="images/s one accelerator trains")
    p.add_argument("--output", metavar="FILE")
    args = p.parse_args(argv)
    cpus = len(available_cpus())
    counts = [cpus if c.strip() == "all" else int(c) for c in args.cores.split(",")]
    t = time.perf_counter()
    images = write_jpegs(args.num_images)
    write_s = time.perf_counter() - t
    runs = [measure(images, n, args.per_core) for n in counts]
    best = max(runs, key=lambda r: r["images_per_s"])
    import PIL

    result = {
        "benchmark": "input_host",
        "config": {
            "decoder": (
                f"Pillow {PIL.__version__} (TensorFlow absent); replica of train.data.tf_ops' recipe"
            ),
            "num_images": args.num_images,
            "mean_jpeg_bytes": float(np.mean([len(b) for b in images])),
            "per_core": args.per_core,
            "model_rate": args.model_rate,
            "write_s": write_s,
        },
        "environment": host_environment(),
        "command": "python -m benchmarks.input_host " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": runs,
        "host_images_per_s": best["images_per_s"],
        "accelerators_fed_at_model_rate": best["images_per_s"] / args.model_rate,
        "cores_per_accelerator": args.model_rate / max(r["images_per_s_per_core"] for r in runs),
    }
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
