"""Fine-tune an ImageNet-pretrained ResNet-50 on your own folder of images (copy and adapt).

The folder is torchvision's ImageFolder layout, one sub-folder per class (JPEG, PNG, BMP, WebP):

    ROOT/train/<class>/*.jpg      ROOT/val/<class>/*.jpg   (or validation/, test/)

    python -m train --config=configs/finetune_folder.py --config.data_dir=ROOT --workdir=/tmp/ft
    python -m train.predict --workdir=/tmp/ft photo.jpg        # prints class names
    python -m train.export --workdir=/tmp/ft --out=/tmp/ft/model.pth   # + model.classes.txt

The images are read with Grain and Pillow, without TensorFlow (train/data/image_folder.py). The
pretrained weights (torchvision's IMAGENET1K_V2) are downloaded once; the classifier gets a new
head with one output per class folder. The backbone trains at a tenth of the head's learning
rate; ``--config.freeze_backbone=True --config.backbone_lr_multiplier=1`` trains the head alone.
"""

import os
from runpy import run_path


def get_config():
    # configs/ is not a package: the config this one extends is run by its path.
    c = run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))["get_config"]()
    c.dataset = "image_folder"
    c.data_dir = ""  # ROOT, holding train/ and val/: set --config.data_dir
    c.grain_worker_count = -1  # decoding processes: one per core (none on 1-2 cores: read threads)
    c.image_size = 224
    c.train_augment = "inception_crop"
    c.random_flip = True
    c.eval_crop_fraction = 0.875  # resize to 256, center-crop 224, as the weights were trained

    c.model.arch = "resnet50"
    c.model.overrides = {}
    c.dtype = "auto"  # bfloat16 on TPU/GPU, float32 on CPU
    c.init_from = "resnet50.tv2_in1k"
    c.new_head = True
    c.backbone_lr_multiplier = 0.1

    c.batch_size = 64
    c.eval_batch_size = 64
    c.num_epochs = 10
    c.learning_rate = 0.01
    c.warmup_epochs = 1.0
    c.weight_decay = 1e-4

    c.log_every_steps = 10
    c.eval_every_steps = 0  # every epoch
    c.checkpoint_every_steps = 200
    return c
