"""Input pipelines: TFDS image classification, scikit-learn's digits, and synthetic data.

Every pipeline yields *host-local* batches ``{'image': [B_host, H, W, C], 'label': int32
[B_host]}`` where ``B_host = global_batch_size / process_count``; eval batches add ``'mask'``
(0 for padding, so every held-out example is counted exactly once whatever the batch size).

TFDS images arrive as ``uint8`` pixels and are normalised with ``info.mean``/``info.std`` inside
the jitted step (``train.steps`` does it for any ``uint8`` batch): a quarter of the host copies
and host-to-device bytes of float32, and faster preprocessing per host core (BENCHMARKS.md).
Synthetic batches are ``uint8`` pixels too, so a throughput run moves the same bytes to the device
as a real one; the in-memory digits yield normalised float32.

Determinism: the training stream is a pure function of ``(seed, epoch)``. Each epoch is built on
its own, with its file order, shuffle and augmentation seeds derived from ``(seed, epoch)``, so
``create_train_iterator(..., start_step=s)`` resumes at step ``s`` by skipping only within one
epoch. Augmentation uses stateless random ops keyed on the example's position in the epoch.

Sources (``config.dataset``):

* ``'sklearn_digits'``: the 1,797 8x8 handwritten digits that ship inside scikit-learn (no
  download), with a fixed stratified held-out split of 360 images.
* ``'synthetic'``: one random batch repeated forever, for benchmarks.
* ``'image_folder'``: ``config.data_dir``'s ``train/<class>/*`` and ``val/<class>/*`` image files,
  read with Grain and Pillow, without TensorFlow (``train/image_folder.py``).
* any other name: a TFDS image-classification set (``imagenet2012``, ``imagenette``,
  ``cifar10``, ``cifar100``, ...). Each host reads its own ``tfds.even_splits`` shard.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from resnet_jax import pretrained

Batch = dict[str, np.ndarray]

DIGITS = "sklearn_digits"
SYNTHETIC = "synthetic"
IMAGE_FOLDER = "image_folder"
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0

# resnet_jax.pretrained's ImageNet statistics (0..1 units) in the 0..255 units of the pipelines.
IMAGENET_MEAN = tuple(round(255 * m, 3) for m in pretrained.IMAGENET_MEAN)
IMAGENET_STD = tuple(round(255 * s, 3) for s in pretrained.IMAGENET_STD)
TRAIN_AUGMENTATIONS = ("inception_crop", "pad_crop", "none")

IMAGENET_HELP = (
    "ImageNet (imagenet2012) cannot be downloaded automatically. Register at "
    "https://image-net.org/download-images, download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar, and put both tar files (not extracted) in the manual directory "
    "{manual_dir}. Then prepare it once with `tfds build imagenet2012 --manual_dir={manual_dir}"
    "{data_dir_flag}` or re-run with --config.download=True."
)


class DatasetError(ValueError):
    """A dataset is unknown, not prepared, or misconfigured; the message says how to fix it."""


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


# ----------------------------------------------------------------------------------------------
# Helpers shared by all sources.


def fold_seed(*parts: int) -> int:
    """A 31-bit seed derived deterministically from integers (stable across runs and hosts)."""
    return zlib.crc32(np.asarray(parts, np.int64).tobytes()) & 0x7FFFFFFF


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


def _norm_stats(config: Any, channels: int, default: tuple[Sequence[float], Sequence[float]]):
    mean = config.normalize_mean or default[0]
    std = config.normalize_std or default[1]
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise DatasetError(f"normalize_mean/normalize_std need 1 or {channels} values; got {mean} and {std}.")
    return mean, std


def _default_stats(channels: int):
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (127.5,) * channels, (64.0,) * channels


# ----------------------------------------------------------------------------------------------
# scikit-learn digits (in memory).


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed split of sklearn's digits: pixel values scaled from 0..16 to 0..255, NHWC."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
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


def _keep_classes(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The examples of ``classes``, relabelled ``0 .. len(classes) - 1`` in that order."""
    relabel = np.full(10, -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = relabel[y] >= 0
    return x[keep], relabel[y[keep]]


class _InMemory:
    """Arrays in host memory (digits); the same global order on every host, each takes its rows."""

    def __init__(self, config: Any):
        self.x_train, self.y_train, self.x_eval, self.y_eval = _load_digits()
        channels = self.x_train.shape[-1]
        default = (
            (float(self.x_train.mean()),) * channels,
            (float(self.x_train.std()),) * channels,
        )  # of all ten digits, also with class_subset, so that subsets share one normalisation
        self.mean, self.std = _norm_stats(config, channels, default)
        subset = tuple(int(c) for c in (config.class_subset or ()))
        names = tuple(str(i) for i in (subset or range(10)))
        if subset:
            self.x_train, self.y_train = _keep_classes(self.x_train, self.y_train, subset)
            self.x_eval, self.y_eval = _keep_classes(self.x_eval, self.y_eval, subset)
        self.info = DatasetInfo(
            name=DIGITS,
            num_classes=len(names),
            image_shape=tuple(self.x_train.shape[1:]),
            num_train_examples=len(self.x_train),
            num_eval_examples=len(self.x_eval),
            class_names=names,
            mean=self.mean,
            std=self.std,
        )

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return normalize_pixels(x, self.info)

    def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
        return len(self.x_train) // global_batch

    def _augment(self, x: np.ndarray, config: Any, rng: np.random.Generator) -> np.ndarray:
        mode = config.train_augment
        if mode == "none":
            return x
        if mode != "pad_crop":
            raise DatasetError(
                f"train_augment={mode!r} is not available for {DIGITS}; use 'pad_crop' or 'none'."
            )
        pad = int(config.crop_padding)
        n, h, w, _ = x.shape
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
        out = np.empty_like(x)
        for i, (dy, dx) in enumerate(offsets):
            out[i] = padded[i, dy : dy + h, dx : dx + w]
        return out

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
                images = self._augment(self.x_train[idx], config, rng)
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


# ----------------------------------------------------------------------------------------------
# Synthetic data.


class _Synthetic:
    def __init__(self, config: Any):
        size, channels = int(config.image_size), int(config.synthetic_channels)
        num_classes = int(config.synthetic_num_classes)
        num_examples = int(config.synthetic_num_examples)
        mean, std = _norm_stats(config, channels, _default_stats(channels))
        self.info = DatasetInfo(
            name=SYNTHETIC,
            num_classes=num_classes,
            image_shape=(size, size, channels),
            num_train_examples=num_examples,
            num_eval_examples=int(config.synthetic_num_eval_examples),
            class_names=tuple(f"class_{i}" for i in range(num_classes)),
            mean=mean,
            std=std,
        )

    def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
        return max(self.info.num_train_examples // global_batch, 1)

    def _batch(self, n: int, seed: int) -> Batch:
        rng = np.random.default_rng(seed)
        return {
            "image": rng.integers(0, 256, (n, *self.info.image_shape), dtype=np.uint8),
            "label": rng.integers(0, self.info.num_classes, n).astype(np.int32),
        }

    def train_batches(self, config, global_batch, start_step, process_index, process_count):
        batch = self._batch(host_batch_size(global_batch, process_count), config.seed)
        return itertools.repeat(batch)

    def eval_batches(self, config, global_batch, process_index, process_count):
        per_host = host_batch_size(global_batch, process_count)
        batch = self._batch(per_host, config.seed + 1)
        batch["mask"] = np.ones(per_host, np.float32)
        steps = -(-self.info.num_eval_examples // global_batch)
        return itertools.repeat(batch, steps)


# ----------------------------------------------------------------------------------------------
# TFDS.


def _tf():
    import tensorflow as tf

    # The input pipeline runs on the host; never let TensorFlow reserve accelerator memory.
    tf.config.set_visible_devices([], "GPU")
    return tf


def _tfds_builder(config: Any):
    import tensorflow_datasets as tfds

    _tf()
    name = config.dataset
    data_dir = config.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetError(
            f"unknown dataset {name!r}: not '{DIGITS}', '{SYNTHETIC}', nor a TFDS dataset "
            "(see https://www.tensorflow.org/datasets/catalog/overview#image_classification)."
        ) from e
    if not builder.is_prepared():
        manual_dir = config.manual_dir or os.path.join(str(builder.data_dir_root), "downloads", "manual")
        if config.download:
            download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(download_config=download_config)
        elif name.startswith("imagenet2012"):
            flag = f" --data_dir={data_dir}" if data_dir else ""
            raise DatasetError(IMAGENET_HELP.format(manual_dir=manual_dir, data_dir_flag=flag))
        else:
            where = data_dir or builder.data_dir_root
            raise DatasetError(
                f"dataset {name!r} is not prepared in {where}. Download and prepare it once with "
                f"`tfds build {name}" + (f" --data_dir={data_dir}" if data_dir else "") + "`, or "
                "re-run with --config.download=True (or point --config.data_dir at a directory "
                "that has it)."
            )
    features = builder.info.features
    for key in (config.image_key, config.label_key):
        if key not in features:
            raise DatasetError(
                f"dataset {name!r} has no feature {key!r} (features: {', '.join(features)}); "
                "set --config.image_key / --config.label_key."
            )
    return builder


def _num_examples(builder, split: str) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError):
        pass
    # Splits unknown (e.g. mocked metadata): count what as_dataset serves.
    n = int(builder.as_dataset(split=split, read_config=_read_config(0)).cardinality())
    if n < 0:
        raise DatasetError(f"cannot count the examples of {builder.name} split {split!r}.")
    return n


def _read_config(seed: int):
    import tensorflow_datasets as tfds

    tf = _tf()
    options = tf.data.Options()
    options.deterministic = True
    return tfds.ReadConfig(
        options=options, shuffle_seed=seed, try_autocache=False, interleave_cycle_length=16
    )


class _TFDS:
    def __init__(self, config: Any):
        self.builder = _tfds_builder(config)
        features = self.builder.info.features
        self.image_key = config.image_key
        self.label_key = config.label_key
        image_feature = features[self.image_key]
        channels = int(image_feature.shape[-1] or 3)
        self.encoded = type(image_feature).__name__ == "Image"
        self.jpeg = self.encoded and image_feature.encoding_format == "jpeg"
        label_feature = features[self.label_key]
        num_classes = int(getattr(label_feature, "num_classes", 0) or 0)
        if not num_classes:
            raise DatasetError(f"{config.dataset}: feature {self.label_key!r} is not a ClassLabel.")
        names = getattr(label_feature, "names", None) or [str(i) for i in range(num_classes)]
        mean, std = _norm_stats(config, channels, _default_stats(channels))
        self.train_split = config.train_split
        self.eval_split = config.eval_split
        size = int(config.image_size)
        self.info = DatasetInfo(
            name=config.dataset,
            num_classes=num_classes,
            image_shape=(size, size, channels),
            num_train_examples=_num_examples(self.builder, self.train_split),
            num_eval_examples=_num_examples(self.builder, self.eval_split),
            class_names=tuple(names),
            mean=mean,
            std=std,
        )
        self._cached: dict[tuple[int, int], Any] = {}

    # -- per-example preprocessing ------------------------------------------------------------

    def _decode(self, image):
        return _decode(image, self.info.image_shape[-1]) if self.encoded else image

    def preprocess_train(self, image, seed, config):
        return preprocess_train_image(image, seed, self.info, config, jpeg=self.jpeg, encoded=self.encoded)

    def preprocess_eval(self, image, config):
        return preprocess_eval_image(self._decode(image), self.info, float(config.eval_crop_fraction))

    # -- datasets -------------------------------------------------------------------------------

    def _host_split(self, split: str, process_index: int, process_count: int, drop: bool):
        import tensorflow_datasets as tfds

        if process_count == 1:
            return split
        return tfds.even_splits(split, n=process_count, drop_remainder=drop)[process_index]

    def _host_examples(self, process_count: int) -> int:
        return self.info.num_train_examples // process_count

    def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
        return self._host_examples(process_count) // (global_batch // process_count)

    def _raw_train(self, config, process_index, process_count, epoch_seed):
        import tensorflow_datasets as tfds

        split = self._host_split(self.train_split, process_index, process_count, drop=True)
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
        if config.cache:
            # One in-memory copy of the encoded shard, reused by every epoch's shuffle.
            key = (process_index, process_count)
            if key not in self._cached:
                ds = self.builder.as_dataset(split=split, decoders=decoders, read_config=_read_config(0))
                self._cached[key] = ds.cache()
            return self._cached[key]
        return self.builder.as_dataset(
            split=split,
            shuffle_files=True,
            decoders=decoders,
            read_config=_read_config(epoch_seed),
        )

    def train_batches(self, config, global_batch, start_step, process_index, process_count):
        tf = _tf()
        per_host = host_batch_size(global_batch, process_count)
        steps = self.steps_per_epoch(global_batch, process_count)
        if steps < 1:
            raise DatasetError(
                f"{self.info.name}: {self._host_examples(process_count)} training examples per "
                f"host is less than one batch of {per_host}; lower config.batch_size."
            )
        seed = int(config.seed)
        buffer = int(config.shuffle_buffer_size)
        for epoch in itertools.count(start_step // steps):
            epoch_seed = fold_seed(seed, epoch, process_index)
            ds = self._raw_train(config, process_index, process_count, epoch_seed)
            ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
            ds = ds.enumerate()
            first = start_step % steps if epoch == start_step // steps else 0
            if first:
                # Skip the already-trained part of the epoch before any decoding happens.
                ds = ds.skip(first * per_host)

            def prep(index, example, epoch_seed=epoch_seed):
                example_seed = tf.stack([tf.constant(epoch_seed, tf.int64), index])
                image = self.preprocess_train(example[self.image_key], example_seed, config)
                return {"image": image, "label": tf.cast(example[self.label_key], tf.int32)}

            ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(per_host, drop_remainder=True).take(steps - first)
            ds = ds.prefetch(tf.data.AUTOTUNE)
            yield from ds.as_numpy_iterator()

    def eval_batches(self, config, global_batch, process_index, process_count):
        import tensorflow_datasets as tfds

        tf = _tf()
        per_host = host_batch_size(global_batch, process_count)
        split = self._host_split(self.eval_split, process_index, process_count, drop=False)
        # Hosts hold at most ceil(N / P) examples; all run the same number of steps.
        per_host_max = -(-self.info.num_eval_examples // process_count)
        steps = -(-per_host_max // per_host)
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
        ds = self.builder.as_dataset(split=split, decoders=decoders, read_config=_read_config(0))

        def prep(example):
            return {
                "image": self.preprocess_eval(example[self.image_key], config),
                "label": tf.cast(example[self.label_key], tf.int32),
                "mask": tf.constant(1.0, tf.float32),
            }

        ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        padding = tf.data.Dataset.from_tensors(
            {
                "image": tf.zeros(self.info.image_shape, tf.uint8),
                "label": tf.constant(0, tf.int32),
                "mask": tf.constant(0.0, tf.float32),
            }
        ).repeat()
        ds = ds.concatenate(padding).take(steps * per_host).batch(per_host)
        return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _decode(image, channels: int):
    return _tf().io.decode_image(image, channels=channels, expand_animations=False)


def _to_uint8(image):
    """Resized float pixels back to ``uint8`` (round to nearest); ``uint8`` input passes through."""
    tf = _tf()
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def preprocess_train_image(image, seed, info: DatasetInfo, config: Any, *, jpeg: bool, encoded: bool):
    """Training preprocessing of one example (TF ops): ``uint8 [H, W, C]`` pixels.

    ``image`` is the encoded file (``encoded``; ``jpeg`` when it is a JPEG) or a decoded ``uint8``
    array; ``seed`` is a stateless ``int64 [2]`` seed, so the result is a pure function of it.
    ``config.train_augment``: ``'inception_crop'`` (random-resized crop, area ``crop_area_range``,
    aspect ``crop_aspect_ratio_range``; a JPEG has only its crop decoded), ``'pad_crop'``
    (reflect-pad ``crop_padding`` pixels, random crop: CIFAR) or ``'none'``; then a random
    horizontal flip unless ``config.random_flip`` is False. Normalisation happens on the
    accelerator (module docstring).
    """
    tf = _tf()
    size, channels = info.image_shape[0], info.image_shape[-1]
    mode = config.train_augment
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if mode == "inception_crop":
        if encoded and not jpeg:
            image = _decode(image, channels)
        shape = tf.image.extract_jpeg_shape(image) if jpeg else tf.shape(image)
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
            seed=crop_seed,
            min_object_covered=float(config.crop_min_object_covered),
            aspect_ratio_range=tuple(config.crop_aspect_ratio_range),
            area_range=tuple(config.crop_area_range),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        if jpeg:
            # Decode only the crop: much cheaper than decoding the whole JPEG.
            window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
            image = tf.io.decode_and_crop_jpeg(image, window, channels=channels)
        else:
            image = tf.slice(image, begin, crop_size)
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    elif mode == "pad_crop":
        image = _decode(image, channels) if encoded else image
        image = tf.image.resize(image, [size, size])  # no-op at native size
        pad = int(config.crop_padding)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(image, [size, size, channels], seed=crop_seed)
    elif mode == "none":
        image = tf.image.resize(_decode(image, channels) if encoded else image, [size, size])
    else:
        raise DatasetError(f"train_augment must be one of {TRAIN_AUGMENTATIONS}; got {mode!r}.")
    image = _to_uint8(image)  # before the flip: a quarter of the bytes to move from here on
    if config.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image


def preprocess_eval_image(image, info: DatasetInfo, crop_fraction: float = 0.875, *, to_uint8: bool = True):
    """Eval preprocessing of one decoded image (TF tensor) -> ``uint8 [size, size, C]`` pixels.

    Resize the shorter side to ``size / crop_fraction`` (256 for 224 at 0.875) and take the
    central ``size`` x ``size`` crop; ``crop_fraction=1`` resizes straight to ``size``.
    Used for the eval split and by ``train.predict`` so both see identical inputs.
    ``to_uint8=False`` keeps float pixels (arrays whose values are not whole numbers).
    """
    tf = _tf()
    size = info.image_shape[0]
    image = tf.convert_to_tensor(image)
    if crop_fraction >= 1.0:
        image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = (size / crop_fraction) / tf.reduce_min(shape)
        new = tf.cast(tf.round(shape * scale), tf.int32)
        image = tf.image.resize(image, new, method="bilinear", antialias=True)
        top = (new[0] - size) // 2
        left = (new[1] - size) // 2
        image = image[top : top + size, left : left + size]
    return _to_uint8(image) if to_uint8 else image


def normalize_pixels(images: Any, info: DatasetInfo) -> np.ndarray:
    """Pixels (0..255) -> the normalised float32 the model takes (what the step does on device)."""
    mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    return ((np.asarray(images, np.float32) - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Public entry points.


class Dataset:
    """One configured data source: ``info``, ``steps_per_epoch``, train and eval iterators."""

    def __init__(self, config: Any):
        name = config.dataset
        if name == DIGITS:
            self._source = _InMemory(config)
        elif name == SYNTHETIC:
            self._source = _Synthetic(config)
        elif name == IMAGE_FOLDER:
            from train.image_folder import ImageFolderSource

            self._source = ImageFolderSource(config)
        else:
            self._source = _TFDS(config)
        self.config = config
        self.info: DatasetInfo = self._source.info

    def steps_per_epoch(self, global_batch_size: int, process_count: int = 1) -> int:
        """Train steps per epoch: every host's shard split into whole host batches."""
        return self._source.steps_per_epoch(global_batch_size, process_count)

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
            self._source.train_batches(
                self.config, global_batch_size, start_step, process_index, process_count
            )
        )

    def eval_iterator(
        self, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """One pass over the held-out split; padded batches carry ``mask``=0 rows."""
        return iter(self._source.eval_batches(self.config, global_batch_size, process_index, process_count))


def create_dataset(config: Any) -> Dataset:
    """The data source for ``config.dataset``; raises ``DatasetError`` with a fix if unusable."""
    return Dataset(config)


def load_image_for_eval(path: str, info: DatasetInfo, crop_fraction: float) -> np.ndarray:
    """Read an image file and apply the eval preprocessing: float32 [H, W, C]."""
    if info.name == IMAGE_FOLDER:  # the run's own (Pillow) preprocessing, without TensorFlow
        from train import image_folder

        return image_folder.load_image_for_eval(path, info, crop_fraction)
    tf = _tf()
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=info.image_shape[-1], expand_animations=False)
    return normalize_pixels(preprocess_eval_image(image, info, crop_fraction), info)


__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetInfo",
    "create_dataset",
    "fold_seed",
    "host_batch_size",
    "load_image_for_eval",
    "normalize_pixels",
    "prefetch_to_device",
    "preprocess_eval_image",
    "preprocess_train_image",
]
