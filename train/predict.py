"""Top-k classes of image files with a trained checkpoint.

``python -m train.predict --workdir=DIR [--step=N] [--top_k=5] IMAGE...`` (``DIR`` and the
images may be ``gs://`` paths) reads the run's
config and dataset info from ``DIR``, restores the newest (or given) checkpoint, applies the
same preprocessing as evaluation (resize, center crop, normalisation) and prints, per image,
the top-k class names with their probabilities. Grayscale models get the image converted to
one channel; for the digits model, draw light digits on a dark background like sklearn's.
``.npy`` files are raw pixel arrays (0..255), ``[H, W]`` or ``[H, W, C]`` with the model's ``C``.
A run on an image folder preprocesses both with ``train/image_ops.py`` (Pillow and NumPy), so
predicting, like its training and export, never imports TensorFlow; other runs use the TF ops of
their evaluation.
An unreadable image or an array of the wrong rank or channel count is a one-line error (exit 2).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging

from train import build, checkpoint, input_pipeline, paths
from train.model import create_model


def _define_flags() -> None:
    """Flags exist only when this module runs as a program, so importing it beside
    ``train.export`` (which also has ``--workdir``) never clashes."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
    flags.mark_flag_as_required("workdir")


def predict_files(
    workdir: str, paths: Sequence[str], *, step: int | None = None, top_k: int = 5
) -> list[list[tuple[int, str, float]]]:
    """Per image, the ``top_k`` ``(class index, class name, probability)``, most likely first.

    Args:
        workdir: A run's workdir (local or ``gs://``): its config, class names and checkpoint.
        paths: Image files, preprocessed as the run's evaluation does.
        step: The checkpoint step to use; None: the newest.
        top_k: Classes per image, capped at the number of classes.
    """
    config, info = build.load_run_info(workdir)
    # Compute in float32 here: inference of a few images is not worth a reduced precision.
    config.dtype = "float32"
    model, _ = create_model(config, info)
    variables = checkpoint.restore_variables(workdir, step)
    crop = float(config.eval_crop_fraction)
    images = np.stack([_load(p, info, crop) for p in paths])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    k = min(top_k, info.num_classes)
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        results.append([(int(i), info.class_names[i], float(row[i])) for i in order])
    return results


class ImageError(ValueError):
    """An input image cannot be used with the model; the message names the file and the fix."""


def _load(path: str, info: input_pipeline.DatasetInfo, crop: float) -> np.ndarray:
    channels = info.image_shape[-1]
    if not path.endswith(".npy"):
        try:
            return input_pipeline.load_image_for_eval(path, info, crop)
        except Exception as e:  # TF's errors are long; the first line says what is wrong
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ImageError(f"cannot read {path} as an image (PNG, JPEG, GIF, BMP): {first[:200]}") from None
    try:
        with paths.Path(path).open("rb") as f:  # local or gs://
            array = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read {path} as a .npy array: {e}") from None
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] != channels:
        raise ImageError(
            f"{path} has shape {array.shape}; the model takes one image of shape [H, W] or "
            f"[H, W, {channels}] ({channels} channel(s), pixel values 0..255)."
        )
    if info.name == input_pipeline.IMAGE_FOLDER:
        # The run's own NumPy/Pillow preprocessing: its whole workflow stays without TensorFlow.
        from train import image_ops

        pixels = image_ops.eval_array(array, info.image_shape[0], crop)
    else:
        pixels = input_pipeline.preprocess_eval_image(array.astype(np.float32), info, crop, to_uint8=False)
    return input_pipeline.normalize_pixels(pixels, info)


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from resnet_jax.platform import skip_absent_tpu

    skip_absent_tpu()
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files: python -m train.predict --workdir=DIR IMAGE...")
    try:
        FLAGS = flags.FLAGS
        results = predict_files(FLAGS.workdir, paths, step=FLAGS.step, top_k=FLAGS.top_k)
    except (FileNotFoundError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path, top in zip(paths, results):
        print(path)
        for rank, (index, name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<30} {100 * prob:6.2f}%  (class {index})")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
