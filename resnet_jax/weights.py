"""The published weights that ``resnet_jax.pretrained`` names: torchvision's ImageNet weights and
timm's on the Hugging Face hub, with the evaluation preprocessing and the accuracy their sources
give. Data only; ``pretrained.py`` registers each entry."""

# torchvision.models ImageNet weights: (arch, IMAGENET1K_ version, file, eval resize, top-1).
# Files, resize sizes and accuracies as torchvision's Weights enums; the V2 recipe evaluates at 232.
TORCHVISION_WEIGHTS = [
    ("resnet18", 1, "resnet18-f37072fd.pth", 256, 69.758),
    ("resnet34", 1, "resnet34-b627a593.pth", 256, 73.314),
    ("resnet50", 1, "resnet50-0676ba61.pth", 256, 76.130),
    ("resnet50", 2, "resnet50-11ad3fa6.pth", 232, 80.858),
    ("resnet101", 1, "resnet101-63fe2227.pth", 256, 77.374),
    ("resnet101", 2, "resnet101-cd907fc2.pth", 232, 81.886),
    ("resnet152", 1, "resnet152-394f9c45.pth", 256, 78.312),
    ("resnet152", 2, "resnet152-f82ba261.pth", 232, 82.284),
    ("resnext50_32x4d", 1, "resnext50_32x4d-7cdf4587.pth", 256, 77.618),
    ("resnext50_32x4d", 2, "resnext50_32x4d-1a0047aa.pth", 232, 81.198),
    ("resnext101_32x8d", 1, "resnext101_32x8d-8ba56ff5.pth", 256, 79.312),
    ("resnext101_32x8d", 2, "resnext101_32x8d-110c445d.pth", 232, 82.834),
    ("resnext101_64x4d", 1, "resnext101_64x4d-173b62eb.pth", 232, 83.246),
    ("wide_resnet50_2", 1, "wide_resnet50_2-95faca4d.pth", 256, 78.468),
    ("wide_resnet50_2", 2, "wide_resnet50_2-9ba9bcbe.pth", 232, 81.602),
    ("wide_resnet101_2", 1, "wide_resnet101_2-32ee1156.pth", 256, 78.848),
    ("wide_resnet101_2", 2, "wide_resnet101_2-d733dc28.pth", 232, 82.510),
]

# timm's weights on the Hugging Face hub: (name, eval image size, crop_pct, top-1). Top-1 as timm's
# results-imagenet.csv, measured at that size and crop_pct with bicubic resizing.
TIMM_WEIGHTS = [
    ("resnet18.a1_in1k", 288, 1.0, 73.158),
    ("resnet18d.ra2_in1k", 288, 0.95, 73.794),
    ("resnet34.a1_in1k", 288, 1.0, 77.918),
    ("resnet34d.ra2_in1k", 288, 0.95, 78.436),
    ("resnet26d.bt_in1k", 288, 0.95, 77.408),
    ("resnet26t.ra2_in1k", 320, 1.0, 78.332),
    ("resnet50.a1_in1k", 288, 1.0, 81.214),
    ("resnet50d.ra2_in1k", 288, 0.95, 81.356),
    ("resnet50d.a1_in1k", 288, 1.0, 81.450),
    ("resnet101.a1h_in1k", 288, 1.0, 82.778),
    ("resnet101d.ra2_in1k", 320, 1.0, 83.016),
    ("resnet152.a1h_in1k", 288, 1.0, 83.450),
    ("resnet152d.ra2_in1k", 320, 1.0, 83.684),
    ("resnet200d.ra2_in1k", 320, 1.0, 83.964),
    ("resnext50_32x4d.a1h_in1k", 288, 1.0, 82.014),
    ("wide_resnet50_2.racm_in1k", 288, 0.95, 82.280),
    # SE-ResNets: eval size and crop_pct from timm's pretrained_cfg (test_input_size,
    # test_crop_pct), top-1 from results-imagenet.csv at that size (timm commit 4e5207c7, 2025-10).
    ("seresnet50.a1_in1k", 288, 1.0, 81.114),
    ("seresnext50_32x4d.racm_in1k", 288, 0.95, 82.186),
    ("seresnext101_32x8d.ah_in1k", 288, 1.0, 84.192),
    ("seresnext26d_32x4d.bt_in1k", 288, 0.95, 78.816),
]


# timm's ResNetV2 weights: (name, eval image size, crop_pct, interpolation, classes). All of them
# expect timm's Inception normalisation (mean = std = 0.5), as their pretrained_cfg says. BiT's
# ImageNet-21k weights (21,843 classes) are for transfer: load them with num_classes=N for a fresh
# head.fc. No top-1 is given: timm's cfg carries none, and none was measured here.
TIMM_V2_WEIGHTS = [
    ("resnetv2_50x1_bit.goog_in21k", 224, 0.875, "bilinear", 21843),
    ("resnetv2_101x1_bit.goog_in21k", 224, 0.875, "bilinear", 21843),
    ("resnetv2_50x1_bit.goog_in21k_ft_in1k", 448, 1.0, "bilinear", 1000),
    ("resnetv2_50.a1h_in1k", 288, 1.0, "bicubic", 1000),
    ("resnetv2_101.a1h_in1k", 288, 1.0, "bicubic", 1000),
]
