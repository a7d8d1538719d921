"""The training program's data: one ``DataSource`` per kind of dataset, behind one registry.

* ``core``: the ``DataSource`` interface, ``DatasetInfo``, ``Dataset`` (the iterators the loop
  uses) and the helpers the sources share;
* ``registry``: ``config.dataset`` -> source (``get``, ``create_dataset``), the one place that
  reads the dataset's name;
* the sources: ``digits`` (scikit-learn's, in memory), ``synthetic`` (benchmarks), ``tfds`` (any
  other name), ``image_folder`` (folders of images through Grain);
* the augmentation: ``augment`` (its options), ``image_ops`` (Pillow and NumPy, image folders),
  ``tf_ops`` (TF ops, TFDS).

The package imports nothing itself; import the module you need.
"""
