"""ResNet-50 on ImageNet with torchvision's "new training recipe" (ResNet50_Weights.IMAGENET1K_V2).

Published: 80.858% top-1 (torchvision's weights table; recipe:
https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621 and the blog post
https://pytorch.org/blog/how-to-train-state-of-the-art-models-using-torchvision-latest-primitives/).
NOT measured here: this config transcribes the command, it has not been trained with this code.

The command (references/classification, 8 GPUs x 128 images): ``--lr 0.5 --lr-scheduler
cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment ta_wide
--epochs 600 --random-erase 0.1 --weight-decay 0.00002 --norm-weight-decay 0.0
--label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 --train-crop-size 176 --model-ema
--val-resize-size 232 --ra-sampler --ra-reps 4``, with the reference script's defaults for the
rest (plain SGD momentum 0.9 without Nesterov, ``--lr-warmup-decay 0.01``, ``--model-ema-steps
32 --model-ema-decay 0.99998``, bilinear interpolation, the scheduler stepped once per epoch).

Known differences from torchvision's run (no field here changes them):
- ``--norm-weight-decay 0.0`` exempts the BatchNorm parameters from weight decay but still
  decays every bias; ``weight_decay_on_bn_and_bias=False`` exempts both, so for ResNet-50 only
  ``fc.bias`` is treated differently (not decayed here).
- The random-resized crop is drawn as tf.image.sample_distorted_bounding_box does
  (``train_augment='inception_crop'``, scale 0.08-1, ratio 3/4-4/3, at least 10% of the image
  covered), not by torchvision's RandomResizedCrop (10 tries, then a central crop).
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_resnet50.py"))[
        "get_config"
    ]()
    # torchvision's resnet50() keeps the last BatchNorm of each block at scale 1.
    c.model.overrides = {"zero_init_residual": False, "bn_variance": "shifted"}

    c.batch_size = 1024  # 8 GPUs x --batch-size 128
    c.num_epochs = 600
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = False  # --opt sgd (the reference's 'sgd_nesterov' would set it)
    c.learning_rate = 0.5
    c.lr_base_batch_size = 0  # --lr is the rate itself, not scaled with the batch
    c.weight_decay = 2e-5
    c.weight_decay_on_bn_and_bias = False  # see the module docstring: fc.bias differs

    c.lr_schedule = "cosine"  # CosineAnnealingLR over the epochs after the warm-up, to 0
    c.min_lr = 0.0
    c.warmup_epochs = 5.0
    c.lr_warmup_method = "linear"
    c.lr_warmup_decay = 0.01  # LinearLR's start_factor
    c.warmup_prefix = True  # SequentialLR: the cosine starts after the warm-up
    c.sched_on_updates = False  # lr_scheduler.step() once per epoch

    c.label_smoothing = 0.1
    c.mixup_alpha = 0.2
    c.cutmix_alpha = 1.0  # RandomChoice of mixup and cutmix (each p=1): one per batch
    c.mixup_prob = 1.0
    c.mixup_switch_prob = 0.5
    c.mixup_mode = "batch"

    c.image_size = 176  # --train-crop-size
    c.auto_augment = "ta_wide"
    c.interpolation = "bilinear"
    # transforms.RandomErasing(p=0.1) with its defaults: zeros, scale (0.02, 0.33), ratio (0.3, 3.3).
    c.random_erase_prob = 0.1
    c.random_erase_mode = "const"
    c.random_erase_scale = (0.02, 0.33)
    c.random_erase_ratio = (0.3, 3.3)
    c.aug_repeats = 4  # --ra-sampler --ra-reps 4
    c.eval_resize_size = 232  # --val-resize-size
    c.eval_image_size = 224  # --val-crop-size (default)

    # --model-ema: every 32 steps, decay 1 - min(1, (1 - 0.99998) * 1024 * 32 / 600).
    c.ema_decay = 0.99998
    c.ema_every_steps = 32
    return c
