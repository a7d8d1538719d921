"""ResNet-18 (3x3 stem, no max-pool) on CIFAR-10 from TFDS (usually about 95% test accuracy).

SGD with Nesterov momentum, cosine schedule, 200 epochs, pad-4 random crops and flips. Prepare
the data once with ``tfds build cifar10`` or pass ``--config.download=True``.
"""

import os
import runpy


def _default_config():
    # configs/ is not a package: run the sibling that defines the fields by its path.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    return runpy.run_path(path)["get_config"]()


def get_config():
    c = _default_config()
    c.dataset = "cifar10"
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 32
    c.train_augment = "pad_crop"
    c.crop_padding = 4
    c.random_flip = True
    c.eval_crop_fraction = 1.0
    c.normalize_mean = (125.307, 122.950, 113.865)
    c.normalize_std = (62.993, 62.089, 66.705)
    c.cache = True

    c.model.arch = "resnet18"
    c.model.overrides = {"small_stem": True}
    c.dtype = "auto"

    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 200
    c.learning_rate = 0.1
    c.lr_base_batch_size = 128
    c.warmup_epochs = 1.0
    c.weight_decay = 5e-4
    c.label_smoothing = 0.0
    c.log_every_steps = 100
    c.eval_every_steps = 0  # every epoch
    c.checkpoint_every_steps = 3910  # 10 epochs
    return c
