"""Fine-tuning, as PyTorch's transfer-learning tutorial does it (load pretrained weights, new head,
train), on the embedded digits so it runs anywhere in a minute.

1. Pretrain on digits 0-4:
   python -m train --config=configs/default.py --workdir=/tmp/digits04 --config.class_subset=0,1,2,3,4
2. Fine-tune a new head on digits 5-9 from it:
   python -m train --config=configs/finetune.py --workdir=/tmp/ft59 --config.init_from=/tmp/digits04

``init_from`` also takes a PyTorch/timm file or a pretrained name (``resnet50.tv2_in1k``) with a
matching ``config.model``. ``--config.freeze_backbone=True`` trains the head alone,
``--config.backbone_lr_multiplier=0.1`` the backbone more slowly.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))["get_config"]()
    c.class_subset = (5, 6, 7, 8, 9)
    c.init_from = ""  # a pretraining run's workdir, a weights file or a pretrained name
    c.new_head = True  # new classes: never reuse the old classifier, even with the same count
    c.num_train_steps = 40
    c.warmup_epochs = 0.0
    c.log_every_steps = 10
    c.eval_every_steps = 20
    return c
