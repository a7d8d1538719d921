"""ResNet-50 on ImageNet (ILSVRC2012), the standard recipe (published: about 76-77% top-1, 90 epochs).

SGD with Nesterov momentum 0.9, peak learning rate 0.1 x batch/256 reached after 5 linear
warm-up epochs then cosine decay to 0, weight decay 1e-4 on conv/dense kernels, label smoothing
0.1, zero-initialised last BatchNorm of each block, Inception-style random-resized crops and
flips at 224, eval on the central 224 crop of a 256 resize. bfloat16 compute (float32
parameters) on TPU and GPU.

ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
``--config.manual_dir`` (default ``~/tensorflow_datasets/downloads/manual``) and run
``python -m train.prepare --config=configs/imagenet_resnet50.py --config.manual_dir=DIR`` once
(or pass ``--config.download=True``).
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))["get_config"]()
    c.dataset = "imagenet2012"
    c.eval_split = "validation"
    c.image_size = 224
    c.train_augment = "inception_crop"
    c.random_flip = True
    c.eval_crop_fraction = 0.875  # resize to 256, center-crop 224
    c.normalize_mean = (123.675, 116.28, 103.53)
    c.normalize_std = (58.395, 57.12, 57.375)

    c.model.arch = "resnet50"
    c.model.overrides = {"zero_init_residual": True, "bn_variance": "shifted"}  # faster on GPU
    c.dtype = "auto"  # bfloat16 on TPU/GPU; '--config.dtype=float16' for loss-scaled fp16 on GPU

    c.batch_size = 1024
    c.eval_batch_size = 1000
    c.num_epochs = 90
    c.lr_base_batch_size = 256
    c.warmup_epochs = 5.0
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1

    c.log_every_steps = 100
    c.eval_every_steps = 0  # every epoch
    c.checkpoint_every_steps = 2500
    return c
