"""Where the image-folder pipeline's CPU time goes, per process and per thread, in ms per image.

``python -m benchmarks.grain_threads --jpeg-dir DIR [--workers 2] [--cores 2] [--batches 24]``

Runs ``train/data/image_folder.py``'s training batches over the JPEGs in ``DIR`` (as
``benchmarks.input_pipeline --jpeg-dir DIR`` writes them) with ``--workers`` Grain worker
processes, pinned to the first ``--cores`` cores, and reads every thread's CPU time (psutil)
before and after the timed batches, in this process (``consumer``) and in each child process
(``child_N``: Grain's workers, and any helper process multiprocessing starts). Each figure is
CPU milliseconds over all images the stream delivered, so a process's threads add up to the
process, and all processes to the CPU cost of one image. Beside it, the same per-image work
alone (``image_ops.train_image`` over the same files in a loop, one thread) in this process:
the stream's overhead is the difference. ``handoff_ms_per_image`` times what a Grain worker does
with each batch it sends, on one batch of the same shape: Grain's ``copy_to_shm`` into a new
shared-memory segment (then unlinked, as the consumer does), against the same copy into memory
that is reused. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.report import emit_json, host_environment


def _cpu_by_thread(processes) -> dict[tuple[str, int], float]:
    import psutil

    out = {}
    for role, proc in processes:
        try:
            for t in proc.threads():
                out[(role, t.id)] = t.user_time + t.system_time
        except psutil.NoSuchProcess:
            pass
    return out


def measure(jpeg_dir: str, workers: int, batches: int, batch: int = 64, warmup: int = 6) -> dict[str, Any]:
    import numpy as np
    import psutil

    from benchmarks.input_workers import augment_fields, folder_config, train_file
    from train.data.image_folder import ImageFolderSource

    config = folder_config(jpeg_dir, 224, workers)
    it = iter(ImageFolderSource(config).train_batches(config, batch, 0, 0, 1))
    for _ in range(warmup):
        next(it)
    me = psutil.Process()
    processes = [("consumer", me)] + [(f"child_{i}", p) for i, p in enumerate(me.children(recursive=True))]
    before, t0 = _cpu_by_thread(processes), time.perf_counter()
    for _ in range(batches):
        next(it)
    after, wall = _cpu_by_thread(processes), time.perf_counter() - t0
    it.close()
    images = batches * batch
    per_thread: dict[str, list[float]] = {}
    for key, cpu in after.items():
        used = cpu - before.get(key, 0.0)
        if used > 0:
            per_thread.setdefault(key[0], []).append(round(1e3 * used / images, 4))
    per_process = {role: round(sum(v), 4) for role, v in per_thread.items()}

    # The same work alone: train_image over the same files, one thread, this process.
    files = sorted(glob.glob(os.path.join(jpeg_dir, "*.jpg")))
    rng = np.random.default_rng(0)
    aug = augment_fields(config)
    for path in files[:16]:
        train_file(path, rng, 224, aug)
    alone_files = files[:images]
    t = time.thread_time()  # this thread only: Grain's threads may still be winding down
    for path in alone_files:
        train_file(path, rng, 224, aug)
    alone = 1e3 * (time.thread_time() - t) / len(alone_files)
    total = sum(per_process.values())
    return {
        "workers": workers,
        "images": images,
        "images_per_s": images / wall,
        "cpu_ms_per_image": {
            "total": round(total, 4),
            "per_process": per_process,
            "per_thread": {role: sorted(v, reverse=True) for role, v in per_thread.items()},
            "work_alone": round(alone, 4),
            "overhead": round(total - alone, 4),
        },
    }


def handoff(batch: int, size: int = 224, repeats: int = 30) -> dict[str, float]:
    """CPU ms per image of handing one ``uint8 [batch, size, size, 3]`` batch to another process:
    ``new_segment`` (Grain's ``copy_to_shm``, one new segment per batch, unlinked after) and
    ``reused_memory`` (the same bytes copied into one buffer every time); medians of ``repeats``."""
    import numpy as np
    from grain._src.python.ipc import shared_memory_array

    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    out = np.empty_like(x)

    def new_segment():
        shared_memory_array.unlink_shm(shared_memory_array.copy_to_shm(x, min_size=0))

    def reused_memory():
        np.copyto(out, x)

    result = {}
    for name, fn in (("new_segment", new_segment), ("reused_memory", reused_memory)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.thread_time()
            fn()
            times.append(time.thread_time() - t)
        result[name] = round(1e3 * float(np.median(times)) / batch, 4)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grain_threads", description=__doc__.split("\n")[0])
    p.add_argument("--jpeg-dir", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores", type=int, default=0, help="pin to the first N cores (0: leave as is)")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if not glob.glob(os.path.join(args.jpeg_dir, "*.jpg")):
        raise SystemExit(
            f"--jpeg-dir {args.jpeg_dir}: no .jpg files; write them first with python -m "
            f"benchmarks.input_pipeline --jpeg-dir {args.jpeg_dir} --variants grain --total-images 128"
        )
    if args.cores and hasattr(os, "sched_setaffinity"):
        from benchmarks.report import available_cpus

        os.sched_setaffinity(0, set(available_cpus()[: args.cores]))
    result = {
        "benchmark": "grain_threads",
        "environment": host_environment(),
        **measure(args.jpeg_dir, args.workers, args.batches, args.batch),
        "handoff_ms_per_image": handoff(args.batch),
    }
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
