"""ResNet-50 on ImageNet with timm's "ResNet strikes back" procedure A2 (300 epochs).

Published: 79.8% top-1 at 224 (https://arxiv.org/abs/2110.00476, Table 1). NOT measured here:
this config transcribes the paper's hyper-parameters; it has not been trained with this code.

Table 1, A2 differs from A1 (``imagenet_resnet50_rsb_a1.py``, whose docstring lists the
choices the paper leaves to timm and the differences from timm's run) in 300 epochs, weight
decay 0.02 and mixup 0.1; the rest is A1's: batch 2048 (2016 here, see A1), LAMB lr 5e-3,
5 warm-up epochs then cosine, BCE (threshold 0.2), stochastic depth 0.05, repeated
augmentation 3, RandAugment 7/0.5, cutmix 1.0, train and test at 224 with crop ratio 0.95,
no EMA.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: A1 (which extends imagenet_resnet50.py) is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_resnet50_rsb_a1.py"))[
        "get_config"
    ]()
    c.num_epochs = 300
    c.weight_decay = 0.02
    c.mixup_alpha = 0.1
    return c
