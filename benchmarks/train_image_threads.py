"""``image_ops.train_image`` on a file's bytes against the same file opened by Pillow, in 1 and
in N threads of one process: the per-image work of the image-folder path, and how much of it
holds the GIL.

``python -m benchmarks.train_image_threads --jpeg-dir DIR [--rounds 6] [--images 512] [--threads 2]``

Each round times, in alternating order, ``train_image(bytes)`` (what ``train/data/image_folder.py``
hands it: a plain JPEG's header from ``image_ops.jpeg_size``, no Pillow ``open``) and
``train_image(Image.open(path))`` (Pillow parses the header and the EXIF block in Python), each
in one thread and then in ``--threads`` threads. Both read the file and give the same pixels
(``tests/test_image_folder.py``). Thread scaling below the core count is time in which a thread
waits for the GIL. Reports images/s, per-round ratios and their medians, and prints one JSON
object.
"""

from __future__ import annotations

import argparse
import glob
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.report import emit_json, host_environment

INPUTS = ("bytes", "pillow_open")


def _work(kind: str) -> Callable[[str, np.random.Generator, Any], np.ndarray]:
    from benchmarks.input_workers import train_file
    from train.data import image_ops

    def from_bytes(path, rng, config):
        return train_file(path, rng, 224, config)

    def from_pillow(path, rng, config):
        return image_ops.train_image(image_ops.open_image(path), rng, 224, config)

    return {"bytes": from_bytes, "pillow_open": from_pillow}[kind]


def _rate(fn, files: list[str], config: Any, threads: int, images: int) -> float:
    """Images/s of ``threads`` threads, each running ``fn`` over ``images`` files."""

    def loop(k: int) -> None:
        for i in range(images):
            fn(files[(7 * i + k) % len(files)], np.random.default_rng([k, i]), config)

    pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    return threads * images / (time.perf_counter() - t)


def measure(jpeg_dir: str, rounds: int, images: int, threads: int) -> dict[str, Any]:
    from benchmarks.input_workers import augment_fields, folder_config

    files = sorted(glob.glob(os.path.join(jpeg_dir, "*.jpg")))
    if not files:
        raise SystemExit(f"no .jpg files in {jpeg_dir}; write some with benchmarks.input_pipeline --jpeg-dir")
    config = augment_fields(folder_config(jpeg_dir, 224, 0))
    works = {kind: _work(kind) for kind in INPUTS}
    for fn in works.values():  # warm up
        _rate(fn, files, config, 1, min(images, 32))
    per_round = []
    for r in range(rounds):
        order = INPUTS if r % 2 == 0 else INPUTS[::-1]
        row = {}
        for n in (1, threads):
            for kind in order:
                row[f"{kind}_{n}t"] = _rate(works[kind], files, config, n, images)
        per_round.append(row)

    def med(values) -> float:
        return round(float(np.median(values)), 3)

    summary = {key: med([row[key] for row in per_round]) for key in per_round[0]}
    ratios = {}
    for n in (1, threads):
        ratios[f"bytes_over_pillow_open_{n}t"] = med(
            [r[f"bytes_{n}t"] / r[f"pillow_open_{n}t"] for r in per_round]
        )
    for kind in INPUTS:
        ratios[f"{kind}_scaling_1_to_{threads}t"] = med(
            [r[f"{kind}_{threads}t"] / r[f"{kind}_1t"] for r in per_round]
        )
    return {
        "benchmark": "train_image_threads",
        **host_environment(),
        "files": len(files),
        "images_per_thread": images,
        "threads": threads,
        "rounds": [{k: round(v, 1) for k, v in row.items()} for row in per_round],
        "median_images_per_s": summary,
        "median_ratios": ratios,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jpeg-dir", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images", type=int, default=512, help="images per thread per timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    emit_json(measure(args.jpeg_dir, args.rounds, args.images, args.threads), args.output)


if __name__ == "__main__":
    main()
