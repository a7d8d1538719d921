"""The shape of a dataset (classes, channels, training-set size) without reading it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from train import input_pipeline
from train.aot.topology import AotError


@dataclasses.dataclass(frozen=True)
class KnownDataset:
    num_classes: int
    channels: int
    num_train_examples: int


# TFDS image-classification sets (their `train` split sizes, from the TFDS catalog).
KNOWN_DATASETS = {
    "imagenet2012": KnownDataset(1000, 3, 1_281_167),
    "imagenette": KnownDataset(10, 3, 9_469),
    "cifar10": KnownDataset(10, 3, 50_000),
    "cifar100": KnownDataset(100, 3, 50_000),
    "mnist": KnownDataset(10, 1, 60_000),
    "fashion_mnist": KnownDataset(10, 1, 60_000),
    "svhn_cropped": KnownDataset(10, 3, 73_257),
    "food101": KnownDataset(101, 3, 75_750),
    "oxford_flowers102": KnownDataset(102, 3, 1_020),
    "oxford_iiit_pet": KnownDataset(37, 3, 3_680),
    "stanford_dogs": KnownDataset(120, 3, 12_000),
    input_pipeline.DIGITS: KnownDataset(10, 1, 1_797 - input_pipeline.DIGITS_TEST_SIZE),
}


def dataset_info(config: Any) -> tuple[input_pipeline.DatasetInfo, Any]:
    """``DatasetInfo`` for ``config.dataset`` without reading it, and the batches' image dtype."""
    name = config.dataset
    if name == input_pipeline.SYNTHETIC:
        known = KnownDataset(
            int(config.synthetic_num_classes),
            int(config.synthetic_channels),
            int(config.synthetic_num_examples),
        )
    elif name.split(":")[0].split("/")[0] in KNOWN_DATASETS:
        known = KNOWN_DATASETS[name.split(":")[0].split("/")[0]]
    else:
        raise AotError(
            f"train.aot does not know dataset {name!r} (it reads no data; it knows "
            f"{', '.join(sorted(KNOWN_DATASETS))}). Describe it instead: --config.dataset=synthetic "
            f"--config.synthetic_num_classes=N --config.synthetic_channels=C "
            f"--config.synthetic_num_examples=TRAIN_SIZE (the same step for any uint8 image set)."
        )
    num_classes, image_dtype = known.num_classes, np.uint8
    size = int(config.image_size)
    if name == input_pipeline.DIGITS:
        # scikit-learn's digits are 8x8, normalised float32 on the host, whatever image_size says.
        size, image_dtype = 8, np.float32
        num_classes = len(config.class_subset or ()) or num_classes
    try:
        mean, std = input_pipeline._norm_stats(
            config, known.channels, input_pipeline._default_stats(known.channels)
        )
    except input_pipeline.DatasetError as e:
        raise AotError(str(e)) from None
    info = input_pipeline.DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_shape=(size, size, known.channels),
        num_train_examples=known.num_train_examples,
        num_eval_examples=0,
        class_names=(),  # not needed to compile; a synthetic set may have millions of classes
        mean=mean,
        std=std,
    )
    return info, image_dtype
