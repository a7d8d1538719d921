"""What one pinned worker process of ``python -m benchmarks.input_pipeline`` runs.

The driver (``benchmarks/input_pipeline.py``) starts one process per core count, confined to
those cores, with ``--worker``. That process times one preprocessing variant here: the training
program's tf.data preprocessing (``pipeline``), a copy of it with one change (``replica``,
``float_out``, ``no_antialias``, ``fast_dct``), or the image-folder pipeline through Grain
(``grain``, ``grain_pillow``), and returns its rate per wall-clock second and per CPU second.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # host-side work only
    return tf


# ----------------------------------------------------------------------------------------------
# The preprocessing under test.


def training_preprocess_fn(image_size: int, channels: int = 3) -> Callable[[Any, Any], Any]:
    """``fn(encoded_jpeg, seed[2]) -> uint8 [size, size, C]``: the training program's own code."""
    from train.config import default_config
    from train.data import core, tf_ops

    info = core.DatasetInfo(
        name="jpeg-benchmark",
        num_classes=1000,
        image_shape=(image_size, image_size, channels),
        num_train_examples=0,
        num_eval_examples=0,
        class_names=(),
        mean=core.IMAGENET_MEAN,
        std=core.IMAGENET_STD,
    )
    config = default_config()
    config.update(train_augment="inception_crop", random_flip=True)
    return lambda image, seed: tf_ops.preprocess_train_image(
        image, seed, info, config, jpeg=True, encoded=True
    )


# Variants of the same work, to see what moves the per-core rate. Each is one change that the
# pipeline could make; ``replica`` is a plain copy of the pipeline's ops, to show that the copies
# measure the same thing as the pipeline. ``float_out`` normalises to float32 on the host, as the
# pipeline did before it handed uint8 pixels to the accelerator.
VARIANTS = (
    "pipeline",
    "replica",
    "float_out",
    "no_antialias",
    "fast_dct",
    "grain",
    "grain_pillow",
    "work_only",
)
GRAIN_VARIANTS = ("grain", "grain_pillow")


def variant_preprocess_fn(variant: str, image_size: int, channels: int = 3) -> Callable[[Any, Any], Any]:
    """The training preprocessing with one change (see ``VARIANTS``); ``'pipeline'`` is the real one."""
    if variant == "pipeline":
        return training_preprocess_fn(image_size, channels)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    from train.data.core import IMAGENET_MEAN, IMAGENET_STD

    tf = _tf()
    antialias = variant != "no_antialias"
    dct = "INTEGER_FAST" if variant == "fast_dct" else ""

    def fn(image, seed):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(image),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
            seed=crop_seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        image = tf.io.decode_and_crop_jpeg(image, window, channels=channels, dct_method=dct)
        image = tf.image.resize(image, [image_size, image_size], "bilinear", antialias=antialias)
        if variant == "float_out":
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
            mean = tf.constant(IMAGENET_MEAN, tf.float32)
            std = tf.constant(IMAGENET_STD, tf.float32)
            return (image - mean) / std
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)

    return fn


def _folder_layout(jpeg_dir: str) -> str:
    """``jpeg_dir/folder/{train,val}/c0/*.jpg`` as symlinks to the files: an image folder."""
    root = os.path.join(jpeg_dir, "folder")
    files = sorted(glob.glob(os.path.join(jpeg_dir, "*.jpg")))
    for split, chosen in (("train", files), ("val", files[:1])):
        os.makedirs(os.path.join(root, split, "c0"), exist_ok=True)
        for path in chosen:
            link = os.path.join(root, split, "c0", os.path.basename(path))
            if not os.path.exists(link):
                os.symlink(os.path.abspath(path), link)
    return root


def cpu_seconds() -> float | None:
    """CPU time (user + system) of this process and its child processes (Grain's workers) so
    far, from /proc (None where there is none). On a shared machine the wall-clock rate swings
    with the other jobs; the images per CPU second that the pipeline itself used do not."""
    total = sum(os.times()[:2])
    try:
        children = set()
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(int(pid) for pid in f.read().split())
        for pid in children:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    return total


def _minus(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else end - start


def _time_batches(it: Any, warmup: int, batches: int) -> tuple[float, float | None, dict[str, Any]]:
    """Wall seconds and CPU seconds (``cpu_seconds``) that ``batches`` batches of ``it`` take
    after ``warmup`` untimed ones, and the last batch."""
    for _ in range(warmup):
        batch = next(it)
    t, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        batch = next(it)
    return time.perf_counter() - t, _minus(cpu_seconds(), cpu), batch


def _rate_record(
    variant: str, images: int, elapsed: float, batch: dict[str, Any], cpu: float | None = None
) -> dict[str, Any]:
    """The fields every variant's run reports: its rate over the cores this process may use,
    and per CPU second used (``cpu``: CPU seconds of the timed batches, ``cpu_seconds``)."""
    from benchmarks.report import available_cpus

    cores = len(available_cpus())
    return {
        "variant": variant,
        "cores": cores,
        "images": images,
        "seconds": elapsed,
        "images_per_s": images / elapsed,
        "images_per_s_per_core": images / elapsed / cores,
        "cpu_seconds": cpu,
        "images_per_cpu_s": images / cpu if cpu else None,
        "output_shape": list(batch["image"].shape),
        "output_dtype": str(batch["image"].dtype),
    }


def folder_config(jpeg_dir: str, image_size: int, grain_workers: int, seed: int = 0) -> Any:
    """The training config the Grain variants time: ``jpeg_dir`` as an image folder, Inception
    crop and flip at ``image_size``, ``grain_workers`` worker processes with 2 batches each."""
    from train.config import default_config

    config = default_config()
    config.update(
        {
            "data_dir": _folder_layout(jpeg_dir),
            "image_size": image_size,
            "seed": seed,
            "train_augment": "inception_crop",
            "random_flip": True,
            "grain_worker_count": grain_workers,
            "grain_worker_buffer_size": 2,
        }
    )
    return config


def augment_fields(config: Any) -> Any:
    """The options the Grain path hands its workers (``train/data/augment.py``): what
    ``image_ops.train_image`` reads, for timing it outside Grain."""
    from train.data.augment import AugmentOptions

    return AugmentOptions.from_config(config)


def time_folder_training(
    variant: str, config: Any, batch: int, total_images: int, warmup_batches: int
) -> dict[str, Any]:
    """``_rate_record`` of ``train/data/image_folder.py``'s training batches under ``config``
    (``folder_config``, with any other training fields set): about ``total_images`` images in
    whole batches of ``batch``, timed after the warm-up batches and each Grain worker's first."""
    from train.data.image_folder import ImageFolderSource, worker_count

    source = ImageFolderSource(config)
    batches = max(total_images // batch, 1)
    # The stream runs over epochs of the files without a pause, as in training.
    it = iter(source.train_batches(config, batch, 0, 0, 1))
    warmup = max(warmup_batches, 1) + 2 * worker_count(config)  # each worker's first batches
    elapsed, cpu, last = _time_batches(it, warmup, batches)
    it.close()
    return _rate_record(variant, batches * batch, elapsed, last, cpu)


def run_grain_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``train/data/image_folder.py``'s training batches with ``args.grain_workers`` workers."""
    from train.data import image_ops

    if (args.variant == "grain_pillow") != (image_ops.simplejpeg is None):
        raise RuntimeError(
            f"variant {args.variant}: simplejpeg is {'' if image_ops.simplejpeg else 'not '}importable"
        )

    config = folder_config(args.jpeg_dir, args.image_size, args.grain_workers, args.seed)
    record = time_folder_training(args.variant, config, args.batch, args.total_images, args.warmup_batches)
    import grain
    import PIL

    return {
        **record,
        "grain_workers": args.grain_workers,
        "jpeg_decoder": "simplejpeg" if image_ops.simplejpeg is not None else "pillow",
        "grain": getattr(grain, "__version__", "?"),
        "pillow": PIL.__version__,
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def train_file(path: str, rng: np.random.Generator, size: int, config: Any) -> np.ndarray:
    """One training example's work as the image-folder path does it: read the file's bytes, then
    ``image_ops.train_image`` (``train/data/image_folder.py``'s ``load_example``)."""
    from train.data import image_folder, image_ops

    return image_ops.train_image(image_folder.read_bytes(path), rng, size, config)


def _work_only_process(core: int, paths: list[str], config: Any, size: int, start: Any, done: Any) -> None:
    """One of ``run_work_only``'s processes: warm up, wait for ``start``, preprocess ``paths``."""
    os.sched_setaffinity(0, {core})
    rng = np.random.default_rng(core)
    for path in paths[:16]:
        train_file(path, rng, size, config)
    done.put(-1)  # ready
    start.wait()
    for path in paths:
        train_file(path, rng, size, config)
    done.put(core)


def run_work_only(args: argparse.Namespace) -> dict[str, Any]:
    """The image-folder path's per-image work alone (``image_ops.train_image`` on the same files,
    same config) in one independent process per core: no Grain, no batching, nothing shared.
    Its rate over cores is what this machine gives that work: the ceiling for Grain's scaling."""
    import multiprocessing as mp

    from train.config import default_config

    config = default_config()
    config.update({"train_augment": "inception_crop", "random_flip": True})
    aug = augment_fields(config)
    files = sorted(glob.glob(os.path.join(args.jpeg_dir, "*.jpg")))
    cores = sorted(os.sched_getaffinity(0))
    images = max(args.total_images // args.batch, 1) * args.batch
    per_core = -(-images // len(cores))
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_work_only_process,
            args=(
                c,
                [files[(i * per_core + j) % len(files)] for j in range(per_core)],
                aug,
                args.image_size,
                start,
                done,
            ),
        )
        for i, c in enumerate(cores)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        done.get()  # every process warmed up
    t, cpu = time.perf_counter(), cpu_seconds()
    start.set()
    for _ in procs:
        done.get()
    elapsed, cpu = time.perf_counter() - t, _minus(cpu_seconds(), cpu)
    for p in procs:
        p.join()
    one = train_file(files[0], np.random.default_rng(0), args.image_size, aug)
    batch = {"image": one[None]}  # one image: nothing is batched
    return {**_rate_record(args.variant, per_core * len(cores), elapsed, batch, cpu), "processes": len(cores)}


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time the preprocessing with ``args.threads`` threads in this process."""
    if args.variant in GRAIN_VARIANTS:
        return run_grain_worker(args)
    if args.variant == "work_only":
        return run_work_only(args)
    tf = _tf()
    files = sorted(glob.glob(os.path.join(args.jpeg_dir, "*.jpg")))
    if not files:
        raise SystemExit(f"no .jpg files in {args.jpeg_dir}")
    encoded = []
    for path in files:
        with open(path, "rb") as f:
            encoded.append(f.read())
    preprocess = variant_preprocess_fn(args.variant, args.image_size)
    batches = max(args.total_images // args.batch, 1)
    warmup = max(args.warmup_batches, 1)
    repeats = math.ceil((batches + warmup) * args.batch / len(files))

    def prep(index, image):
        seed = tf.stack([tf.constant(args.seed, tf.int64), index])  # as the training pipeline
        return {"image": preprocess(image, seed), "label": tf.constant(0, tf.int32)}

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(encoded)).repeat(repeats).enumerate()
    ds = ds.map(prep, num_parallel_calls=args.threads, deterministic=True)
    ds = ds.batch(args.batch, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = args.threads
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)

    elapsed, cpu, batch = _time_batches(ds.as_numpy_iterator(), warmup, batches)
    return {
        **_rate_record(args.variant, batches * args.batch, elapsed, batch, cpu),
        "threads": args.threads,
        "tensorflow": tf.__version__,
    }
