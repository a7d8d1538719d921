"""Normalisation constants that the library (pretrained weights' preprocessing) and the training
program (input pipelines) share. The module imports nothing, so the training program's input code
reads them without importing the models and conversion code."""

# torchvision's and timm's ImageNet statistics, on pixels scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's IMAGENET_INCEPTION_MEAN/STD: pixels mapped to [-1, 1], the preprocessing of BiT weights.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
