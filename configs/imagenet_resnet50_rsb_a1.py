"""ResNet-50 on ImageNet with timm's "ResNet strikes back" procedure A1 (600 epochs).

Published: 80.4% top-1 at 224 (Wightman, Touvron, Jegou, "ResNet strikes back: An improved
training procedure in timm", https://arxiv.org/abs/2110.00476, Table 1). NOT measured here:
this config transcribes the paper's hyper-parameters; it has not been trained with this code.

Table 1, A1: train and test at 224 (test crop ratio 0.95), 600 epochs, batch 2048, LAMB at
lr 5e-3 with weight decay 0.01, cosine decay after 5 warm-up epochs, BCE loss (targets
binarised at 0.2 after mixing, section 2), no label smoothing, no dropout, stochastic depth
0.05, repeated augmentation (3, timm's --aug-repeats), flip and random-resized crop,
RandAugment magnitude 7 with std 0.5 (timm's 'rand-m7-mstd0.5-inc1'), mixup 0.2, cutmix 1.0,
no random erasing, no EMA, mixed precision.

Choices the paper leaves to timm's train.py of its time (v0.4/0.5), and differences:
- warm-up start rate 1e-4 and cosine floor 1e-6 (the --warmup-lr and --min-lr defaults of
  that train.py, which published reproductions of A2 and A3 also use), the warm-up replacing
  the start of the cosine (no --warmup-prefix), the rate
  set once per epoch, no cool-down epochs (the paper's epoch counts);
- batch 2016 instead of 2048: with mixup, ``aug_repeats`` must divide the batch here;
- LAMB as timm.optim.Lamb: eps 1e-6, its own gradient-norm cap at 1.0; no weight decay on
  biases and BatchNorm parameters (timm's filter_bias_and_bn);
- eval resizes to int(224 / 0.95) = 235 then crops 224, bicubic (timm's resnet50 eval
  config). ``interpolation`` is one field for train and eval: timm's training crop draws
  bilinear or bicubic at random (--train-interpolation random); here it is bicubic;
- the random-resized crop is drawn as tf.image.sample_distorted_bounding_box does
  (``inception_crop``), not by timm's RandomResizedCropAndInterpolation.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_resnet50.py"))[
        "get_config"
    ]()
    # timm's resnet50 zero-initialises each block's last BatchNorm (zero_init_last), as here.
    c.model.drop_path_rate = 0.05

    # The paper's batch is 2048. With mixup, aug_repeats must divide batch_size here
    # (train/config.py), and 3 does not divide 2048: 2016 (= 3 x 672, over 8, 16 or 32
    # devices) is the nearest such batch, at the same learning rate (timm does not scale it).
    # A3 (no repeated augmentation) keeps 2048.
    c.batch_size = 2016
    c.num_epochs = 600
    c.optimizer = "lamb"
    c.opt_betas = (0.9, 0.999)
    c.opt_eps = 1e-6  # timm.optim.Lamb's default
    c.lamb_max_grad_norm = 1.0
    c.learning_rate = 5e-3
    c.lr_base_batch_size = 0  # --lr is the rate itself
    c.weight_decay = 0.01
    c.weight_decay_on_bn_and_bias = False

    c.lr_schedule = "cosine"
    c.warmup_epochs = 5.0
    c.lr_warmup_method = "linear"
    c.warmup_lr = 1e-4
    c.min_lr = 1e-6
    c.warmup_prefix = False
    c.sched_on_updates = False

    c.loss = "bce"
    c.bce_target_threshold = 0.2
    c.label_smoothing = 0.0
    c.mixup_alpha = 0.2
    c.cutmix_alpha = 1.0
    c.mixup_prob = 1.0
    c.mixup_switch_prob = 0.5
    c.mixup_mode = "batch"

    c.image_size = 224
    c.auto_augment = "rand-m7-mstd0.5-inc1"
    c.random_erase_prob = 0.0
    c.aug_repeats = 3
    c.interpolation = "bicubic"
    c.eval_image_size = 224
    c.eval_resize_size = 235  # int(224 / 0.95): test crop ratio 0.95
    c.ema_decay = 0.0
    return c
