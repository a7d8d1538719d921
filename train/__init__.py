"""The resnet_jax training program: ``python -m train --config=configs/default.py --workdir=DIR``.

Modules: ``steps`` (pure train/eval steps), ``parallel`` (the jit/pmap drivers), ``input_pipeline`` (TFDS,
scikit-learn digits and synthetic data), ``image_folder`` and ``image_ops`` (folders of images
via Grain, without TensorFlow), ``loop`` (the training loop), ``checkpoint`` (orbax),
``metrics`` (JSONL, TensorBoard, plots), ``predict`` (top-5 classes of image files).
"""
