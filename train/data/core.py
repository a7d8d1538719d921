"""What every data source provides (``DataSource``), what the trainer learns from it
(``DatasetInfo``), and the helpers the sources share.

Every source yields *host-local* batches ``{'image': [B_host, H, W, C], 'label': int32
[B_host]}`` where ``B_host = global_batch_size / process_count``; eval batches add ``'mask'``
(0 for padding, so every held-out example is counted exactly once whatever the batch size).

Images arrive as ``uint8`` pixels and are normalised with ``info.mean``/``info.std`` inside the
jitted step (``train.steps`` does it for any ``uint8`` batch): a quarter of the host copies and
host-to-device bytes of float32, and less preprocessing per host core (BENCHMARKS.md). The
in-memory digits yield normalised float32.

Determinism: the training stream is a pure function of ``(seed, epoch)``. Each epoch is built on
its own, with its order and augmentation seeds derived from ``(seed, epoch)``, so
``train_iterator(..., start_step=s)`` resumes at step ``s`` by skipping only within one epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from resnet_jax import constants

Batch = dict[str, np.ndarray]

# The ImageNet statistics of resnet_jax.constants (0..1 units) in the 0..255 units of the sources.
IMAGENET_MEAN = tuple(round(255 * m, 3) for m in constants.IMAGENET_MEAN)
IMAGENET_STD = tuple(round(255 * s, 3) for s in constants.IMAGENET_STD)


class DatasetError(ValueError):
    """A dataset is unknown, not prepared, or misconfigured; the message says how to fix it."""


def decode_reason(error: BaseException) -> str:
    """Why an image could not be decoded, in one line without the decoder's internals: Pillow
    names its in-memory buffer (``<_io.BytesIO object at 0x...>``), TensorFlow its op and device."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if type(error).__name__ == "UnidentifiedImageError" or "Unknown image file format" in text:
        return "not an image file that can be decoded"
    text = re.sub(
        r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$|\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", text
    )
    return text[:160] or type(error).__name__


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # model input (H, W, C)
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


class DataSource:
    """One kind of dataset (digits, synthetic, TFDS, image folders); ``train.data.registry``
    maps ``config.dataset`` to its class, and nothing else asks which dataset a run has.

    Class-level, without reading any data:

    * ``name``: the ``config.dataset`` the registry maps to this class;
    * ``repeats_one_batch``: the training stream is one batch repeated (the loop places it on the
      devices once);
    * ``random_erase``, ``aug_repeats``, ``auto_augment``: its training pipeline applies
      ``config.random_erase_prob`` (erase.py), ``config.aug_repeats`` (``repeat_position``),
      ``config.auto_augment`` (autoaugment.py);
    * ``check_config(config)``: the source's own config checks (``DatasetError``);
    * ``describe(config)``: ``(DatasetInfo, image dtype)`` without reading the data (``train.aot``),
      or None where the shape is not known without reading it (``describes_without_data`` says
      which: for TFDS, the sets of ``tfds.KNOWN_SETS``);
    * ``load_image(path, info, options)`` and ``load_array(pixels, info, options)``: one image
      with the eval preprocessing of ``options`` (``eval_resize.EvalOptions``), normalised
      float32 (``train.predict``).

    An instance is built from the config (``Source(config)``) and has ``info``,
    ``steps_per_epoch(global_batch, process_count)``, and the host-local
    ``train_batches(config, global_batch, start_step, process_index, process_count)`` and
    ``eval_batches(config, global_batch, process_index, process_count)``.
    """

    name: ClassVar[str] = ""
    repeats_one_batch: ClassVar[bool] = False
    describes_without_data: ClassVar[bool] = False
    random_erase: ClassVar[bool] = False  # its training pipeline applies config.random_erase_prob
    aug_repeats: ClassVar[bool] = False  # ... and config.aug_repeats
    auto_augment: ClassVar[bool] = False  # ... and config.auto_augment (train/data/autoaugment.py)
    info: DatasetInfo

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.class_subset:
            raise DatasetError(
                f"config.class_subset is supported for dataset='sklearn_digits' only; "
                f"got dataset={config.dataset!r}."
            )

    @classmethod
    def describe(cls, config: Any) -> tuple[DatasetInfo, Any] | None:
        return None

    @staticmethod
    def load_image(path: str, info: DatasetInfo, options: Any) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def load_array(pixels: np.ndarray, info: DatasetInfo, options: Any) -> np.ndarray:
        raise NotImplementedError

    def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
        raise NotImplementedError

    def train_batches(
        self, config: Any, global_batch: int, start_step: int, process_index: int, process_count: int
    ) -> Iterable[Batch]:
        raise NotImplementedError

    def eval_batches(
        self, config: Any, global_batch: int, process_index: int, process_count: int
    ) -> Iterable[Batch]:
        raise NotImplementedError


class Dataset:
    """One configured source: ``info``, ``steps_per_epoch``, train and eval iterators."""

    def __init__(self, source: DataSource, config: Any):
        self.source = source
        self.config = config
        self.info: DatasetInfo = source.info

    @property
    def repeats_one_batch(self) -> bool:
        return self.source.repeats_one_batch

    def steps_per_epoch(self, global_batch_size: int, process_count: int = 1) -> int:
        """Train steps per epoch: every host's shard split into whole host batches."""
        return self.source.steps_per_epoch(global_batch_size, process_count)

    def train_iterator(
        self,
        global_batch_size: int,
        *,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """Infinite host-local training batches, starting at global step ``start_step``."""
        if start_step < 0:
            raise DatasetError(f"start_step must be >= 0; got {start_step}.")
        return iter(
            self.source.train_batches(
                self.config, global_batch_size, start_step, process_index, process_count
            )
        )

    def eval_iterator(
        self, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """One pass over the held-out split; padded batches carry ``mask``=0 rows."""
        return iter(self.source.eval_batches(self.config, global_batch_size, process_index, process_count))


# ----------------------------------------------------------------------------------------------
# Helpers shared by the sources.


def fold_seed(*parts: int) -> int:
    """A 31-bit seed derived deterministically from integers (stable across runs and hosts)."""
    return zlib.crc32(np.asarray(parts, np.int64).tobytes()) & 0x7FFFFFFF


def repeat_position(position: int, repeats: float) -> int:
    """The position in an epoch's order that stream position ``position`` reads with
    ``aug_repeats=repeats``: each example ``repeats`` times in a row, as timm's
    ``RepeatAugSampler`` orders its indices (``indices[int(i // repeats)]``, a float allowed),
    so an epoch visits about ``1/repeats`` of the examples, each augmented afresh per copy (the
    copies' draws are keyed on their own positions). Every host computes the same global order.
    ``repeats <= 1``: ``position`` itself."""
    return int(position // repeats) if repeats > 1 else position


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DatasetError(
            f"batch size {global_batch_size} must be a positive multiple of the number of "
            f"processes ({process_count})."
        )
    return global_batch_size // process_count


def prefetch_to_device(
    iterator: Iterable[Batch], place: Callable[[Batch], Any], size: int = 2
) -> Iterator[Any]:
    """Yield ``place(batch)`` while keeping ``size`` batches already transferred.

    ``place`` (a driver's ``place_batch``) starts asynchronous host-to-device copies, so keeping a
    few in flight overlaps the transfer of the next batches with the current step.
    """
    queue: collections.deque = collections.deque()
    iterator = iter(iterator)
    for batch in itertools.islice(iterator, max(size, 1)):
        queue.append(place(batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(place(batch))


def norm_stats(
    config: Any, channels: int, default: tuple[Sequence[float], Sequence[float]]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel: ``config.normalize_mean``/``normalize_std``, else ``default``."""
    mean = config.normalize_mean or default[0]
    std = config.normalize_std or default[1]
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise DatasetError(f"normalize_mean/normalize_std need 1 or {channels} values; got {mean} and {std}.")
    return mean, std


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's statistics for RGB; mid-grey and a broad spread for any other channel count."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (127.5,) * channels, (64.0,) * channels


def shape_info(
    config: Any, name: str, num_classes: int, image_shape: tuple[int, int, int], num_train_examples: int
) -> DatasetInfo:
    """A ``DatasetInfo`` from a dataset's shape alone (``DataSource.describe``), normalised as the
    config says or by ``default_stats``; no eval split or class names, which compiling does not
    need (a synthetic set may have millions of classes)."""
    mean, std = norm_stats(config, image_shape[-1], default_stats(image_shape[-1]))
    return DatasetInfo(name, num_classes, image_shape, num_train_examples, 0, (), mean, std)


def normalize_pixels(images: Any, info: DatasetInfo) -> np.ndarray:
    """Pixels (0..255) -> the normalised float32 the model takes (what the step does on device)."""
    mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    return ((np.asarray(images, np.float32) - mean) / std).astype(np.float32)
