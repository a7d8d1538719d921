"""The resnet_jax training program: ``python -m train --config=configs/default.py --workdir=DIR``.

Modules: ``steps`` (pure train/eval steps), ``parallel`` (the jit/pmap drivers), ``data/`` (the
data sources: digits, synthetic, TFDS, image folders via Grain; their augmentation),
``loop`` (the training loop), ``checkpoint`` (orbax), ``metrics`` (JSONL, TensorBoard, plots),
``predict`` (top-5 classes of image files).
"""
