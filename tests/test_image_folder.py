"""dataset='image_folder': folders of images read with Grain and Pillow, without TensorFlow.

The tests write their own folders: scikit-learn's digits as PNG, JPEG, BMP and WebP files (RGB,
grayscale, RGBA, palette) in class folders named by the digits' English names, so the sorted
class order differs from the digit order. Training runs use the tiny configs of the other
training tests.
"""

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from train_worker import tiny_config  # noqa: E402

from train import checkpoint, loop  # noqa: E402
from train.class_names import load_class_names, read_class_names  # noqa: E402
from train.config import default_config  # noqa: E402
from train.data import core, image_folder, image_ops, registry, tf_ops  # noqa: E402
from train.data.core import DatasetError  # noqa: E402
from train.data.image_folder import scan  # noqa: E402

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SORTED = tuple(sorted(NAMES))


def _digits():
    src = registry.create_dataset(tiny_config()).source
    pixels = lambda x: np.round(x[..., 0]).astype(np.uint8)  # noqa: E731
    return pixels(src.x_train), src.y_train, pixels(src.x_eval), src.y_eval


def _save(array: np.ndarray, path_stem: Path, i: int) -> Path:
    """One digit in a format and mode chosen by ``i``; returns the file written."""
    kind = i % 8
    rgb = Image.fromarray(array).convert("RGB")
    if kind in (0, 1, 2):
        path = path_stem.with_suffix(".png")
        rgb.save(path)
    elif kind in (3, 4):
        path = path_stem.with_suffix(".jpg")
        rgb.save(path, quality=95)
    elif kind == 5:
        path = path_stem.with_suffix(".png")
        Image.fromarray(array).save(path)  # grayscale (mode L)
    elif kind == 6:
        path = path_stem.with_suffix(".png")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(path)
    else:
        path = path_stem.with_suffix(".bmp" if i % 16 == 7 else ".webp")
        if path.suffix == ".webp":
            rgb.save(path, lossless=True)
        else:
            rgb.convert("P").save(path)  # palette
    return path


def write_digits_folder(root: Path) -> dict[str, list[tuple[Path, int, np.ndarray]]]:
    """ROOT/train/<name>/*, ROOT/val/<name>/* of the digits; returns (file, digit, pixels)."""
    x_train, y_train, x_eval, y_eval = _digits()
    written = {}
    for split, xs, ys in (("train", x_train, y_train), ("val", x_eval, y_eval)):
        written[split] = []
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / NAMES[y]
            folder.mkdir(parents=True, exist_ok=True)
            written[split].append((_save(x, folder / f"{i:04d}", i), int(y), x))
    (root / "train" / "zero" / "notes.txt").write_text("not an image: ignored")
    return written


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_folder")
    return root, write_digits_folder(root)


def folder_config(root, **kw):
    return tiny_config(dataset="image_folder", data_dir=str(root), grain_worker_count=0, **kw)


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    return env


# Runs a module as `python -m MODULE ARGS` and reports at exit whether TensorFlow was imported.
_NO_TF_WRAPPER = """
import atexit, runpy, sys
sys.path.insert(0, {repo!r})
atexit.register(lambda: print("TENSORFLOW_IMPORTED=" + str("tensorflow" in sys.modules), file=sys.stderr))
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _cli(module: str, *args) -> list[str]:
    return [sys.executable, "-c", _NO_TF_WRAPPER.format(repo=str(REPO)), module, *map(str, args)]


def _train_cmd(root, workdir, *extra) -> list[str]:
    return _cli(
        "train",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        "--config.dataset=image_folder",
        f"--config.data_dir={root}",
        "--config.num_train_steps=30",
        "--config.model.overrides.stage_sizes=(1,)",
        "--config.rng_impl=rbg",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=7",
        "--config.eval_every_steps=-1",
        "--config.eval_at_end=False",
        "--config.progress_bar=False",
        *extra,
    )


def _run(cmd, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=_env(), timeout=timeout)


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("TENSORFLOW_IMPORTED")]
    assert lines[-1].startswith("error: "), result.stderr[-3000:]
    return lines[-1]


# ----------------------------------------------------------------------------------------------
# The folder as a dataset.


def test_classes_are_sorted_folder_names_and_eval_pixels_are_the_files(digits_root):
    root, written = digits_root
    ds = registry.create_dataset(folder_config(root))
    assert ds.info.class_names == SORTED and ds.info.num_classes == 10
    assert (ds.info.num_train_examples, ds.info.num_eval_examples) == (1437, 360)
    assert ds.info.image_shape == (8, 8, 3)
    # The eval split in file order (class folders sorted, then file names): every row is its
    # file's pixels decoded to RGB, whatever the file's mode, with its label: an RGB or
    # grayscale JPEG as TF decodes it (the TFDS path's fast IDCT), anything else as Pillow does;
    # the lossless RGB and grayscale PNGs are the digits themselves.
    tf = pytest.importorskip("tensorflow")
    expected = sorted(written["val"], key=lambda t: (SORTED.index(NAMES[t[1]]), t[0].name))
    batches = list(ds.eval_iterator(64))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert images.dtype == np.uint8 and len(images) == 384 and mask.sum() == 360 and not mask[360:].any()
    for (path, digit, x), image, label in zip(expected, images, labels):
        assert SORTED[label] == NAMES[digit]
        with Image.open(path) as f:
            if f.format == "JPEG" and f.mode in ("RGB", "L"):
                want = tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False).numpy()
            else:
                want = np.asarray(f.convert("RGB"))
            np.testing.assert_array_equal(image, want, err_msg=str(path))
            if f.mode in ("RGB", "L") and path.suffix == ".png":
                np.testing.assert_array_equal(image, np.repeat(x[..., None], 3, -1), err_msg=str(path))


def test_order_is_a_function_of_seed_and_epoch_and_resume_skips_exactly(digits_root):
    root, _ = digits_root
    config = folder_config(root)
    ds = registry.create_dataset(config)
    spe = ds.steps_per_epoch(64)
    assert spe == 1437 // 64
    it = ds.train_iterator(64)
    stream = [next(it) for _ in range(spe + 3)]
    again = registry.create_dataset(config).train_iterator(64, start_step=spe - 2)
    for want in stream[spe - 2 :]:  # resumed across the epoch boundary: the same batches
        got = next(again)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    # Epoch 1 visits the files in another order; another seed changes epoch 0.
    first = lambda b: tuple(b["label"])  # noqa: E731
    assert first(stream[spe]) != first(stream[0])
    other = registry.create_dataset(folder_config(root, seed=1)).train_iterator(64)
    assert first(next(other)) != first(stream[0])
    # Each epoch visits every class in proportion: the labels of an epoch are the files' labels.
    epoch0 = np.concatenate([b["label"] for b in stream[:spe]])
    counts = np.bincount(epoch0, minlength=10)
    _, y_train, _, _ = _digits()
    full = np.bincount([SORTED.index(NAMES[y]) for y in y_train], minlength=10)
    assert np.all(counts <= full) and full.sum() - counts.sum() == 1437 - spe * 64


def _indexed_folder(root: Path, n: int = 45) -> Path:
    """``n`` constant-colour 4x4 PNGs whose value (5 x index) identifies them, in 3 classes."""
    for split, count in (("train", n), ("val", 6)):
        for i in range(count):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), 5 * i, np.uint8)).save(folder / f"{i:03d}.png")
    return root


def test_two_hosts_read_disjoint_shards_that_cover_the_epoch(tmp_path):
    root = _indexed_folder(tmp_path / "indexed")
    config = folder_config(root, image_size=4, train_augment="none")
    ds = registry.create_dataset(config)
    spe = ds.steps_per_epoch(8, 2)
    assert spe == 45 // 8

    def ids(batch):
        return list(batch["image"][:, 0, 0, 0] // 5)

    hosts = []
    for p in range(2):
        it = ds.train_iterator(8, process_index=p, process_count=2)
        hosts.append([ids(next(it)) for _ in range(spe)])
    single = ds.train_iterator(8)
    for step in range(spe):
        # Host 0 and host 1 hold the two halves of the global batch one process would read.
        assert hosts[0][step] + hosts[1][step] == ids(next(single))
    seen = [i for host in hosts for batch in host for i in batch]
    assert len(seen) == len(set(seen)) == spe * 8  # disjoint; the epoch less its remainder
    assert set(seen) <= set(range(45))
    # Evaluation: every held-out file exactly once over both hosts; padding rows are masked.
    evaluated = []
    for p in range(2):
        for batch in ds.eval_iterator(4, process_index=p, process_count=2):
            evaluated += [i for i, m in zip(ids(batch), batch["mask"]) if m]
    assert sorted(evaluated) == list(range(6))


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line each.


def _tree(root: Path, files: dict[str, bytes | None]) -> Path:
    for rel, data in files.items():
        path = root / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def _png(value: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "files, words",
    [
        (None, ["is not a folder", "train/ and val/"]),
        ({"val/a/x.png": _png()}, ["has no train/ folder", "ROOT/train/<class>/*"]),
        ({"train/a/x.png": _png()}, ["has no val/ (or validation/, test/) folder"]),
        ({"train/readme.txt": b"x", "val/a/x.png": _png()}, ["has no class folders", "<class>/*"]),
        (
            {
                "train/a/x.png": _png(),
                "train/b/notes.txt": b"x",
                "val/a/x.png": _png(),
                "val/b/y.png": _png(),
            },
            ["class folder", "train/b has no images", "add some or remove the folder"],
        ),
        (
            {"train/a/x.png": _png(), "train/b/x.png": _png(), "val/a/x.png": _png(), "val/c/y.png": _png()},
            ["class folders of", "differ", "only in train/: b", "only in val/: c"],
        ),
    ],
    ids=["missing_root", "no_train", "no_val", "no_class_folders", "empty_class", "classes_differ"],
)
def test_bad_folders_name_the_problem(tmp_path, files, words):
    root = tmp_path / "root"
    if files is not None:
        _tree(root, files)
    with pytest.raises(DatasetError) as e:
        registry.create_dataset(folder_config(root))
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_an_unreadable_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    # The tests run as root here, which reads any folder, so the OS's refusal is simulated.
    root = _tree(
        tmp_path / "root", {"train/a/x.png": _png(), "train/a/locked/y.png": _png(), "val/a/z.png": _png()}
    )
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError) as e:
        scan(str(root))
    message = str(e.value)
    assert "\n" not in message
    for w in ("cannot list the folder", "train/a/locked", "Permission denied", "make it readable"):
        assert w in message, message


def test_file_names_that_are_not_utf8_are_read_and_class_names_must_be_one_line_of_text(tmp_path):
    root = _tree(tmp_path / "root", {"train/a/ok.png": _png(1), "val/a/v.png": _png(3)})
    try:  # a name in Latin-1, as old archives hold them
        with open(os.path.join(os.fsencode(root / "train/a"), b"caf\xe9.png"), "wb") as f:
            f.write(_png(2))
    except OSError:  # pragma: no cover - file systems that only store UTF-8 names
        pytest.skip("this file system refuses a file name that is not UTF-8")
    classes, (paths, _), _, _ = scan(str(root))
    assert [os.fsencode(p)[-8:] for p in paths] == [b"caf\xe9.png", b"a/ok.png"]
    ds = registry.create_dataset(folder_config(root, image_size=4, train_augment="none", random_flip=False))
    (train,) = [b["image"] for b in itertools.islice(ds.train_iterator(2), 1)]
    assert sorted(train[:, 0, 0, 0]) == [1, 2]
    # Class names are saved one per line: a folder name that is not one line of text is refused.
    for bad in (b"caf\xe9", b"two\nlines"):
        os.mkdir(os.path.join(os.fsencode(root / "train"), bad))
        with pytest.raises(DatasetError) as e:
            scan(str(root))
        assert "\n" not in str(e.value) and "rename the folder" in str(e.value) and repr(bad) in str(e.value)
        os.rmdir(os.path.join(os.fsencode(root / "train"), bad))


def test_eval_split_may_be_called_validation_or_test(tmp_path):
    for name in ("validation", "test"):
        root = _tree(
            tmp_path / name,
            {
                "train/a/x.png": _png(),
                "train/b/y.png": _png(),
                f"{name}/a/z.PNG": _png(),
                f"{name}/b/w.jpeg": _png(),
            },
        )
        classes, train, evals, eval_name = scan(str(root))
        assert classes == ("a", "b") and eval_name == name and evals[1] == [0, 1]


def test_class_folders_are_read_at_any_depth_in_torchvisions_order(tmp_path):
    """As torchvision's ImageFolder: every image under a class folder, sub-folders included,
    sorted by folder path and then name (so ``a/sub b`` comes before ``a/sub/deeper``: ' ' < '/').
    Hidden files and folders are skipped, and a link looping back is not followed around."""
    root = _tree(
        tmp_path / "root",
        {
            "train/a/x1.png": _png(1),
            "train/a/sub/y.png": _png(2),
            "train/a/sub b/w.png": _png(3),
            "train/a/sub/deeper/z.JPG": _png(4),
            "train/a/notes.txt": b"not an image",
            "train/a/.hidden/h.png": _png(5),
            "train/b/only/nested/q.webp": _png(6),
            "val/a/v.png": _png(7),
            "val/b/2019/v.png": _png(8),
        },
    )
    want = ["a/x1.png", "a/sub/y.png", "a/sub b/w.png", "a/sub/deeper/z.JPG", "b/only/nested/q.webp"]
    # torchvision's rule (datasets.folder.make_dataset), written out: sorted(os.walk(...)).
    rule = [
        os.path.relpath(os.path.join(d, f), root / "train")
        for c in ("a", "b")
        for d, _, files in sorted(os.walk(root / "train" / c, followlinks=True))
        for f in sorted(files)
        if f.lower().endswith((".png", ".jpg", ".webp")) and ".hidden" not in d
    ]
    assert rule == want
    (root / "train/a/sub/loop").symlink_to(root / "train/a", target_is_directory=True)
    classes, (paths, labels), (eval_paths, eval_labels), _ = scan(str(root))
    assert classes == ("a", "b")
    assert [os.path.relpath(p, root / "train") for p in paths] == want
    assert labels == [0, 0, 0, 0, 1] and eval_labels == [0, 1]
    assert eval_paths[1] == str(root / "val/b/2019/v.png")
    # The nested files are what the batches hold: each file is one flat value written above.
    ds = registry.create_dataset(folder_config(root, image_size=4, train_augment="none", random_flip=False))
    (train,) = [b["image"] for b in itertools.islice(ds.train_iterator(5), 1)]
    assert sorted(train[:, 0, 0, 0]) == [1, 2, 3, 4, 6] and (train == train[:, :1, :1, :1]).all()
    (evals,) = [b["image"] for b in ds.eval_iterator(2)]
    assert list(evals[:, 0, 0, 0]) == [7, 8] and (evals == evals[:, :1, :1, :1]).all()


def test_corrupt_file_stops_naming_it(tmp_path):
    root = _indexed_folder(tmp_path / "corrupt", n=12)
    bad = root / "train" / "c1" / "004.png"
    bad.write_bytes(_png()[:40])  # truncated
    ds = registry.create_dataset(folder_config(root, image_size=4, train_augment="none"))
    with pytest.raises(DatasetError, match=f"cannot decode {bad} .*delete or replace the file") as info:
        for _ in ds.train_iterator(12):
            pass
    assert "_io." not in str(info.value), str(info.value)  # not Pillow's name for its buffer


def test_bad_input_on_the_command_line_is_one_line_without_traceback(tmp_path):
    """The CLI, with Grain worker processes: the error raised in a worker reaches the user as one line."""
    corrupt = _indexed_folder(tmp_path / "corrupt", n=40)
    bad = corrupt / "train" / "c2" / "008.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    no_train = _tree(tmp_path / "no_train", {"val/a/x.png": _png()})
    procs = {
        "corrupt": subprocess.Popen(
            _train_cmd(
                corrupt,
                tmp_path / "w1",
                "--config.grain_worker_count=1",
                "--config.image_size=4",
                "--config.train_augment=none",
                "--config.batch_size=40",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            env=_env(),
        ),
        "no_train": subprocess.Popen(
            _train_cmd(no_train, tmp_path / "w2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            env=_env(),
        ),
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = _one_line_error(results["corrupt"])
    assert f"cannot decode {bad}" in line and "delete or replace the file" in line, line
    line = _one_line_error(results["no_train"])
    assert "has no train/ folder" in line, line
    assert not list((tmp_path / "w1").glob("checkpoints/*/"))  # nothing trained on a bad stream


# ----------------------------------------------------------------------------------------------
# Decoding and preprocessing.


def test_image_modes_become_rgb_and_exif_orientation_is_applied(tmp_path):
    import io

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    gray = np.asarray(image.convert("L"))
    cases = {
        "L": (image.convert("L"), np.repeat(gray[..., None], 3, -1)),
        "RGBA": (image.convert("RGBA"), rgb),
        "P": (image.quantize(16), np.asarray(image.quantize(16).convert("RGB"))),
        "CMYK": (image.convert("CMYK"), np.asarray(image.convert("CMYK").convert("RGB"))),
    }
    for mode, (img, want) in cases.items():
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
        buf.seek(0)
        got = image_ops.to_rgb(image_ops.open_image(buf))
        assert got.mode == "RGB", mode
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=mode)
    # A CMYK JPEG (as print workflows write them) decodes to RGB too.
    buf = io.BytesIO()
    image.convert("CMYK").save(buf, format="JPEG", quality=95)
    assert np.asarray(image_ops.to_rgb(image_ops.open_image(buf))).shape == (6, 10, 3)
    # EXIF orientation 6 (the camera was turned): the upright image is the stored one turned
    # 90 degrees clockwise, and it is what the pipeline sees.
    exif = Image.Exif()
    exif[image_ops.EXIF_ORIENTATION] = 6
    path = tmp_path / "turned.png"
    image.save(path, exif=exif)
    opened = image_ops.open_image(path)
    assert image_ops.upright_size(opened) == (10, 6)
    np.testing.assert_array_equal(np.asarray(image_ops.to_rgb(opened)), np.rot90(rgb, k=-1))
    eval_pixels = image_ops.eval_image(image_ops.open_image(path), 6, 1.0)
    assert eval_pixels.shape == (6, 6, 3)


def test_16_bit_pngs_keep_the_high_byte_as_tensorflow_decodes_them(tmp_path):
    """Pillow opens a 16-bit grayscale PNG as mode I;16, whose convert("RGB") clips everything
    above 255 to white; the pipeline keeps the high byte, which is what TF's decode_png gives."""
    rng = np.random.default_rng(4)
    gray = rng.integers(0, 1 << 16, (9, 11), dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I")  # what makes the case: not L
    want = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, -1)
    np.testing.assert_array_equal(np.asarray(image_ops.to_rgb(image_ops.open_image(path))), want)
    np.testing.assert_array_equal(
        image_ops.eval_image(image_ops.open_image(path), 11, 1.0),
        np.asarray(Image.fromarray(want).resize((11, 11), Image.BILINEAR, reducing_gap=None)),
    )
    # Every 16-bit PNG kind (gray, gray+alpha, RGB, RGBA), written and decoded by TensorFlow.
    tf = pytest.importorskip("tensorflow")
    for channels in (1, 2, 3, 4):
        data = tf.io.encode_png(rng.integers(0, 1 << 16, (9, 11, channels), dtype=np.uint16)).numpy()
        path = tmp_path / f"c{channels}.png"
        path.write_bytes(data)
        tf_pixels = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        got = np.asarray(image_ops.to_rgb(image_ops.open_image(path)))
        np.testing.assert_array_equal(got, tf_pixels, err_msg=f"{channels} channels")


def _jpeg_kinds(tmp_path: Path) -> dict[str, tuple[Path, bool]]:
    """JPEG files of every kind a folder may hold -> (file, whether simplejpeg should decode it)."""
    rng = np.random.default_rng(3)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).resize((97, 83), Image.BICUBIC)
    noisy = Image.fromarray(
        np.clip(np.asarray(smooth) + rng.normal(0, 25, (83, 97, 3)), 0, 255).astype(np.uint8)
    )
    exif = Image.Exif()
    exif[image_ops.EXIF_ORIENTATION] = 6
    kinds = {
        "420": ({"subsampling": 2}, noisy, True),
        "422": ({"subsampling": 1}, noisy, True),
        "444": ({"subsampling": 0}, noisy, True),
        "progressive": ({"progressive": True}, noisy, True),
        "restart_markers": ({"restart_marker_blocks": 2}, noisy, True),
        "grayscale": ({}, noisy.convert("L"), True),
        "cmyk": ({}, noisy.convert("CMYK"), False),
        "exif_turned": ({"exif": exif}, noisy, False),
    }
    out = {}
    for name, (kw, image, fast) in kinds.items():
        path = tmp_path / f"{name}.jpg"
        image.save(path, quality=90, **kw)
        out[name] = (path, fast)
    return out


def test_jpegs_decode_to_the_tensorflow_paths_pixels(tmp_path, monkeypatch):
    """With simplejpeg, every JPEG it takes decodes to TF's default decode bit for bit (the whole
    image; a training box as ``decode_and_crop_jpeg`` cuts it but for its edge columns), so train
    crops are TF's within the rounding of the 8-bit resize, eval images within the eval test's.
    Pillow (no simplejpeg, or CMYK / EXIF-rotated files) uses the accurate IDCT: a few levels
    off TF's decode, and the same pixels with or without simplejpeg for the files it gets."""
    pytest.importorskip("simplejpeg")
    tf = pytest.importorskip("tensorflow")
    config = default_config()
    config.update(train_augment="inception_crop", random_flip=True, crop_area_range=(0.3, 1.0))
    info = core.DatasetInfo("t", 3, (24, 24, 3), 0, 0, (), core.IMAGENET_MEAN, core.IMAGENET_STD)
    files = _jpeg_kinds(tmp_path)
    results, flips = {}, []
    for use_simplejpeg in (True, False):
        if not use_simplejpeg:
            monkeypatch.setattr(image_ops, "simplejpeg", None)
        for name, (path, fast) in files.items():
            data = path.read_bytes()
            decoded = image_ops.jpeg_pixels(image_ops.open_image(path))
            assert (decoded is not None) == (fast and use_simplejpeg), name
            if decoded is not None:  # TF's reference, once per file
                tf_pixels = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
                with Image.open(path) as f:
                    pillow = np.asarray(f.convert("RGB")).astype(int)
                # Pillow's accurate IDCT is a few levels off TF's fast one (the check has power).
                assert 0 < np.abs(pillow - tf_pixels).max() <= 8, name
                # The whole image: TF's decode, bit for bit.
                np.testing.assert_array_equal(decoded, tf_pixels, err_msg=name)
            for i in range(4):
                rng = np.random.default_rng([i, 5])
                got = image_ops.train_image(image_ops.open_image(path), rng, 24, config)
                results[use_simplejpeg, name, "train", i] = got
                if decoded is not None:
                    height, width = image_ops.upright_size(image_ops.open_image(path))
                    draws = np.random.default_rng([i, 5])  # train_image's draws: box, then flip
                    top, left, ch, cw = image_ops.sample_crop(
                        draws, height, width, tuple(config.crop_area_range)
                    )
                    flips.append(draws.random() < 0.5)
                    crop = tf.io.decode_and_crop_jpeg(data, [top, left, ch, cw], channels=3).numpy()
                    ours = decoded[top : top + ch, left : left + cw]
                    # libjpeg's cropped decode upsamples the chroma as if the crop's left and
                    # right edges were the image's: TF's own crop differs from its whole
                    # decode in the two outermost columns of a chroma-subsampled JPEG.
                    np.testing.assert_array_equal(ours[:, 2:-2], crop[:, 2:-2], err_msg=name)
                    if name in ("444", "grayscale"):
                        np.testing.assert_array_equal(ours, crop, err_msg=name)
                    box = tf_pixels[top : top + ch, left : left + cw].astype(np.float32)
                    want = tf.image.resize(box, [24, 24], antialias=True)
                    want = tf.cast(tf.round(want), tf.uint8).numpy()
                    want = want[:, ::-1] if flips[-1] else want
                    diff = np.abs(got.astype(int) - want.astype(int))
                    assert diff.max() <= 1, (name, i)
            got = image_ops.eval_image(image_ops.open_image(path), 24, 0.875)
            results[use_simplejpeg, name, "eval"] = got
            if fast and use_simplejpeg:
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
                want = tf_ops.preprocess_eval_image(image, info, 0.875).numpy()
                diff = np.abs(got.astype(int) - want.astype(int))
                assert diff.max() <= 1 and diff.mean() < 0.3, name
    assert any(flips) and not all(flips)
    keys = [k[1:] for k in results if k[0]]
    assert len(keys) == len(files) * 5
    for key in keys:
        fast, pillow = results[(True, *key)], results[(False, *key)]
        assert fast.shape == (24, 24, 3) and fast.dtype == np.uint8, key
        if not files[key[0]][1]:  # Pillow decodes it either way: the same bytes
            np.testing.assert_array_equal(fast, pillow, err_msg=str(key))
    # A JPEG that libjpeg reads only with a warning (its last bytes cut off) is left to Pillow,
    # which stops on it as before, naming the file.
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(files["420"][0].read_bytes()[:-200])
    monkeypatch.undo()
    assert image_ops.jpeg_pixels(image_ops.open_image(cut)) is None
    with pytest.raises(OSError, match="truncated"):
        image_ops.train_image(image_ops.open_image(cut), np.random.default_rng(0), 24, config)


def test_jpeg_bytes_skip_pillows_open_and_give_the_same_crops(tmp_path, monkeypatch):
    """``train_image`` of a file's bytes decodes a plain JPEG with simplejpeg, without Pillow
    opening it (``jpeg_size``); every crop is the one made through Pillow's ``open``. A JPEG with
    an APP1 segment (EXIF or XMP: Pillow applies an orientation from either) goes to Pillow."""
    pytest.importorskip("simplejpeg")
    config = default_config()
    config.update(train_augment="inception_crop", random_flip=True, crop_area_range=(0.3, 1.0))
    files = {name: path for name, (path, _) in _jpeg_kinds(tmp_path).items()}
    noisy = Image.open(files["444"]).convert("RGB")
    exif = Image.Exif()
    exif[image_ops.EXIF_ORIENTATION] = 1
    noisy.save(tmp_path / "exif_upright.jpg", quality=90, exif=exif)
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
        b'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
        b"</rdf:RDF></x:xmpmeta>"
    )
    noisy.save(tmp_path / "xmp_turned.jpg", quality=90, xmp=xmp)
    files.update(exif_upright=tmp_path / "exif_upright.jpg", xmp_turned=tmp_path / "xmp_turned.jpg")
    (tmp_path / "truncated.jpg").write_bytes(files["420"].read_bytes()[:-400])
    files["truncated"] = tmp_path / "truncated.jpg"
    fast = {"420", "422", "444", "progressive", "restart_markers", "grayscale", "truncated"}
    for name, path in files.items():
        data = path.read_bytes()
        with Image.open(path) as f:
            size = f.size[::-1]
            if name == "xmp_turned":
                assert image_ops.upright_size(f) == size[::-1]  # Pillow turns it: the case has power
        assert image_ops.jpeg_size(data) == (size if name in fast else None), name
        for i in range(4):
            try:
                want = image_ops.train_image(
                    image_ops.open_image(path), np.random.default_rng([i, 5]), 24, config
                )
            except OSError as e:  # only the truncated file: the same error either way
                with pytest.raises(type(e), match=re.escape(str(e))):
                    image_ops.train_image(data, np.random.default_rng([i, 5]), 24, config)
                continue
            got = image_ops.train_image(data, np.random.default_rng([i, 5]), 24, config)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {i}")
    # Not a JPEG, or no simplejpeg: Pillow opens it. So does a JPEG above Pillow's pixel limit,
    # which Pillow refuses as a possible decompression bomb (here the limit is lowered).
    assert image_ops.jpeg_size(_png()) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 97 * 83 // 2 - 1)
    assert image_ops.jpeg_size(files["420"].read_bytes()) is None
    with pytest.raises(Image.DecompressionBombError):
        image_ops.train_image(files["420"].read_bytes(), np.random.default_rng(0), 24, config)
    monkeypatch.setattr(image_ops, "simplejpeg", None)
    assert image_ops.jpeg_size(files["420"].read_bytes()) is None


def test_pillow_preprocessing_matches_the_tensorflow_path():
    """Eval: the same pixels within the rounding of Pillow's 8-bit resize. Train: the same
    distribution of crop scale, aspect ratio and position (two-sample Kolmogorov-Smirnov)."""
    tf = pytest.importorskip("tensorflow")
    from scipy import stats

    info = core.DatasetInfo("t", 3, (32, 32, 3), 0, 0, (), core.IMAGENET_MEAN, core.IMAGENET_STD)
    rng = np.random.default_rng(0)
    for h, w in ((37, 53), (120, 90), (16, 20), (300, 451)):
        smooth = np.asarray(
            Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        )
        pixels = np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        for fraction in (0.875, 1.0):
            want = tf_ops.preprocess_eval_image(tf.constant(pixels), info, fraction).numpy()
            got = image_ops.eval_image(Image.fromarray(pixels), 32, fraction)
            diff = np.abs(got.astype(int) - want.astype(int))
            assert got.shape == want.shape and diff.max() <= 1 and diff.mean() < 0.3, (h, w, fraction)

        # A raw array (train.predict's .npy input), whole or fractional values: TF's float
        # resize, within float32 rounding (no 8-bit rounding on either side).
        offsets = np.random.default_rng([h, w]).uniform(-0.5, 0.5, pixels.shape)  # own draws
        array = pixels.astype(np.float32) + offsets.astype(np.float32)
        for fraction in (0.875, 1.0):
            want = tf_ops.preprocess_eval_image(array, info, fraction, to_uint8=False).numpy()
            got = image_ops.eval_array(array, 32, fraction)
            assert got.dtype == np.float32 and got.shape == want.shape, (h, w, fraction)
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3, err_msg=str((h, w, fraction)))

    # A training crop: the same box cut and resized by TF (slice, antialiased bilinear resize,
    # round) and by Pillow (resize with the box) gives the same pixels within rounding.
    no_flip = default_config()
    no_flip.update(train_augment="inception_crop", random_flip=False)
    for i in range(4):
        top, left, ch, cw = image_ops.sample_crop(np.random.default_rng([i, 2]), *pixels.shape[:2])
        crop = tf.constant(pixels[top : top + ch, left : left + cw], tf.float32)
        want = tf.cast(tf.round(tf.image.resize(crop, [32, 32], antialias=True)), tf.uint8).numpy()
        got = image_ops.train_image(Image.fromarray(pixels), np.random.default_rng([i, 2]), 32, no_flip)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (top, left, ch, cw)

    box = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    n = 600
    for h, w, area in ((300, 451, (0.08, 1.0)), (64, 40, (0.25, 0.5))):
        theirs = []
        for i in range(n):
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                [h, w, 3],
                box,
                seed=[i, 1],
                min_object_covered=0.1,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=area,
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            theirs.append((int(begin[0]), int(begin[1]), int(size[0]), int(size[1])))
        ours = [image_ops.sample_crop(np.random.default_rng([i, 1]), h, w, area) for i in range(n)]
        theirs, ours = np.array(theirs), np.array(ours)
        for name, f in (
            ("scale", lambda c, h=h, w=w: c[:, 2] * c[:, 3] / (h * w)),
            ("aspect", lambda c: c[:, 3] / c[:, 2]),
            ("top", lambda c, h=h: c[:, 0] / h),
            ("left", lambda c, w=w: c[:, 1] / w),
        ):
            assert stats.ks_2samp(f(theirs), f(ours)).pvalue > 0.01, (h, w, name)
        if (h, w) == (300, 451):
            # The check has power: torchvision's rule (area uniform) fails it.
            area_u = rng.uniform(0.08, 1.0, n)
            assert stats.ks_2samp(area_u, theirs[:, 2] * theirs[:, 3] / (h * w)).pvalue < 1e-6


# ----------------------------------------------------------------------------------------------
# Training on it.


def test_digits_folder_trains_as_well_as_the_embedded_digits(digits_root, tmp_path):
    """The same recipe (the tiny model of the training tests, 180 steps: 4 epochs) on the
    in-memory digits and on their files reaches the same held-out accuracy within noise: on 360
    examples one standard error is about 1.3 points at 93%. (The digits default, a larger model
    for 30 epochs, reaches about 98%; too long for a test.)"""
    root, _ = digits_root
    kw = dict(num_train_steps=180, eval_every_steps=-1, save_checkpoints=False, learning_rate=0.1)
    memory = loop.train_and_evaluate(tiny_config(**kw), str(tmp_path / "memory"))["eval"]
    folder = loop.train_and_evaluate(folder_config(root, **kw), str(tmp_path / "folder"))["eval"]
    assert folder["num_examples"] == memory["num_examples"] == 360
    assert memory["accuracy"] > 0.9 and folder["accuracy"] > 0.9, (memory, folder)
    assert abs(folder["accuracy"] - memory["accuracy"]) < 0.04, (memory, folder)
    assert load_class_names(str(tmp_path / "folder")) == SORTED


def _start(cmd) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=_env()
    )


def _last_logged_step(workdir) -> int:
    from train.metrics import read_metrics

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return max((r["step"] for r in read_metrics(path) if "loss" in r), default=0)


def test_sigkill_mid_epoch_resumes_bitwise_and_nothing_imports_tensorflow(digits_root, tmp_path):
    """Reference with 2 Grain workers, the killed run with 1, its resumption with none: the
    same parameters, bit for bit. Then predict prints class names and export writes them beside
    the weights."""
    root, written = digits_root
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref = _start(_train_cmd(root, reference, "--config.grain_worker_count=2"))
    proc = _start(
        _train_cmd(root, killed, "--config.grain_worker_count=1", "--config.debug_step_delay_s=0.1")
    )
    try:
        deadline = time.monotonic() + 180
        while _last_logged_step(killed) < 16:  # past the checkpoint at 14; an epoch is 22 steps
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        out, err = ref.communicate(timeout=240)
    finally:
        for p in (ref, proc):
            if p.poll() is None:
                p.kill()
    assert ref.returncode == 0, err[-3000:]
    assert "TENSORFLOW_IMPORTED=False" in err
    assert 30 not in checkpoint.Checkpointer(str(killed), read_only=True).all_steps()
    # predict (class names, not indices; no TensorFlow either) runs beside the restarted run.
    files = [written["val"][i][0] for i in (0, 1)]
    # A .npy array of the first file's pixels: the same preprocessing (NumPy/Pillow, no TF).
    array = tmp_path / "first.npy"
    with Image.open(files[0]) as f:
        np.save(array, np.asarray(f.convert("RGB")))
    predict = _start(_cli("train.predict", f"--workdir={reference}", "--top_k=2", *files, array))
    model = tmp_path / "model.safetensors"
    export = _start(_cli("train.export", f"--workdir={reference}", f"--out={model}"))
    restart = _run(_train_cmd(root, killed, "--config.grain_worker_count=0"))
    out, err = predict.communicate(timeout=240)
    export_err = export.communicate(timeout=240)[1]
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "TENSORFLOW_IMPORTED=False" in restart.stderr
    resumed = int(restart.stdout.split("Resuming from checkpoint step ")[1].split()[0])
    assert 0 < resumed < 30 and resumed % 22 != 0, resumed
    got, want = (
        checkpoint.restore_variables(str(killed), 30),
        checkpoint.restore_variables(str(reference), 30),
    )
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)

    # TensorBoard events written without TensorFlow hold the logged numbers, as TF reads them.
    tf = pytest.importorskip("tensorflow")
    from train.metrics import read_metrics

    (events,) = (reference / "tensorboard").glob("events.out.tfevents.*")
    logged = {
        (v.tag, e.step): float(tf.make_ndarray(v.tensor))
        for e in tf.compat.v1.train.summary_iterator(str(events))
        for v in e.summary.value
    }
    last = [r for r in read_metrics(str(reference)) if "loss" in r][-1]
    assert last["step"] == 30
    np.testing.assert_allclose(logged[("train/loss", 30)], last["loss"], rtol=1e-6)

    assert predict.returncode == 0, err[-3000:]
    assert "TENSORFLOW_IMPORTED=False" in err
    lines = out.splitlines()
    assert lines[0] == str(files[0]) and lines[3] == str(files[1]) and lines[6] == str(array)
    top = lines[1].split()
    assert top[0] == "1." and top[1] in SORTED and top[-1] == f"{SORTED.index(top[1])})"
    assert lines[7:9] == lines[1:3]  # the array: the file's class names and probabilities

    # export: the weights, and the class names beside them; no TensorFlow.
    assert export.returncode == 0 and "TENSORFLOW_IMPORTED=False" in export_err, export_err[-3000:]
    assert model.stat().st_size > 0
    assert read_class_names(tmp_path / "model.classes.txt") == SORTED
    assert load_class_names(str(reference)) == SORTED


def _tiny_resnet18_weights(path: Path, num_classes: int) -> dict:
    """A torchvision-layout state_dict file of a one-stage ResNet-18 (random weights)."""
    from safetensors.numpy import save_file

    from resnet_jax.convert import flax_to_torch
    from train.model import build_model

    model = build_model({"arch": "resnet18", "overrides": OVERRIDES}, num_classes, 3)
    variables = model.init(jax.random.key(1), np.zeros((1, 8, 8, 3), np.float32), train=False)
    variables = jax.tree.map(np.asarray, variables)
    save_file({k: np.ascontiguousarray(v) for k, v in flax_to_torch(variables).items()}, str(path))
    return variables


OVERRIDES = {"stage_sizes": (1,), "small_stem": True}  # one stage: a quick compile


def _assert_evaluated_as_torchvision_at_12(summary, workdir, root):
    """The run's eval loss and accuracy are its model's on torchvision's eval images of the val
    files (Pillow loader, v2 Resize(14, bicubic, antialias) + CenterCrop(12)), and
    ``train.predict`` gives that model's probabilities on them."""
    import jax.numpy as jnp
    import optax

    from resnet_jax.torch_reference import import_reference
    from train import build, predict
    from train.model import create_model

    import_reference("torchvision")
    from torchvision.transforms import v2

    pipeline = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(14, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(12),
        ]
    )
    files = image_folder.image_files(str(root / "val"))
    labels = [SORTED.index(Path(f).parent.name) for f in files]
    pixels = np.stack([pipeline(Image.open(f).convert("RGB")).permute(1, 2, 0).numpy() for f in files])
    assert pixels.shape == (360, 12, 12, 3)
    config, info = build.load_run_info(workdir)
    config.dtype = "float32"
    model, _ = create_model(config, info)
    variables = checkpoint.restore_variables(workdir)
    logits = np.asarray(model.apply(variables, core.normalize_pixels(pixels, info), train=False))
    loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(labels))))
    accuracy = float(np.mean(logits.argmax(-1) == np.asarray(labels)))
    got = summary["eval"]
    assert got["num_examples"] == 360
    # Per-example the same computation; only the batching differs (float32 rounding).
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-4)
    assert abs(got["accuracy"] - accuracy) <= 1 / 360, (got, accuracy)
    probs = np.asarray(jax.nn.softmax(logits[:4], axis=-1))
    top = predict.predict_files(workdir, files[:4], top_k=1, batch_size=4)
    for row, (index, _, prob) in zip(probs, (t[0] for t in top)):
        assert index == int(row.argmax()) and abs(prob - float(row.max())) < 1e-5


def test_finetune_folder_config_with_weights_file_new_head_and_frozen_or_slower_backbone(
    digits_root, tmp_path
):
    import runpy

    root, _ = digits_root
    source = _tiny_resnet18_weights(tmp_path / "pretrained.safetensors", num_classes=1000)
    results, summaries = {}, {}
    # The slower backbone is also evaluated at its own size, torchvision's way (V2 recipe's
    # Resize(232) + CenterCrop(224), here 14 and 12 after training at 8), with bicubic resizes.
    at_12 = {"eval_image_size": 12, "eval_resize_size": 14, "interpolation": "bicubic", "eval_at_end": True}
    for name, kw in (("slow", at_12), ("frozen", {"freeze_backbone": True, "backbone_lr_multiplier": 1.0})):
        c = runpy.run_path(str(REPO / "configs" / "finetune_folder.py"))["get_config"]()
        assert c.dataset == "image_folder" and c.init_from == "resnet50.tv2_in1k" and c.new_head
        c.data_dir, c.init_from = str(root), str(tmp_path / "pretrained.safetensors")
        c.model.overrides = OVERRIDES
        c.model.arch, c.dtype, c.rng_impl = "resnet18", "float32", "rbg"
        c.image_size, c.batch_size, c.eval_batch_size = 8, 32, 120
        c.num_train_steps, c.num_epochs, c.warmup_epochs = 4, 1, 0.0
        c.grain_worker_count, c.progress_bar, c.eval_every_steps, c.eval_at_end = 0, False, -1, False
        for k, v in kw.items():
            setattr(c, k, v)
        summaries[name] = loop.train_and_evaluate(c, str(tmp_path / name))
        results[name] = checkpoint.restore_variables(str(tmp_path / name))
    _assert_evaluated_as_torchvision_at_12(summaries["slow"], str(tmp_path / "slow"), root)
    for tuned in results.values():
        assert tuned["params"]["fc"]["kernel"].shape == (64, 10)  # a new head, one output per class
    backbone = lambda v: {k: x for k, x in v["params"].items() if k != "fc"}  # noqa: E731
    frozen, slow, pretrained = backbone(results["frozen"]), backbone(results["slow"]), backbone(source)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(pretrained)):
        np.testing.assert_array_equal(a, b)  # frozen: the file's weights, bit for bit
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(slow), jax.tree.leaves(pretrained))]
    assert max(moved) > 0  # the slower backbone still trains


def test_default_worker_count_is_one_per_core_from_three_cores_and_none_below(monkeypatch):
    config = default_config()
    assert config.grain_worker_count == -1
    # cores -> (worker processes, read threads in each process that decodes)
    for cores, workers, threads in (({0}, 0, 2), ({0, 1}, 0, 2), ({0, 1, 2}, 3, 1), (set(range(16)), 16, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores)
        assert image_folder.worker_count(config) == workers
        assert image_folder.read_threads(image_folder.worker_count(config)) == threads
    config.grain_worker_count = 3  # an explicit count is used as given
    assert image_folder.worker_count(config) == 3
    config.grain_worker_count = 0  # decoding in the training process: a read thread per core
    assert image_folder.worker_count(config) == 0
    assert image_folder.read_threads(0) == 16
