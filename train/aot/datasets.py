"""The shape of a dataset (classes, channels, training-set size) without reading it: the
dataset's source describes it (``train/data/registry.py``)."""

from __future__ import annotations

from typing import Any

from train.aot.topology import AotError
from train.data import registry
from train.data.core import DatasetError, DatasetInfo


def dataset_info(config: Any) -> tuple[DatasetInfo, Any]:
    """``DatasetInfo`` for ``config.dataset`` without reading it, and the batches' image dtype."""
    name = config.dataset
    try:
        described = registry.get(name).describe(config)
    except DatasetError as e:
        raise AotError(str(e)) from None
    if described is None:
        raise AotError(
            f"train.aot does not know dataset {name!r} (it reads no data; it knows "
            f"{', '.join(registry.described_names())}). Describe it instead: --config.dataset=synthetic "
            f"--config.synthetic_num_classes=N --config.synthetic_channels=C "
            f"--config.synthetic_num_examples=TRAIN_SIZE (the same step for any uint8 image set)."
        )
    return described
