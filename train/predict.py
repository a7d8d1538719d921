"""Top-k classes of image files with a trained checkpoint.

``python -m train.predict --workdir=DIR [--step=N] [--top_k=5] [--batch_size=64]
[--output=text|json|csv] [--noema] IMAGE|FOLDER...``
(``DIR``, the images and folders may be ``gs://`` paths) reads the run's
config and dataset info from ``DIR``, restores the newest (or given) checkpoint, applies the
same preprocessing as evaluation (resize, center crop, normalisation) and prints, per image,
the top-k class names with their probabilities. A folder stands for the image files under it
(.jpg, .jpeg, .png, .bmp, .webp, sub-folders included, in the order an image-folder run lists
them). Images are read and run ``batch_size`` at a time (one compilation: the last batch is
padded), and each batch's results are printed as soon as it is done, with a progress bar.
Grayscale models get the image converted to one channel; for the digits model, draw light
digits on a dark background like sklearn's.
``.npy`` files are raw pixel arrays (0..255), ``[H, W]`` or ``[H, W, C]`` with the model's ``C``.
Each run's data source loads them (``load_image``, ``load_array``): a run on an image folder
preprocesses both with ``train/data/image_ops.py`` (Pillow and NumPy), so predicting, like its
training and export, never imports TensorFlow; other runs use the TF ops of their evaluation.
An unreadable image or an array of the wrong rank or channel count is skipped with one warning
line on stderr, and the others are still predicted (exit 1 when any was skipped); a path that
does not exist, or a folder without images, is a one-line error (exit 2) before any prediction.
``--output=json`` prints one JSON object per image and line (``filename``, ``classes``,
``indices``, ``probabilities``, most likely first), ``--output=csv`` one row per image
(``filename,class_1,index_1,probability_1,...``), as timm's inference script writes its results.
A checkpoint of a run with an EMA (``config.ema_decay > 0``, ``train/ema.py``) predicts with the
EMA weights, as the recipes that keep one report it, and says so in one line on stderr;
``--noema`` takes the trained weights instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from train import build, checkpoint, paths
from train.data import image_folder, registry
from train.data.core import DatasetError, DatasetInfo, decode_reason
from train.data.eval_resize import EvalOptions
from train.model import create_model


def _define_flags() -> None:
    """Flags exist only when this module runs as a program, so importing it beside
    ``train.export`` (which also has ``--workdir``) never clashes."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "Images read and run at a time.", lower_bound=1)
    flags.DEFINE_enum(
        "output",
        "text",
        OUTPUTS,
        "text: ranked lines per image; json: one JSON object per line; csv: a row each.",
    )
    flags.DEFINE_bool(
        "ema", True, "Use the EMA weights when the checkpoint has them (--noema: the trained ones)."
    )
    flags.mark_flag_as_required("workdir")


OUTPUTS = ("text", "json", "csv")


def predict_files(
    workdir: str,
    paths: Sequence[str],
    *,
    step: int | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    ema: bool = True,
) -> list[list[tuple[int, str, float]]]:
    """Per image, the ``top_k`` ``(class index, class name, probability)``, most likely first.

    Args:
        workdir: A run's workdir (local or ``gs://``): its config, class names and checkpoint.
        paths: Image files, preprocessed as the run's evaluation does.
        step: The checkpoint step to use; None: the newest.
        top_k: Classes per image (at least 1), capped at the number of classes.
        batch_size: Images read and run at a time (at least 1).
        ema: The checkpoint's EMA weights when it has them; False: the trained weights.
    """
    found = iter_predictions(workdir, paths, step=step, top_k=top_k, batch_size=batch_size, ema=ema)
    return [top for _, top in found]


def iter_predictions(
    workdir: str,
    paths: Sequence[str],
    *,
    step: int | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    progress: bool = False,
    on_unreadable: Callable[[ImageError], None] | None = None,
    ema: bool = True,
    on_weights: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, list[tuple[int, str, float]]]]:
    """``(path, top_k)`` per image of ``predict_files``, yielded a batch at a time. An image that
    cannot be used raises :class:`ImageError`, or with ``on_unreadable`` is passed to it and
    skipped. ``on_weights`` gets a line saying so when the EMA weights are used."""
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}.")
    if not paths:
        return
    config, info = build.load_run_info(workdir)
    # Compute in float32 here: inference of a few images is not worth a reduced precision.
    config.dtype = "float32"
    model, _ = create_model(config, info)
    variables, saved_step, used_ema = checkpoint.restore_weights(workdir, step, ema=None if ema else False)
    if used_ema and on_weights is not None:
        on_weights(
            f"predicting with the EMA weights of checkpoint step {saved_step} (--noema: the trained ones)."
        )
    options = EvalOptions.from_config(config, info.image_shape[0])  # the run's eval size and resize
    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False), axis=-1))
    k = min(top_k, info.num_classes)
    size = min(batch_size, len(paths))  # every batch padded to this: one compilation
    starts = range(0, len(paths), size)
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), desc="predict", unit="image", disable=not progress or len(starts) < 2) as bar:
        for start in starts:
            chunk, loaded = [], []
            for path in paths[start : start + size]:
                try:
                    loaded.append(_load(path, info, options))
                    chunk.append(path)
                except ImageError as e:
                    if on_unreadable is None:
                        raise
                    on_unreadable(e)
            if not chunk:
                bar.update(len(paths[start : start + size]))
                continue
            images = np.stack(loaded)
            padded = np.zeros((size, *images.shape[1:]), images.dtype)
            padded[: len(chunk)] = images
            probs = np.asarray(forward(variables, padded))[: len(chunk)]
            for path, row in zip(chunk, probs):
                order = np.argsort(-row, kind="stable")[:k]
                yield path, [(int(i), info.class_names[i], float(row[i])) for i in order]
            bar.update(len(paths[start : start + size]))


def expand_folders(args: Sequence[str]) -> list[str]:
    """``args`` with each folder (local or ``gs://``) replaced by the image files under it."""
    out = []
    for arg in args:
        path = paths.Path(arg)
        if not path.is_dir():
            if not path.exists():
                raise ImageError(f"{arg} does not exist; give image files, or folders that hold them.")
            out.append(arg)
            continue
        files = image_folder.image_files(arg)
        if not files:
            raise ImageError(
                f"folder {arg} has no image files ({', '.join(image_folder.IMAGE_EXTENSIONS)}) in it "
                f"or its sub-folders; predict reads {_readable()}."
            )
        out += files
    return out


class ImageError(ValueError):
    """An input image cannot be used with the model; the message names the file and the fix."""


def _readable() -> str:
    """What predict reads, in every message that says so (one list: the image-folder one)."""
    return f"image files ({', '.join(image_folder.IMAGE_EXTENSIONS)}) and .npy arrays"


def _load(path: str, info: DatasetInfo, options: EvalOptions) -> np.ndarray:
    channels = info.image_shape[-1]
    source = registry.get(info.name)
    if not path.endswith(".npy"):
        try:
            return source.load_image(path, info, options)
        except Exception as e:
            cause = e.__context__ if isinstance(e, image_folder.ImageDecodeError) else e
            raise ImageError(
                f"cannot read {path} as an image ({decode_reason(cause)}); predict reads {_readable()}."
            ) from None
    try:
        with paths.Path(path).open("rb") as f:  # local or gs://
            array = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read {path} as a .npy array: {e}") from None
    shape = array.shape
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] != channels:
        takes = (
            "[H, W] or [H, W, 1] (1 channel" if channels == 1 else f"[H, W, {channels}] ({channels} channels"
        )
        raise ImageError(
            f"{path} has shape {shape}; the model takes one image of shape {takes}, pixel values 0..255)."
        )
    return source.load_array(array, info, options)


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        # TensorFlow's C++ start-up and decoder warnings (the digits and TFDS runs' eval ops)
        # would come between the results; a skipped file's warning line says what they would.
        # "1" is JAX's default (jax/__init__.py), not the user's choice.
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    from resnet_jax.platform import skip_absent_tpu

    skip_absent_tpu()
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files: python -m train.predict --workdir=DIR IMAGE...")
    FLAGS = flags.FLAGS
    from tqdm.auto import tqdm

    skipped = []

    def skip(error: ImageError) -> None:
        # Through tqdm, on a line of its own above the progress bar (stderr).
        skipped.append(error)
        tqdm.write(f"warning: {error} Skipped.", file=sys.stderr)

    try:
        files = expand_folders(paths)
        results = iter_predictions(
            FLAGS.workdir,
            files,
            step=FLAGS.step,
            top_k=FLAGS.top_k,
            batch_size=FLAGS.batch_size,
            progress=True,
            on_unreadable=skip,
            ema=FLAGS.ema,
            on_weights=lambda line: tqdm.write(line, file=sys.stderr),
        )
        for i, (path, top) in enumerate(results):
            # Through tqdm, so that the progress bar (on stderr) is redrawn below the results.
            # A local file name that is not UTF-8 is shown with U+FFFD where its bytes are not.
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            tqdm.write(format_result(shown, top, FLAGS.output, header=i == 0))
    except (FileNotFoundError, ImageError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # The reader stopped early (``| head``): stop quietly, as a shell tool does on SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)
    if skipped:
        print(f"{len(skipped)} of {len(files)} files skipped (warnings above).", file=sys.stderr)
        sys.exit(1)


def format_result(path: str, top: Sequence[tuple[int, str, float]], output: str, header: bool = False) -> str:
    """One image's ``top`` as ``output`` (:data:`OUTPUTS`); ``header`` adds the CSV header."""
    if output == "json":
        return json.dumps(
            {
                "filename": path,
                "classes": [name for _, name, _ in top],
                "indices": [index for index, _, _ in top],
                "probabilities": [prob for *_, prob in top],
            }
        )
    if output == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if header:
            writer.writerow(
                ["filename"]
                + [f"{c}_{r}" for r in range(1, len(top) + 1) for c in ("class", "index", "probability")]
            )
        writer.writerow([path] + [v for index, name, prob in top for v in (name, index, f"{prob:.6g}")])
        return out.getvalue().rstrip("\n")
    lines = [path] + [
        f"  {rank}. {name:<30} {100 * prob:6.2f}%  (class {index})"
        for rank, (index, name, prob) in enumerate(top, 1)
    ]
    return "\n".join(lines)


def run() -> None:
    """The ``resnet-jax-predict`` console script: ``python -m train.predict`` from anywhere."""
    from train.cli import accept_hyphens, help_lists_flags_of

    _define_flags()
    help_lists_flags_of(__name__)
    app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(accept_hyphens(argv)))


if __name__ == "__main__":
    run()
