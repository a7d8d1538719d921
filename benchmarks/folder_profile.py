"""Where the image-folder training preprocessing spends its time, per image, in CPU milliseconds.

``python -m benchmarks.folder_profile --jpeg-dir DIR [--rounds 12] [--per-round 48] [--core 0]``

Over the JPEGs in ``DIR`` (``benchmarks.input_pipeline --jpeg-dir DIR`` writes them), in one
process pinned to one core, the stages of ``train/data/image_ops.py``'s ``inception_crop`` training
preprocessing at 224 are timed one by one: opening the file and parsing its header (Pillow),
sampling the crop box, decoding the whole JPEG (simplejpeg, and Pillow for comparison), making
the crop a Pillow image, the antialiased resize, and the flip and copy to NumPy. Beside them, the
whole ``train_image`` with simplejpeg and with Pillow alone, and, when TensorFlow is installed,
its full decode and its crop-only decode (``decode_and_crop_jpeg``) of the same files and boxes,
each in a one-thread tf.data map. Variants alternate in rounds, so a shared machine's load drifts
over all of them alike; prints one JSON object with the per-round medians.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.input_workers import train_file
from benchmarks.report import emit_json, host_environment


def _stages(files: list[str], boxes: list[tuple[int, int, int, int]]) -> dict[str, Callable[[int], Any]]:
    from PIL import Image

    from train.config import default_config
    from train.data import image_ops

    config = default_config()
    config.update(train_augment="inception_crop", random_flip=True)
    data = [open(f, "rb").read() for f in files]
    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]
    crops = [Image.fromarray(px[t : t + h, x : x + w]) for px, (t, x, h, w) in zip(decoded, boxes)]
    resized = [c.resize((224, 224), Image.BILINEAR, reducing_gap=None) for c in crops]

    def pillow_train_image(i: int) -> Any:
        fast, image_ops.simplejpeg = image_ops.simplejpeg, None
        try:
            return train_file(files[i], np.random.default_rng(i), 224, config)
        finally:
            image_ops.simplejpeg = fast

    def sizes(i: int) -> Any:
        return image_ops.upright_size(Image.open(files[i]))

    stages = {
        "open_and_header": sizes,
        "sample_crop": lambda i: image_ops.sample_crop(np.random.default_rng(i), *decoded[i].shape[:2]),
        "decode_pillow": lambda i: Image.open(io.BytesIO(data[i])).load(),
        "crop_to_pillow_image": lambda i: Image.fromarray(
            decoded[i][boxes[i][0] : boxes[i][0] + boxes[i][2], boxes[i][1] : boxes[i][1] + boxes[i][3]]
        ),
        "resize_antialiased": lambda i: crops[i].resize((224, 224), Image.BILINEAR, reducing_gap=None),
        "flip_and_to_numpy": lambda i: np.asarray(resized[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "train_image_simplejpeg": lambda i: train_file(files[i], np.random.default_rng(i), 224, config),
        "train_image_pillow": pillow_train_image,
    }
    if image_ops.simplejpeg is not None:
        stages["decode_simplejpeg"] = lambda i: image_ops.decode_jpeg(data[i])
        # What train_image does instead for a plain JPEG's bytes (image_ops.jpeg_size): no
        # Pillow open, and the box read in place.
        stages["jpeg_size_header"] = lambda i: image_ops.jpeg_size(data[i])
        stages["crop_in_place"] = lambda i: image_ops.crop_box(decoded[i], *boxes[i])
    return stages


def _tf_stages(files: list[str], boxes: list[tuple[int, int, int, int]]) -> dict[str, Callable[[], Any]]:
    """Whole passes over the files (tf.data, one thread): ``name -> run once over every file``."""
    try:
        import tensorflow as tf
    except ImportError:
        return {}
    tf.config.set_visible_devices([], "GPU")
    data = tf.constant([open(f, "rb").read() for f in files])
    windows = tf.constant(np.array(boxes, np.int32))

    def dataset(fn: Callable[[Any, Any], Any]) -> Any:
        ds = tf.data.Dataset.from_tensor_slices((data, windows)).map(fn, num_parallel_calls=1)
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
        return ds.with_options(options)

    full = dataset(lambda d, b: tf.io.decode_jpeg(d, channels=3))
    crop = dataset(lambda d, b: tf.io.decode_and_crop_jpeg(d, b, channels=3))
    return {
        "tf_decode_full": lambda: [None for _ in full.as_numpy_iterator()],
        "tf_decode_and_crop": lambda: [None for _ in crop.as_numpy_iterator()],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from train.data import image_ops

    files = sorted(glob.glob(os.path.join(args.jpeg_dir, "*.jpg")))
    if not files:
        raise SystemExit(
            f"no .jpg files in {args.jpeg_dir}; write some with benchmarks.input_pipeline --jpeg-dir"
        )
    boxes = []
    for i, f in enumerate(files):
        width, height = Image.open(f).size
        boxes.append(image_ops.sample_crop(np.random.default_rng(i), height, width))
    stages = _stages(files, boxes)
    tf_stages = _tf_stages(files, boxes)
    n = len(files)
    samples: dict[str, list[float]] = {name: [] for name in [*stages, *tf_stages]}
    for r in range(args.rounds):
        chosen = [(r * args.per_round + k) % n for k in range(args.per_round)]
        for name, fn in stages.items():
            t = time.process_time()
            for i in chosen:
                fn(i)
            samples[name].append((time.process_time() - t) / len(chosen) * 1e3)
        for name, fn in tf_stages.items():
            t = time.process_time()
            fn()
            samples[name].append((time.process_time() - t) / n * 1e3)
    areas = [h * w / (img_h * img_w) for (_, _, h, w), (img_h, img_w) in zip(boxes, _sizes(files))]
    return {
        "benchmark": "folder_profile",
        "command": "python -m benchmarks.folder_profile " + " ".join(args.argv),
        "environment": host_environment(),
        "files": n,
        "mean_crop_area_fraction": float(np.mean(areas)),
        "unit": "CPU ms per image, median over rounds (min-max)",
        "ms_per_image": {
            name: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for name, v in samples.items()
        },
    }


def _sizes(files: Sequence[str]) -> list[tuple[int, int]]:
    from PIL import Image

    return [Image.open(f).size[::-1] for f in files]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.folder_profile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--jpeg-dir", required=True)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--per-round", type=int, default=48)
    p.add_argument("--core", type=int, default=0, help="the CPU to pin this process to")
    p.add_argument("--output", metavar="FILE")
    args = p.parse_args(argv)
    args.argv = argv
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    result = run(args)
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
