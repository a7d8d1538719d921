"""Throughput benchmark: ResNet-50 on synthetic 224x224 data, no input pipeline, no checkpoints.

Measures training images/s after compilation (reported in the summary and in metrics.jsonl).
Typical use: ``--config.batch_size=<128 x devices> --config.parallelism=pmap`` to compare
drivers, or ``--config.model.arch=resnet18``. On a CPU use e.g. ``--config.image_size=64
--config.batch_size=16 --config.num_train_steps=10``.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))["get_config"]()
    c.dataset = "synthetic"
    c.image_size = 224
    c.synthetic_num_eval_examples = 0

    c.model.arch = "resnet50"
    c.model.overrides = {"bn_variance": "shifted"}  # as configs/imagenet_resnet50.py
    c.dtype = "auto"

    c.batch_size = 256
    c.num_train_steps = 200
    c.lr_base_batch_size = 256
    c.warmup_epochs = 0.0
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1

    c.eval_every_steps = -1
    c.eval_at_end = False
    c.save_checkpoints = False
    return c
