"""ResNet-50 on ImageNet with LARS at large batch, following the MLPerf training recipe.

Global batch 3264, LARS (trust coefficient 0.001, momentum 0.9), 2 warm-up epochs then
polynomial (power 2) decay to 1e-4 over 37 epochs in total, weight decay 5e-5, no weight decay
or trust-ratio scaling on BatchNorm parameters and biases, label smoothing 0.1. MLPerf's target
is 75.9% top-1. The batch must divide over the devices (3264 = 8 x 408 = 64 x 51); for another
device count pick a nearby multiple and keep ``learning_rate`` (the peak for batch 3264)
roughly proportional to it, then retune.

See ``imagenet_resnet50.py`` for preparing ImageNet.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_resnet50.py"))[
        "get_config"
    ]()
    c.batch_size = 3264
    c.num_epochs = 37
    c.optimizer = "lars"
    c.nesterov = False
    c.learning_rate = 10.5  # peak at batch 3264
    c.lr_base_batch_size = 0
    c.lr_schedule = "polynomial"
    c.end_learning_rate = 1e-4
    c.warmup_epochs = 2.0
    c.weight_decay = 5e-5
    c.model.overrides = {"bn_variance": "shifted"}  # MLPerf initialises BatchNorm scales to 1
    c.checkpoint_every_steps = 1000
    return c
