"""ResNet-18 (3x3 stem, no max-pool) on CIFAR-10 from TFDS (usually about 95% test accuracy).

SGD with Nesterov momentum, cosine schedule, 200 epochs, pad-4 random crops and flips. Prepare
the data once with ``python -m train.prepare --config=configs/cifar10.py`` or pass
``--config.download=True``.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))["get_config"]()
    c.dataset = "cifar10"
    c.image_size = 32
    c.crop_padding = 4
    c.random_flip = True
    c.normalize_mean = (125.307, 122.950, 113.865)
    c.normalize_std = (62.993, 62.089, 66.705)
    c.cache = True

    c.model.overrides = {"small_stem": True}
    c.dtype = "auto"

    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 200
    c.lr_base_batch_size = 128
    c.log_every_steps = 100
    c.eval_every_steps = 0  # every epoch
    c.checkpoint_every_steps = 3910  # 10 epochs
    return c
