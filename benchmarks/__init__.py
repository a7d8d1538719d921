"""Benchmarks of the library and the training program (not part of either).

* ``python -m benchmarks.train_step``: the compiled training step on synthetic data, against
  PyTorch and a minimal Flax ResNet in the same process; cold vs warm compilation cache.
* ``python -m benchmarks.input_pipeline``: the JPEG training preprocessing, images/s per core.
* ``bash benchmarks/gpu_suite.sh OUTDIR``: the whole GPU run (BENCHMARKS.md, "GPU").
"""
