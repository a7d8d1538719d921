"""Input-pipeline benchmark: images/s per host core of the ImageNet training preprocessing.

``python -m benchmarks.input_pipeline [--num-images 256] [--cores 1,all] [--model-rate 7200]``

Writes ``--num-images`` JPEG files of ImageNet-like sizes (300-500 px a side, smooth colour
fields with texture and noise, quality 90; about the bytes per pixel of ImageNet's photos), then
for each ``--cores`` value runs, in a fresh process confined to that many CPUs
(``sched_setaffinity`` before TensorFlow starts), the training program's preprocessing from
``train/data/tf_ops.py`` (JPEG shape, Inception random-resized crop box, decode of the crop only,
antialiased bilinear resize, rounding to uint8, random flip; normalisation runs on the
accelerator) in a tf.data map with that many threads, batched to numpy as the training loop
receives it. The encoded files are read into memory first,
so disk speed does not count. Prints one JSON object with images/s, images/s per core and
the number of cores needed to feed one accelerator at ``--model-rate`` images/s.

``--variants pipeline,replica,float_out,no_antialias,fast_dct`` also times copies of the
preprocessing with one change each (float32 normalised on the host instead of uint8 pixels, no
antialiasing in the resize, the fast integer IDCT), to show what moves the per-core rate.

``--variants grain`` times the image-folder pipeline instead (``train/data/image_folder.py``: Grain
and Pillow, no TensorFlow) on the same files laid out as ``ROOT/train/<class>/``, with as many
Grain worker processes as cores (inheriting the pinning), batched to numpy as the training loop
receives it; the files are read from disk (the page cache after the warm-up batches), decoded by
simplejpeg (as TF decodes them), cropped, resized (antialiased bilinear) and flipped by
``train/data/image_ops.py``.
``--grain-workers 0,1,2`` sets the worker counts to try on each core count instead; ``-1`` is
what the training program starts by default (``grain_worker_count=-1``: none on one or two
cores, one per core otherwise); a count that repeats on a core count (``-1,0`` on two cores)
runs once.
``work_only`` times the same per-image work (``image_ops.train_image``) with nothing around it:
one independent process per core, no Grain, no batches. Its rate over the cores is what this
machine gives that work, the ceiling against which Grain's scaling is read.
``grain_pillow`` is the same with simplejpeg hidden from the worker process and its Grain workers,
so that Pillow decodes every JPEG (accurate IDCT: pixels a few levels from TF's; what a machine
without simplejpeg gets).

Each run also reports ``images_per_cpu_s``: images per CPU second used by the run's process and
its child processes (Grain's workers) while timed. On a machine shared with other jobs the
wall-clock rate swings with their load; the CPU rate measures the pipeline's own work per core.

Needs TensorFlow for the tf.data variants. Without it (the GPU host) the JPEGs are written by
Pillow, and the ``grain`` and ``work_only`` variants run; their processes do not import it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from benchmarks.input_workers import GRAIN_VARIANTS, VARIANTS, _tf, run_worker
from benchmarks.report import available_cpus, emit_json, host_environment, pin_to_cores

GPU_TARGET_IMAGES_PER_S = 7200.0  # ResNet-50 bfloat16 training on one H100 (BENCHMARKS.md)


# ----------------------------------------------------------------------------------------------
# Synthetic JPEGs.


def _resize_float(a, h: int, w: int, method: str, tf):
    """``a`` (float32, [H, W, C]) resized to ``h`` x ``w``: TensorFlow's resize where it is
    installed, else Pillow's (the GPU host has no TensorFlow)."""
    import numpy as np

    if tf is not None:
        return tf.image.resize(a[None], (h, w), method).numpy()[0]
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[method]
    return np.stack(
        [
            np.asarray(Image.fromarray(a[..., c], mode="F").resize((w, h), resample))
            for c in range(a.shape[-1])
        ],
        axis=-1,
    )


def write_jpegs(directory: str, count: int, seed: int = 0, quality: int = 90) -> dict[str, Any]:
    """Write ``count`` photo-like JPEGs to ``directory``; returns their mean size and bytes.

    Encoded by TensorFlow where it is installed, else by Pillow (``writer`` in the result): the
    same synthetic content, and files of about the same size, but not the same bytes."""
    import numpy as np

    try:
        tf = _tf()
    except ImportError:
        tf = None
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes, nbytes = [], []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(300, 501, 2))
        # Large smooth regions plus finer texture plus sensor-like noise: about 0.65 bytes per
        # pixel at quality 90, as ImageNet's photos (~110 KB at ~400x400 on average), so the
        # JPEG decoder has a realistic amount of work per pixel.
        coarse = _resize_float(rng.uniform(0, 255, (6, 6, 3)).astype("float32"), h, w, "bicubic", tf)
        fine = rng.normal(0, 70, (h // 3, w // 3, 3)).astype("float32")
        fine = _resize_float(fine, h, w, "bilinear", tf)
        noise = rng.normal(0, 14, (h, w, 3)).astype("float32")
        image = np.clip(coarse + fine + noise, 0, 255).astype(np.uint8)
        if tf is not None:
            data = tf.io.encode_jpeg(image, quality=quality).numpy()
        else:
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=quality)
            data = buf.getvalue()
        with open(os.path.join(directory, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(data)
        sizes.append((h, w))
        nbytes.append(len(data))
    return {
        "count": count,
        "writer": f"tensorflow {tf.__version__}" if tf is not None else "Pillow",
        "mean_height": float(np.mean([s[0] for s in sizes])),
        "mean_width": float(np.mean([s[1] for s in sizes])),
        "mean_bytes": float(np.mean(nbytes)),
        "mean_bytes_per_pixel": float(np.sum(nbytes) / np.sum([h * w for h, w in sizes])),
        "quality": quality,
    }


def ensure_jpegs(directory: str, count: int, seed: int = 0) -> dict[str, Any]:
    """The ``.jpg`` files already in ``directory`` (their count), else ``write_jpegs``' new ones."""
    existing = glob.glob(os.path.join(directory, "*.jpg"))
    if existing:
        return {"count": len(existing), "note": f"existing files in {directory}"}
    t = time.perf_counter()
    jpegs = write_jpegs(directory, count, seed)
    jpegs["generation_s"] = time.perf_counter() - t
    return jpegs


@contextlib.contextmanager
def jpeg_folder(directory: str | None, count: int, seed: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(directory, ensure_jpegs(...))``; with no ``directory``, a temporary one removed after."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="resnet_jax_jpegs_"))
        yield directory, ensure_jpegs(directory, count, seed)


# ----------------------------------------------------------------------------------------------
# Driver: one process per core count.


def core_counts(spec: str) -> list[int]:
    available = len(available_cpus())
    out = []
    for part in spec.split(","):
        part = part.strip()
        n = available if part == "all" else int(part)
        if not 1 <= n <= available:
            raise SystemExit(f"--cores {part}: this machine has {available} usable cores.")
        if n not in out:
            out.append(n)
    return out


def _require_tensorflow_for(variants: Sequence[str]) -> None:
    tf_variants = [v for v in variants if v not in GRAIN_VARIANTS and v != "work_only"]
    if not tf_variants:
        return
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"--variants {','.join(tf_variants)} time the tf.data pipeline and need TensorFlow "
            f"({e}): pip install -e '.[test]', or time only --variants grain,work_only"
        ) from None


def run_all(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    _require_tensorflow_for(args.variants)
    with jpeg_folder(args.jpeg_dir, args.num_images, args.seed) as (jpeg_dir, jpegs):
        runs = []
        # -1: what the training program starts with grain_worker_count=-1 on that many cores; a
        # count that repeats within one variant and core count (-1,0 on two cores) runs once.
        from train.data.image_folder import default_worker_count

        plan = [
            (variant, cores, workers)
            for variant, cores in itertools.product(args.variants, core_counts(args.cores))
            for workers in dict.fromkeys(
                (default_worker_count(cores) if w < 0 else w for w in (args.grain_workers_list or [cores]))
                if variant in GRAIN_VARIANTS
                else [0]
            )
        ]
        for variant, cores, workers in plan:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.input_pipeline",
                "--worker",
                "--jpeg-dir",
                jpeg_dir,
                "--threads",
                str(cores),
                "--pin-cores",
                str(cores),
                "--image-size",
                str(args.image_size),
                "--batch",
                str(args.batch),
                "--total-images",
                str(args.total_images),
                "--warmup-batches",
                str(args.warmup_batches),
                "--seed",
                str(args.seed),
                "--variant",
                variant,
                "--grain-workers",
                str(workers),
            ]
            print(
                f"[benchmark_input] {variant}, {cores} core(s)"
                + (f", {workers} Grain worker(s)" if variant in GRAIN_VARIANTS else ""),
                file=sys.stderr,
                flush=True,
            )
            env = None
            if variant == "grain_pillow":
                # A module of that name that fails to import, first on the path of the worker
                # process and of the Grain workers it spawns: train.data.image_ops falls back to Pillow.
                blocker = os.path.join(jpeg_dir, "no_simplejpeg")
                os.makedirs(blocker, exist_ok=True)
                with open(os.path.join(blocker, "simplejpeg.py"), "w") as f:
                    f.write("raise ImportError('hidden by benchmarks.input_pipeline (grain_pillow)')\n")
                path = os.environ.get("PYTHONPATH")
                env = dict(os.environ, PYTHONPATH=blocker + (os.pathsep + path if path else ""))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"worker with {cores} core(s) failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout))

    # The per-core rate comes from the pipeline's fewest-core run: more threads share caches
    # and memory bandwidth, so a single core's rate is the honest unit to multiply.
    own = [r for r in runs if r["variant"] == "pipeline"] or runs
    base = min(own, key=lambda r: r["cores"])
    per_core = base["images_per_s_per_core"]
    grain_runs = [r for r in runs if r["variant"] == "grain"]
    grain_summary = {
        f"{r['cores']} core(s), {r['grain_workers']} worker(s)": round(r["images_per_s_per_core"], 1)
        for r in grain_runs
    }
    return {
        "benchmark": "input_pipeline",
        "config": {
            "image_size": args.image_size,
            "batch": args.batch,
            "total_images_per_run": max(args.total_images // args.batch, 1) * args.batch,
            "preprocessing": "train.data.tf_ops training preprocessing, train_augment="
            "'inception_crop' + random_flip: extract_jpeg_shape, stateless_sample_distorted_"
            "bounding_box (area 0.08-1, aspect 3/4-4/3), decode_and_crop_jpeg, antialiased "
            "bilinear resize, round to uint8, flip (mean/std normalisation runs in the jitted "
            "step); tf.data map + batch to numpy",
            "encoded_files": "read into memory before timing (no disk I/O)",
        },
        "jpegs": jpegs,
        "environment": {
            **host_environment(),
            "tensorflow": next((r["tensorflow"] for r in runs if "tensorflow" in r), None),
        },
        "command": "python -m benchmarks.input_pipeline " + " ".join(argv),
        "runs": runs,
        "images_per_s_per_core": per_core,
        "images_per_s_per_core_from": f"variant {base['variant']!r}, {base['cores']} core(s)",
        "model_rate_images_per_s": args.model_rate,
        "cores_to_feed_model_rate": math.ceil(args.model_rate / per_core),
        **({"grain_images_per_s_per_core": grain_summary} if grain_runs else {}),
        "scaling": scaling(runs),
    }


def scaling(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per core count: each variant's median images/s over its rounds, its scaling from the
    fewest cores measured, and Grain's rate over ``work_only``'s (the same per-image work in
    independent processes: how far the machine itself scales it).

    A Grain run with the worker count the training program starts by default on its cores
    (``default_worker_count``) counts as its variant; one with another count is its own
    variant, ``<variant>_in_process`` (no workers) or ``<variant>_<N>_workers``, reported over
    the default at the same cores and scaled from the default's fewest-core rate.
    """
    import statistics

    from train.data.image_folder import default_worker_count

    def label(r: dict[str, Any]) -> str:
        w = r.get("grain_workers")
        if w is None or w == default_worker_count(r["cores"]):
            return r["variant"]
        return f"{r['variant']}_in_process" if w == 0 else f"{r['variant']}_{w}_workers"

    rates: dict[str, dict[int, list[float]]] = {}
    of: dict[str, str] = {}
    for r in runs:
        name = label(r)
        rates.setdefault(name, {}).setdefault(r["cores"], []).append(r["images_per_s"])
        of[name] = r["variant"]
    out: dict[int, dict[str, float]] = {}
    for name, by_cores in rates.items():
        home = rates.get(of[name], by_cores)
        base = statistics.median(home[min(home)])
        for cores, values in sorted(by_cores.items()):
            row = out.setdefault(cores, {})
            row[f"{name}_images_per_s"] = round(statistics.median(values), 1)
            row[f"{name}_scaling"] = round(statistics.median(values) / base, 3)
    for row in out.values():
        for name, variant in of.items():
            if name != variant and f"{name}_images_per_s" in row and f"{variant}_images_per_s" in row:
                row[f"{name}_over_{variant}"] = round(
                    row[f"{name}_images_per_s"] / row[f"{variant}_images_per_s"], 3
                )
        if "grain_images_per_s" in row and "work_only_images_per_s" in row:
            row["grain_over_work_only"] = round(row["grain_images_per_s"] / row["work_only_images_per_s"], 3)
    return {f"{cores} core(s)": row for cores, row in sorted(out.items())}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.input_pipeline",
        description="Images/s per core of the ImageNet training preprocessing (JSON on stdout).",
    )
    p.add_argument("--num-images", type=int, default=256, help="distinct JPEG files to write")
    p.add_argument("--jpeg-dir", help="use (or fill, if empty) this directory instead of a temp one")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--total-images", type=int, default=2048, help="timed images per run")
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--cores", default="1,all", help="comma-separated core counts, or 'all'")
    p.add_argument(
        "--model-rate",
        type=float,
        default=GPU_TARGET_IMAGES_PER_S,
        help="training images/s of one accelerator, to size the host (default: the H100 target)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants",
        default="pipeline",
        help=f"comma-separated, from {', '.join(VARIANTS)}: the pipeline's own preprocessing and "
        "copies of it with one change each, to see what would make it faster",
    )
    p.add_argument(
        "--grain-workers",
        dest="grain_workers_spec",
        default="",
        help="grain variant: comma-separated Grain worker counts to try per core count; -1: the "
        "training program's default for that many cores (default: as many as cores)",
    )
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    # Internal: one measurement in this process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--pin-cores", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="pipeline", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    spec = [v.strip() for v in args.grain_workers_spec.split(",") if v.strip()]
    args.grain_workers_list = [int(v) for v in spec]
    args.grain_workers = args.grain_workers_list[0] if args.worker and spec else 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    for name in ("num_images", "image_size", "batch", "total_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        # Before TensorFlow starts: its thread pools are sized from, and confined to, these.
        pin_to_cores(args.pin_cores)
        result = run_worker(args)
    else:
        result = run_all(args, argv)
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
