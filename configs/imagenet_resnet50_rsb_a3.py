"""ResNet-50 on ImageNet with timm's "ResNet strikes back" procedure A3 (100 epochs at 160).

Published: 78.1% top-1 at 224 (https://arxiv.org/abs/2110.00476, Table 1). NOT measured here:
this config transcribes the paper's hyper-parameters; it has not been trained with this code.

Table 1, A3 differs from A1 (``imagenet_resnet50_rsb_a1.py``, whose docstring lists the
choices the paper leaves to timm and the differences from timm's run) in: training at 160
(tested at 224, crop ratio 0.95), 100 epochs, lr 8e-3, weight decay 0.02, no stochastic
depth, no repeated augmentation, RandAugment magnitude 6 (std 0.5), mixup 0.1; the rest is
A1's: batch 2048, LAMB, 5 warm-up epochs then cosine, BCE (threshold 0.2), cutmix 1.0, no EMA.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: A1 (which extends imagenet_resnet50.py) is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_resnet50_rsb_a1.py"))[
        "get_config"
    ]()
    c.image_size = 160
    c.num_epochs = 100
    c.learning_rate = 8e-3
    c.weight_decay = 0.02
    c.model.drop_path_rate = 0.0
    c.aug_repeats = 0
    c.batch_size = 2048  # the paper's; A1's 2016 is only for its repeated augmentation
    c.auto_augment = "rand-m6-mstd0.5-inc1"
    c.mixup_alpha = 0.1
    return c
