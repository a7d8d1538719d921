"""``config.dataset`` -> its data source: the one place that reads the dataset's name.

Every other module asks the source what it needs (``train/data/core.py``'s ``DataSource``):
the loop whether it repeats one batch, ``train.config`` its checks, ``train.aot`` its shape
without reading it, ``train.predict`` how to load one image. A new source is a module with a
``DataSource`` subclass and one line in ``SOURCES``.
"""

from __future__ import annotations

from typing import Any

from train.data.core import Dataset, DataSource
from train.data.digits import DigitsSource
from train.data.image_folder import ImageFolderSource
from train.data.synthetic import SyntheticSource
from train.data.tfds import KNOWN_SETS, TFDSSource

SOURCES: dict[str, type[DataSource]] = {
    source.name: source for source in (DigitsSource, SyntheticSource, ImageFolderSource)
}


def get(name: str) -> type[DataSource]:
    """The source class of dataset ``name``: a registered one, else a TFDS set."""
    return SOURCES.get(name, TFDSSource)


def create_dataset(config: Any) -> Dataset:
    """The data source for ``config.dataset``; raises ``DatasetError`` with a fix if unusable."""
    return Dataset(get(config.dataset)(config), config)


def described_names() -> list[str]:
    """The dataset names whose shape ``describe`` gives without reading the data."""
    return sorted([*KNOWN_SETS, *(name for name, source in SOURCES.items() if source.describes_without_data)])
