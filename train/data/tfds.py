"""Any other ``config.dataset``: a TFDS image-classification set (``imagenet2012``,
``imagenette``, ``cifar10``, ``cifar100``, ...), read with ``tf.data``.

Each host reads its own ``tfds.even_splits`` shard. Epoch ``e``'s file order, shuffle and
augmentation seeds derive from ``(seed, e, host)``; ``aug_repeats`` repeats each shuffled example
in a row (``_copies``); augmentation uses stateless random ops keyed
on the example's position in the epoch (``train/data/tf_ops.py``), so resuming skips only within
one epoch, before any decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any

import numpy as np

from train.data import tf_ops
from train.data.core import (
    DatasetError,
    DatasetInfo,
    DataSource,
    default_stats,
    fold_seed,
    host_batch_size,
    norm_stats,
    shape_info,
)
from train.data.eval_resize import EvalOptions

IMAGENET_HELP = (
    "ImageNet (imagenet2012) cannot be downloaded automatically. Register at "
    "https://image-net.org/download-images, download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar, and put both tar files (not extracted) in the manual directory "
    "{manual_dir}. Then prepare it once with `python -m train.prepare` and this run's --config "
    "flags (or re-run with --config.download=True)."
)


@dataclasses.dataclass(frozen=True)
class KnownSet:
    num_classes: int
    channels: int
    num_train_examples: int


# TFDS image-classification sets whose shape train.aot knows without reading them (their `train`
# split sizes, from the TFDS catalog).
KNOWN_SETS = {
    "imagenet2012": KnownSet(1000, 3, 1_281_167),
    "imagenette": KnownSet(10, 3, 9_469),
    "cifar10": KnownSet(10, 3, 50_000),
    "cifar100": KnownSet(100, 3, 50_000),
    "mnist": KnownSet(10, 1, 60_000),
    "fashion_mnist": KnownSet(10, 1, 60_000),
    "svhn_cropped": KnownSet(10, 3, 73_257),
    "food101": KnownSet(101, 3, 75_750),
    "oxford_flowers102": KnownSet(102, 3, 1_020),
    "oxford_iiit_pet": KnownSet(37, 3, 3_680),
    "stanford_dogs": KnownSet(120, 3, 12_000),
}


def tfds_builder(config: Any):
    import tensorflow_datasets as tfds

    tf_ops.get_tf()
    name = config.dataset
    data_dir = config.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetError(
            f"unknown dataset {name!r}: not a source of train/data/registry.py, nor a TFDS dataset "
            "(see https://www.tensorflow.org/datasets/catalog/overview#image_classification)."
        ) from e
    if not builder.is_prepared():
        manual_dir = config.manual_dir or os.path.join(str(builder.data_dir_root), "downloads", "manual")
        if config.download:
            download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(download_config=download_config)
        elif name.startswith("imagenet2012"):
            raise DatasetError(IMAGENET_HELP.format(manual_dir=manual_dir))
        else:
            where = data_dir or builder.data_dir_root
            raise DatasetError(
                f"dataset {name!r} is not prepared in {where}. Download and prepare it once with "
                "`python -m train.prepare` and this run's --config flags, or re-run with "
                "--config.download=True (or point --config.data_dir at a directory that has it)."
            )
    features = builder.info.features
    for key in (config.image_key, config.label_key):
        if key not in features:
            raise DatasetError(
                f"dataset {name!r} has no feature {key!r} (features: {', '.join(features)}); "
                "set --config.image_key / --config.label_key."
            )
    return builder


def num_examples(builder, split: str) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError):
        pass
    # Splits unknown (e.g. mocked metadata): count what as_dataset serves.
    n = int(builder.as_dataset(split=split, read_config=read_config(0)).cardinality())
    if n < 0:
        raise DatasetError(f"cannot count the examples of {builder.name} split {split!r}.")
    return n


def read_config(seed: int):
    import tensorflow_datasets as tfds

    tf = tf_ops.get_tf()
    options = tf.data.Options()
    options.deterministic = True
    return tfds.ReadConfig(
        options=options, shuffle_seed=seed, try_autocache=False, interleave_cycle_length=16
    )


def _copies(i, example, repeats: float):
    """Example ``i`` of the shuffled stream as many times as ``aug_repeats`` reads it: stream
    position ``p`` reads example ``int(p // repeats)`` (``core.repeat_position``, timm's
    ``RepeatAugSampler``), so example ``i`` fills positions ``ceil(i r) .. ceil((i + 1) r) - 1``.
    Each host repeats the examples of its own shard; every copy has a position of its own, hence
    draws of its own."""
    tf = tf_ops.get_tf()
    i = tf.cast(i, tf.float64)
    count = tf.math.ceil((i + 1) * repeats) - tf.math.ceil(i * repeats)
    return tf.data.Dataset.from_tensors(example).repeat(tf.cast(count, tf.int64))


class TFDSSource(DataSource):
    """A TFDS image-classification set: the registry's source for every name it does not map."""

    random_erase = auto_augment = aug_repeats = True  # train/data/host_ops.py; _copies

    def __init__(self, config: Any):
        self.builder = tfds_builder(config)
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
        mean, std = norm_stats(config, channels, default_stats(channels))
        self.train_split = config.train_split
        self.eval_split = config.eval_split
        size = int(config.image_size)
        self.info = DatasetInfo(
            name=config.dataset,
            num_classes=num_classes,
            image_shape=(size, size, channels),
            num_train_examples=num_examples(self.builder, self.train_split),
            num_eval_examples=num_examples(self.builder, self.eval_split),
            class_names=tuple(names),
            mean=mean,
            std=std,
        )
        self._cached: dict[tuple[int, int], Any] = {}

    # -- without reading the data ---------------------------------------------------------------

    @classmethod
    def describe(cls, config: Any) -> tuple[DatasetInfo, Any] | None:
        known = KNOWN_SETS.get(config.dataset.split(":")[0].split("/")[0])
        if known is None:
            return None
        shape = (int(config.image_size),) * 2 + (known.channels,)
        return shape_info(
            config, config.dataset, known.num_classes, shape, known.num_train_examples
        ), np.uint8

    load_image = staticmethod(tf_ops.load_image)
    load_array = staticmethod(tf_ops.load_array)

    # -- per-example preprocessing ------------------------------------------------------------

    def decode(self, image):
        return tf_ops.decode(image, self.info.image_shape[-1]) if self.encoded else image

    def preprocess_train(self, image, seed, config):
        return tf_ops.preprocess_train_image(
            image, seed, self.info, config, jpeg=self.jpeg, encoded=self.encoded
        )

    def preprocess_eval(self, image, config):
        options = EvalOptions.from_config(config, self.info.image_shape[0])
        if not (options.resize_size and self.encoded and self.info.image_shape[-1] == 3):
            image = self.decode(image)  # else Pillow decodes it, as torchvision's loader (tf_ops)
        return tf_ops.preprocess_eval_image(image, self.info, **options.kwargs())

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
                ds = self.builder.as_dataset(split=split, decoders=decoders, read_config=read_config(0))
                self._cached[key] = ds.cache()
            return self._cached[key]
        return self.builder.as_dataset(
            split=split,
            shuffle_files=True,
            decoders=decoders,
            read_config=read_config(epoch_seed),
        )

    def train_batches(self, config, global_batch, start_step, process_index, process_count):
        tf = tf_ops.get_tf()
        per_host = host_batch_size(global_batch, process_count)
        steps = self.steps_per_epoch(global_batch, process_count)
        if steps < 1:
            raise DatasetError(
                f"{self.info.name}: {self._host_examples(process_count)} training examples per "
                f"host is less than one batch of {per_host}; lower config.batch_size."
            )
        seed = int(config.seed)
        buffer = int(config.shuffle_buffer_size)
        repeats = float(config.aug_repeats)
        for epoch in itertools.count(start_step // steps):
            epoch_seed = fold_seed(seed, epoch, process_index)
            ds = self._raw_train(config, process_index, process_count, epoch_seed)
            ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
            if repeats > 1:
                ds = ds.enumerate().flat_map(functools.partial(_copies, repeats=repeats))
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

        tf = tf_ops.get_tf()
        per_host = host_batch_size(global_batch, process_count)
        split = self._host_split(self.eval_split, process_index, process_count, drop=False)
        # Hosts hold at most ceil(N / P) examples; all run the same number of steps.
        per_host_max = -(-self.info.num_eval_examples // process_count)
        steps = -(-per_host_max // per_host)
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
        ds = self.builder.as_dataset(split=split, decoders=decoders, read_config=read_config(0))

        def prep(example):
            return {
                "image": self.preprocess_eval(example[self.image_key], config),
                "label": tf.cast(example[self.label_key], tf.int32),
                "mask": tf.constant(1.0, tf.float32),
            }

        ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        eval_shape = EvalOptions.from_config(config, self.info.image_shape[0]).shape(
            self.info.image_shape[-1]
        )
        padding = tf.data.Dataset.from_tensors(
            {
                "image": tf.zeros(eval_shape, tf.uint8),
                "label": tf.constant(0, tf.int32),
                "mask": tf.constant(0.0, tf.float32),
            }
        ).repeat()
        ds = ds.concatenate(padding).take(steps * per_host).batch(per_host)
        return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
