"""Folders of images (torchvision's ``ImageFolder`` layout) read with Grain, without TensorFlow.

``--config.dataset=image_folder --config.data_dir=ROOT`` trains on ``ROOT/train/<class>/*`` and
evaluates on ``ROOT/val/<class>/*`` (or ``validation/``, or ``test/``). Files ending in .jpg,
.jpeg, .png, .bmp or .webp (any case) are images; other files and hidden ones are ignored. The
classes are the sub-folder names of ``train/``, sorted, as torchvision numbers them; the val
split must have the same ones. As in torchvision's ``ImageFolder``, a class is every image under
its folder, sub-folders included (``train/cat/2019/*.jpg``), listed in torchvision's order.

Batches are what the TFDS path yields: ``uint8`` pixels (normalised in the jitted step),
``int32`` labels, and ``mask`` for eval. Decoding and augmentation (``image_ops.py``, with the
options of ``augment.py``) run in ``config.grain_worker_count`` Grain worker processes
(``mp_prefetch``; 0 decodes in this process, on Grain's read threads; -1, the default, starts one
per core on hosts of 3 cores or more, and none on smaller ones: ``default_worker_count``).

Order and resume (the project's skip rule, as for the other sources): epoch ``e`` visits the
training files in the permutation drawn from ``(seed, e)``, the same on every host; global
batch ``s`` is positions ``s*B .. (s+1)*B - 1`` of it, and host ``p`` of ``P`` takes the ``p``-th
slice of ``B/P``, so the hosts' shards are disjoint and cover the epoch (less the remainder of
fewer than ``B`` files, dropped). An example's augmentation draws from ``(seed, e, position)``.
Each host's stream is therefore a pure function of ``(seed, epoch)``, and resuming at step ``s``
starts the stream at its ``s``-th batch without reading the ones before; nothing about the
stream needs to be saved in the checkpoint.

A file that cannot be decoded stops the run with one line naming it (``DatasetError``), rather
than being skipped: skipping would change which examples make up every later batch, silently,
and the line tells the user which file to delete or replace; the run then resumes from its last
checkpoint.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from train.data import image_ops
from train.data.augment import AugmentOptions
from train.data.core import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    DatasetError,
    DatasetInfo,
    DataSource,
    decode_reason,
    host_batch_size,
    norm_stats,
    normalize_pixels,
    repeat_position,
)
from train.data.erase import erase_normalised
from train.data.eval_resize import EvalOptions

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TRAIN_DIR = "train"
EVAL_DIRS = ("val", "validation", "test")
# Grain's stream is indexed by position; one index range long enough for any run.
_ENDLESS = 1 << 50


class ImageDecodeError(DatasetError):
    """A file in the folder cannot be decoded; the message names it."""


# ----------------------------------------------------------------------------------------------
# The folder layout.


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)


def _path(path: str):
    from etils import epath

    return epath.Path(path)


def _list_dir(path: str) -> list[tuple[str, bool]]:
    """``(name, is_dir)`` of the non-hidden entries of ``path``, sorted by name."""
    try:
        if "://" in path:
            entries = [(p.name, p.is_dir()) for p in _path(path).iterdir()]
        else:
            with os.scandir(path) as it:
                entries = [(e.name, e.is_dir()) for e in it]
    except OSError as e:
        raise DatasetError(
            f"cannot list the folder {path} ({e.strerror or e}); make it readable, or move it out of "
            "the dataset."
        ) from None
    return sorted(e for e in entries if not e[0].startswith("."))


def _is_dir(path: str) -> bool:
    return _path(path).is_dir() if "://" in path else os.path.isdir(path)


def image_files(folder: str) -> list[str]:
    """The image files in ``folder`` and its sub-folders, at any depth, in torchvision's order:
    by folder path, then by file name (``sorted(os.walk(folder, followlinks=True))``).

    Hidden files and folders are skipped. A folder reached again through a link is read once, so
    a link that loops back ends the walk there instead of repeating its files."""
    found, seen = [], set()

    def visit(d: str) -> None:
        key = d if "://" in d else os.path.realpath(d)
        if key in seen:
            return
        seen.add(key)
        for name, is_dir in _list_dir(d):
            if is_dir:
                visit(_join(d, name))
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((d, name))

    visit(folder)
    return [_join(d, name) for d, name in sorted(found)]


def _class_files(split_dir: str, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = _join(split_dir, name)
        files = image_files(folder)
        if not files:
            raise DatasetError(
                f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); add some or "
                "remove the folder."
            )
        paths += files
        labels += [label] * len(files)
    return paths, labels


def scan(root: str) -> tuple[tuple[str, ...], tuple[list[str], list[int]], tuple[list[str], list[int]], str]:
    """The classes, the (paths, labels) of the training and eval splits, and the eval folder."""
    if not root:
        raise DatasetError(
            "dataset=image_folder needs --config.data_dir=ROOT, a folder with ROOT/train/<class>/* "
            "and ROOT/val/<class>/* images."
        )
    if not _is_dir(root):
        raise DatasetError(f"config.data_dir={root!r} is not a folder; it should hold train/ and val/.")
    train_dir = _join(root, TRAIN_DIR)
    if not _is_dir(train_dir):
        raise DatasetError(
            f"{root} has no train/ folder; the layout is ROOT/train/<class>/* and ROOT/val/<class>/*."
        )
    eval_name = next((d for d in EVAL_DIRS if _is_dir(_join(root, d))), None)
    if eval_name is None:
        raise DatasetError(
            f"{root} has no val/ (or validation/, test/) folder beside train/; put held-out images "
            "in ROOT/val/<class>/*, with the same class folders as train/."
        )
    eval_dir = _join(root, eval_name)
    classes = tuple(name for name, is_dir in _list_dir(train_dir) if is_dir)
    for name in classes:
        # Class names are saved one per line, as UTF-8 text (class_names.txt).
        if name.splitlines() != [name] or name != name.encode("utf-8", "replace").decode("utf-8"):
            raise DatasetError(
                f"the class folder name {name.encode('utf-8', 'surrogateescape')!r} in {train_dir} is "
                "not one line of UTF-8 text, which class names are saved as; rename the folder."
            )
    if not classes:
        raise DatasetError(
            f"{train_dir} has no class folders; put each class's images in its own folder, "
            f"{train_dir}/<class>/*."
        )
    eval_classes = tuple(name for name, is_dir in _list_dir(eval_dir) if is_dir)
    if eval_classes != classes:
        only_train = sorted(set(classes) - set(eval_classes))
        only_eval = sorted(set(eval_classes) - set(classes))
        raise DatasetError(
            f"the class folders of {train_dir} and {eval_dir} differ: only in train/: "
            f"{_names(only_train)}; only in {eval_name}/: {_names(only_eval)}. Both need the same "
            "classes."
        )
    return classes, _class_files(train_dir, classes), _class_files(eval_dir, classes), eval_name


def _names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# ----------------------------------------------------------------------------------------------
# Reading one example (runs in Grain's worker processes).


def read_bytes(path: str) -> bytes:
    """The file's bytes, in one read (for ``gs://``, one request, and the remote file closed)."""
    if "://" in path:
        return _path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def load_example(path: str, fn) -> np.ndarray:
    """``fn(the file's bytes)``, with any failure to read or decode it as one line naming the file."""
    try:
        return fn(read_bytes(path))
    except Exception as e:
        raise ImageDecodeError(
            f"cannot decode {path} ({decode_reason(e)}); delete or replace the file, then rerun to resume."
        ) from None


class _Paths:
    """File paths as one bytes array after their common folder: about 40 bytes per ImageNet file,
    a tenth of a list of str, and cheap to pickle to each worker."""

    def __init__(self, paths: Sequence[str]):
        prefix = os.path.commonprefix(list(paths)) if paths else ""
        self.prefix = prefix[: prefix.rfind("/") + 1]
        # surrogateescape: a local file name that is not UTF-8 comes back as the same bytes.
        self.rest = np.array(
            [p[len(self.prefix) :].encode("utf-8", "surrogateescape") for p in paths], dtype=bytes
        )

    def __len__(self) -> int:
        return len(self.rest)

    def __getitem__(self, i: int) -> str:
        return self.prefix + self.rest[i].decode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Epoch ``epoch``'s visiting order of the training files (the same on every host)."""
    return np.random.default_rng([seed, epoch, 0x1F01]).permutation(num_examples)


class _TrainExample:
    """Host stream position -> one augmented example (picklable for Grain's workers)."""

    def __init__(self, paths, labels, config, per_host, global_batch, process_index, steps_per_epoch, stats):
        self.paths, self.labels = _Paths(paths), np.asarray(labels, np.int32)
        # Only the augmentation options travel to the Grain workers, by the config's names.
        self.options = AugmentOptions.from_config(config)
        self.stats = stats  # (mean, std): random erasing works on the normalised image
        self.size, self.seed = int(config.image_size), int(config.seed)
        self.repeats = float(config.aug_repeats)  # > 1: timm's RepeatAugSampler (repeat_position)
        self.per_host, self.global_batch = per_host, global_batch
        self.process_index, self.steps = process_index, steps_per_epoch

    def position(self, k: int) -> tuple[int, int]:
        """``(epoch, position in the epoch's order)`` of this host's ``k``-th example."""
        epoch, within = divmod(k, self.steps * self.per_host)
        step, slot = divmod(within, self.per_host)
        return epoch, step * self.global_batch + self.process_index * self.per_host + slot

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        epoch, pos = self.position(int(k))
        index = epoch_order(self.seed, epoch, len(self.paths))[repeat_position(pos, self.repeats)]
        rng = np.random.default_rng([self.seed, epoch, pos])
        image = load_example(
            self.paths[index], lambda im: image_ops.train_image(im, rng, self.size, self.options)
        )
        if self.options.random_erase_prob > 0:
            # Normalised float32 from here on: the step takes float batches as normalised.
            image = erase_normalised(image, rng, self.options, *self.stats)
        return {"image": image, "label": self.labels[index]}


class _EvalExample:
    """Host stream position -> one eval example, or padding (``mask`` 0) past the split's end."""

    def __init__(self, paths, labels, options, per_host, global_batch, process_index):
        self.paths, self.labels = _Paths(paths), np.asarray(labels, np.int32)
        self.options, self.size = options, options.size  # EvalOptions: the size is the eval size
        self.per_host, self.global_batch, self.process_index = per_host, global_batch, process_index

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        step, slot = divmod(int(k), self.per_host)
        row = step * self.global_batch + self.process_index * self.per_host + slot
        if row >= len(self.paths):
            zeros = np.zeros((self.size, self.size, 3), np.uint8)
            return {"image": zeros, "label": np.int32(0), "mask": np.float32(0.0)}
        image = load_example(self.paths[row], lambda im: image_ops.eval_image(im, **self.options.kwargs()))
        return {"image": image, "label": self.labels[row], "mask": np.float32(1.0)}


# ----------------------------------------------------------------------------------------------
# Grain.


def _grain():
    import grain
    from absl import flags

    # Grain reads absl flags; outside an absl program (tests, notebooks) take their defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


def host_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(config: Any) -> int:
    """``config.grain_worker_count``; -1 means ``default_worker_count`` of this host's cores."""
    n = int(config.grain_worker_count)
    return default_worker_count(host_cores()) if n < 0 else n


def default_worker_count(cores: int) -> int:
    """The worker processes ``grain_worker_count=-1`` starts on a host with ``cores`` cores: one
    per core from 3 cores on, and none (decoding in the training process, on one Grain read
    thread per core) on one or two cores.

    On one or two cores a worker has no core of its own, and handing its batches across
    processes (a new shared-memory segment per batch) costs more than the GIL does to read
    threads, which release it while decoding and resizing: on 2-core VMs the workers were slower
    than the read threads (BENCHMARKS.md, section 3b). With more cores the GIL's share of each
    image's work (the Python around each example, and the batching) bounds read threads, so
    each core gets a process; where the two cross was not measured (``gpu_suite.sh OUT grain``
    does).
    """
    return cores if cores > 2 else 0


def read_threads(workers: int) -> int:
    """Grain read threads per process: one in each worker process, which has a core to itself
    (a second thread there only competes for that core; BENCHMARKS.md, section 3b); one per core,
    and at least two, where the training process decodes (``workers == 0``)."""
    return 1 if workers > 0 else max(2, host_cores())


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In each Grain worker: exit when the training process is gone (killed with SIGKILL, it
    cannot stop its workers), instead of decoding for nobody. Ctrl-C reaches the workers too (the
    terminal signals its whole process group): they ignore it, and the training process saves,
    then stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_iterators() -> None:
    # Stop the worker processes before the interpreter tears down the modules they use.
    for it in list(_OPEN_ITERATORS):
        try:
            it.close()
        except Exception:
            pass


def _batches(example_fn, start: int, stop: int, per_host: int, workers: int, buffer: int) -> Iterator[Batch]:
    """Batches of ``example_fn(k)`` for host positions ``start .. stop - 1``, decoded by Grain.

    Batched before ``mp_prefetch``, so that each worker makes whole batches and a batch's
    examples do not depend on the worker count (the workers take turns, in order).
    """
    grain = _grain()
    ds = grain.MapDataset.range(start, stop).map(example_fn).batch(per_host, drop_remainder=True)
    threads = read_threads(workers)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads)))
    if workers > 0:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(buffer, 1)),
            worker_init_fn=_exit_with_parent,
        )
    it = iter(it_ds)
    if hasattr(it, "close"):
        _OPEN_ITERATORS.add(it)
    try:
        yield from it
    except ImageDecodeError as e:
        raise DatasetError(str(e)) from None
    finally:
        if hasattr(it, "close"):
            it.close()


class ImageFolderSource(DataSource):
    """``dataset='image_folder'``: ``config.data_dir``'s ``train/<class>/*`` and ``val/<class>/*``."""

    name = "image_folder"
    random_erase = aug_repeats = auto_augment = True

    def __init__(self, config: Any):
        root = str(config.data_dir or "")
        root = root if "://" in root else os.path.expanduser(root)
        classes, (self.train_paths, self.train_labels), (self.eval_paths, self.eval_labels), _ = scan(root)
        mean, std = norm_stats(config, 3, (IMAGENET_MEAN, IMAGENET_STD))
        size = int(config.image_size)
        self.info = DatasetInfo(
            name=self.name,
            num_classes=len(classes),
            image_shape=(size, size, 3),
            num_train_examples=len(self.train_paths),
            num_eval_examples=len(self.eval_paths),
            class_names=classes,
            mean=mean,
            std=std,
        )

    @staticmethod
    def load_image(path: str, info: DatasetInfo, options: EvalOptions) -> np.ndarray:
        """An image file with this run's (Pillow) eval preprocessing, without TensorFlow."""
        pixels = load_example(path, lambda im: image_ops.eval_image(im, **options.kwargs()))
        return normalize_pixels(pixels, info)

    @staticmethod
    def load_array(pixels: np.ndarray, info: DatasetInfo, options: EvalOptions) -> np.ndarray:
        """Raw pixels with this run's NumPy/Pillow eval preprocessing: normalised float32."""
        return normalize_pixels(image_ops.eval_array(pixels, **options.kwargs()), info)

    def steps_per_epoch(self, global_batch: int, process_count: int) -> int:
        return len(self.train_paths) // global_batch

    def train_batches(self, config, global_batch, start_step, process_index, process_count):
        """This host's endless stream of augmented training batches, from ``start_step`` on.

        Args:
            config: The run's config (augmentation fields, Grain workers and buffer, seed).
            global_batch: Examples per step over all hosts.
            start_step: The first step to yield (a resumed run continues its stream exactly).
            process_index: This host's index; it gets its slice of each global batch.
            process_count: Number of hosts.
        """
        per_host = host_batch_size(global_batch, process_count)
        steps = self.steps_per_epoch(global_batch, process_count)
        if steps < 1:
            raise DatasetError(
                f"{len(self.train_paths)} training images are fewer than one batch of {global_batch}; "
                "lower config.batch_size."
            )
        fn = _TrainExample(
            self.train_paths,
            self.train_labels,
            config,
            per_host,
            global_batch,
            process_index,
            steps,
            (self.info.mean, self.info.std),
        )
        start = start_step * per_host
        return _batches(
            fn,
            start,
            start + _ENDLESS,
            per_host,
            worker_count(config),
            config.grain_worker_buffer_size,
        )

    def eval_batches(self, config, global_batch, process_index, process_count):
        """This host's slice of one pass over the eval split; the last batch is padded, with
        ``mask`` 0 on the padding.

        Args:
            config: The run's config (the eval size and resize, Grain workers and buffer).
            global_batch: Examples per step over all hosts.
            process_index: This host's index.
            process_count: Number of hosts.
        """
        per_host = host_batch_size(global_batch, process_count)
        steps = -(-len(self.eval_paths) // global_batch)
        fn = _EvalExample(
            self.eval_paths,
            self.eval_labels,
            EvalOptions.from_config(config, self.info.image_shape[0]),
            per_host,
            global_batch,
            process_index,
        )
        return _batches(
            fn, 0, steps * per_host, per_host, worker_count(config), config.grain_worker_buffer_size
        )
