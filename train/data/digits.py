"""``dataset='sklearn_digits'``: the 1,797 8x8 handwritten digits that ship inside scikit-learn
(no download), with a fixed stratified held-out split of 360 images, held in host memory.

Every host holds the same arrays in the same global order and takes its rows of each global
batch. The digits are normalised float32 on the host; ``config.class_subset`` keeps some digits,
relabelled in the order given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from train.data import tf_ops
from train.data.core import (
    Batch,
    DatasetError,
    DatasetInfo,
    DataSource,
    fold_seed,
    host_batch_size,
    norm_stats,
    normalize_pixels,
    shape_info,
)

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
NUM_DIGITS = 1_797


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed split of sklearn's digits: pixel values scaled from 0..16 to 0..255, NHWC."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = (digits.images.astype(np.float32) * (255.0 / 16.0))[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return x_train, y_train, x_test, y_test


def keep_classes(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The examples of ``classes``, relabelled ``0 .. len(classes) - 1`` in that order."""
    relabel = np.full(10, -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = relabel[y] >= 0
    return x[keep], relabel[y[keep]]


def pad_crop(x: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Each image of ``x [N, H, W, C]`` zero-padded by ``pad`` pixels and cropped back at random."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, dy : dy + h, dx : dx + w]
    return out


class DigitsSource(DataSource):
    """Arrays in host memory; the same global order on every host, each takes its rows."""

    name = "sklearn_digits"

    def __init__(self, config: Any):
        self.x_train, self.y_train, self.x_eval, self.y_eval = load_digits()
        channels = self.x_train.shape[-1]
        default = (
            (float(self.x_train.mean()),) * channels,
            (float(self.x_train.std()),) * channels,
        )  # of all ten digits, also with class_subset, so that subsets share one normalisation
        self.mean, self.std = norm_stats(config, channels, default)
        subset = tuple(int(c) for c in (config.class_subset or ()))
        names = tuple(str(i) for i in (subset or range(10)))
        if subset:
            self.x_train, self.y_train = keep_classes(self.x_train, self.y_train, subset)
            self.x_eval, self.y_eval = keep_classes(self.x_eval, self.y_eval, subset)
        self.info = DatasetInfo(
            name=self.name,
            num_classes=len(names),
            image_shape=tuple(self.x_train.shape[1:]),
            num_train_examples=len(self.x_train),
            num_eval_examples=len(self.x_eval),
            class_names=names,
            mean=self.mean,
            std=self.std,
        )

    # -- without reading the data ---------------------------------------------------------------

    @classmethod
    def check_config(cls, config: Any) -> None:
        subset = tuple(config.class_subset or ())
        if subset and (
            len(set(subset)) != len(subset) or not all(0 <= int(c) <= 9 for c in subset) or len(subset) < 2
        ):
            raise DatasetError(f"config.class_subset must be 2 or more distinct digits 0-9; got {subset}.")
        for field in ("eval_image_size", "eval_resize_size"):
            if config[field]:
                raise DatasetError(
                    f"config.{field}={config[field]} is not available for sklearn_digits (8x8 images, not "
                    "resized); leave it 0."
                )

    describes_without_data = True

    @classmethod
    def describe(cls, config: Any) -> tuple[DatasetInfo, Any]:
        # 8x8, normalised float32 on the host, whatever image_size says.
        num_classes = len(config.class_subset or ()) or 10
        return shape_info(config, cls.name, num_classes, (8, 8, 1), NUM_DIGITS - DIGITS_TEST_SIZE), np.float32

    load_image = staticmethod(tf_ops.load_image)
    load_array = staticmethod(tf_ops.load_array)

    # -- batches --------------------------------------------------------------------------------

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return normalize_pixels(x, self.info)

    def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
        return len(self.x_train) // global_batch

    def augment(self, x: np.ndarray, config: Any, rng: np.random.Generator) -> np.ndarray:
        mode = config.train_augment
        if mode == "none":
            return x
        if mode != "pad_crop":
            raise DatasetError(
                f"train_augment={mode!r} is not available for {self.name}; use 'pad_crop' or 'none'."
            )
        return pad_crop(x, int(config.crop_padding), rng)

    def train_batches(
        self, config, global_batch, start_step, process_index, process_count
    ) -> Iterator[Batch]:
        per_host = host_batch_size(global_batch, process_count)
        steps = self.steps_per_epoch(global_batch, process_count)
        lo, hi = process_index * per_host, (process_index + 1) * per_host
        seed = int(config.seed)
        for epoch in itertools.count(start_step // steps):
            order = np.random.default_rng(fold_seed(seed, epoch, 0)).permutation(len(self.x_train))
            first = start_step % steps if epoch == start_step // steps else 0
            for step in range(first, steps):
                # Draw augmentation for the whole global batch, then slice: every host count
                # sees the same examples with the same crops.
                idx = order[step * global_batch : (step + 1) * global_batch]
                rng = np.random.default_rng(fold_seed(seed, epoch, step + 1))
                images = self.augment(self.x_train[idx], config, rng)
                yield {
                    "image": self.normalize(images[lo:hi]),
                    "label": self.y_train[idx][lo:hi],
                }

    def eval_batches(self, config, global_batch, process_index, process_count) -> Iterator[Batch]:
        per_host = host_batch_size(global_batch, process_count)
        n = len(self.x_eval)
        num_steps = -(-n // global_batch)
        lo, hi = process_index * per_host, (process_index + 1) * per_host
        for step in range(num_steps):
            rows = np.arange(step * global_batch, (step + 1) * global_batch)[lo:hi]
            valid = rows < n
            rows = np.where(valid, rows, 0)
            yield {
                "image": self.normalize(self.x_eval[rows]),
                "label": self.y_eval[rows],
                "mask": valid.astype(np.float32),
            }
