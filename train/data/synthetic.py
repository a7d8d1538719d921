"""``dataset='synthetic'``: one random batch of ``uint8`` pixels repeated forever, for benchmarks.

Its pixels are ``uint8`` as a real set's are, so a throughput run moves the same bytes to the
device; its shape comes from the config's ``image_size`` and ``synthetic_*`` fields, which is
also how ``train.aot`` describes a dataset it does not know.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from train.data import tf_ops
from train.data.core import Batch, DatasetInfo, DataSource, host_batch_size, shape_info
from train.data.eval_resize import EvalOptions


class SyntheticSource(DataSource):
    name = "synthetic"
    # The loop places the one batch on the devices once: benchmarks measure the model, not the
    # host-to-device copies.
    repeats_one_batch = True

    def __init__(self, config: Any):
        self.info = dataclasses.replace(
            self.describe(config)[0],
            num_eval_examples=int(config.synthetic_num_eval_examples),
            class_names=tuple(f"class_{i}" for i in range(int(config.synthetic_num_classes))),
        )

    describes_without_data = True

    @classmethod
    def describe(cls, config: Any) -> tuple[DatasetInfo, Any]:
        size, channels = int(config.image_size), int(config.synthetic_channels)
        shape = (size, size, channels)
        num_classes, num_train = int(config.synthetic_num_classes), int(config.synthetic_num_examples)
        return shape_info(config, cls.name, num_classes, shape, num_train), np.uint8

    load_image = staticmethod(tf_ops.load_image)
    load_array = staticmethod(tf_ops.load_array)

    def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
        return max(self.info.num_train_examples // global_batch, 1)

    def batch(self, n: int, seed: int, shape: tuple[int, ...] | None = None) -> Batch:
        rng = np.random.default_rng(seed)
        return {
            "image": rng.integers(0, 256, (n, *(shape or self.info.image_shape)), dtype=np.uint8),
            "label": rng.integers(0, self.info.num_classes, n).astype(np.int32),
        }

    def train_batches(self, config, global_batch, start_step, process_index, process_count):
        batch = self.batch(host_batch_size(global_batch, process_count), config.seed)
        return itertools.repeat(batch)

    def eval_batches(self, config, global_batch, process_index, process_count):
        per_host = host_batch_size(global_batch, process_count)
        eval_shape = EvalOptions.from_config(config, self.info.image_shape[0]).shape(
            self.info.image_shape[-1]
        )
        batch = self.batch(per_host, config.seed + 1, eval_shape)
        batch["mask"] = np.ones(per_host, np.float32)
        steps = -(-self.info.num_eval_examples // global_batch)
        return itertools.repeat(batch, steps)
