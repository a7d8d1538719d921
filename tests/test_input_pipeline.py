"""train.data: TFDS (mocked and a tiny locally built set), digits, synthetic data."""

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import prepare  # noqa: E402
from train.config import default_config  # noqa: E402
from train.data import core, eval_resize, host_ops, registry, tf_ops  # noqa: E402
from train.data.augment import AugmentOptions  # noqa: E402

tf.config.set_visible_devices([], "GPU")


class ResnetJaxTinyShapes(tfds.core.GeneratorBasedBuilder):
    """41 constant-colour 16x16 images whose pixel value (5 x index) identifies them."""

    VERSION = tfds.core.Version("1.0.0")
    # Tests are not a package; tell TFDS where (not) to look for metadata files.
    pkg_dir_path = __import__("etils").epath.Path(__file__).parent

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(16, 16, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 41)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"image": np.full((16, 16, 3), 5 * i, np.uint8), "label": i % 3}


def make_config(**kw):
    # Every field from configs/default.py (as train/ expects), then this test's values.
    c = default_config()
    c.update(
        {
            "dataset": "cifar10",
            "data_dir": "",
            "manual_dir": "",
            "download": False,
            "train_split": "train",
            "eval_split": "test",
            "image_key": "image",
            "label_key": "label",
            "image_size": 16,
            "train_augment": "none",
            "crop_padding": 4,
            "random_flip": False,
            "eval_crop_fraction": 1.0,
            "normalize_mean": (),
            "normalize_std": (),
            "cache": False,
            "shuffle_buffer_size": 64,
            "seed": 0,
        }
    )
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny set prepared by ``python -m train.prepare``'s function, as a user prepares one."""
    data_dir = tmp_path_factory.mktemp("tfds")
    said = prepare.prepare(make_config(dataset="resnet_jax_tiny_shapes", data_dir=str(data_dir)))
    assert said == f"resnet_jax_tiny_shapes: 30 train, 11 eval images, in {data_dir}", said
    return str(data_dir)


TINY_NORM = {"normalize_mean": (127.5,), "normalize_std": (64.0,)}


def _ids(images):
    """Example index from a constant uint8 image."""
    assert images.dtype == np.uint8
    values = images.reshape(len(images), -1).astype(np.float64)
    assert np.allclose(values, values[:, :1], atol=1e-3), "images are not constant"
    return np.rint(values[:, 0] / 5).astype(int)


def _take(it, n):
    return [next(it) for _ in range(n)]


# --- TFDS, mocked ------------------------------------------------------------------------------


def _assert_resized_eval(batches, raw: np.ndarray) -> None:
    """The TFDS eval batches are ``eval_resize``'s Resize(24, bicubic) + CenterCrop(20) of the
    raw images, bit for bit (one implementation for both pipelines; tests/test_eval_resize.py
    holds it to torchvision's), and the padding is 20 px zeros."""
    want = np.stack([eval_resize.resize_crop(x, 24, 20, "bicubic") for x in raw])
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (48, 20, 20, 3) and images.dtype == np.uint8 and not images[len(raw) :].any()
    np.testing.assert_array_equal(images[: len(raw)], want)


def test_mock_cifar10_train_and_eval_batches():
    cfg = make_config(download=True, image_size=32, train_augment="pad_crop", random_flip=True)
    with tfds.testing.mock_data(num_examples=37):
        raw = list(tfds.load("cifar10", split="test").as_numpy_iterator())
        ds = registry.create_dataset(cfg)
        assert ds.info.num_classes == 10 and ds.info.image_shape == (32, 32, 3)
        assert ds.info.num_train_examples == 37 and ds.steps_per_epoch(8) == 4
        batch = next(ds.train_iterator(8))
        # uint8 pixels: normalisation happens in the jitted step.
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and (0 <= batch["label"]).all()
        evals = list(ds.eval_iterator(16))
        # Evaluated at another size, torchvision's way (Resize(24, bicubic) + CenterCrop(20)):
        # the encoded files are decoded and resized in tf.numpy_function, padded at 20 px.
        cfg.update(dict(eval_image_size=20, eval_resize_size=24, interpolation="bicubic"))
        resized = list(registry.create_dataset(cfg).eval_iterator(16))
    _assert_resized_eval(resized, np.stack([r["image"] for r in raw]))
    # Eval: unshuffled, unaugmented, padded with mask 0 to whole batches; every example once.
    assert [len(b["mask"]) for b in evals] == [16, 16, 16]
    mask = np.concatenate([b["mask"] for b in evals])
    np.testing.assert_array_equal(mask, [1] * 37 + [0] * 11)
    images = np.concatenate([b["image"] for b in evals])
    assert images.dtype == np.uint8 and not images[37:].any()
    np.testing.assert_array_equal(images[:37], np.stack([r["image"] for r in raw]))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in evals])[:37], [r["label"] for r in raw])


def test_mock_imagenet_inception_crop_is_deterministic_and_resumable():
    cfg = make_config(
        dataset="imagenet2012",
        download=True,
        image_size=24,
        train_augment="inception_crop",
        random_flip=True,
        eval_crop_fraction=0.875,
        eval_split="validation",
    )
    with tfds.testing.mock_data(num_examples=20):
        ds = registry.create_dataset(cfg)
        assert ds.info.num_classes == 1000 and ds.steps_per_epoch(4) == 5
        run = _take(ds.train_iterator(4), 7)  # crosses the epoch boundary at step 5
        again = _take(ds.train_iterator(4), 7)
        resumed = _take(ds.train_iterator(4, start_step=3), 4)
        cfg.seed = 1
        reseeded = next(registry.create_dataset(cfg).train_iterator(4))
        ev = next(ds.eval_iterator(8))
    for a, b in zip(run, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(run[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert run[0]["image"].shape == (4, 24, 24, 3)
    assert np.isfinite(run[0]["image"]).all()
    assert not np.array_equal(run[0]["image"], reseeded["image"])
    assert ev["image"].shape == (8, 24, 24, 3)


# --- TFDS, a real tiny dataset built locally ----------------------------------------------------


def test_tiny_tfds_epochs_hosts_and_eval(tiny_dir):
    cfg = make_config(dataset="resnet_jax_tiny_shapes", data_dir=tiny_dir, **TINY_NORM)
    ds = registry.create_dataset(cfg)
    assert ds.info.num_train_examples == 30 and ds.info.num_eval_examples == 11
    assert ds.info.class_names == ("a", "b", "c")
    # One host: each epoch is a permutation of a subset (6 batches of 5 = all 30).
    batches = _take(ds.train_iterator(5), 12)
    epoch0 = np.concatenate([_ids(b["image"]) for b in batches[:6]])
    epoch1 = np.concatenate([_ids(b["image"]) for b in batches[6:]])
    assert sorted(epoch0) == sorted(epoch1) == list(range(30))
    assert not np.array_equal(epoch0, epoch1)
    labels = np.concatenate([b["label"] for b in batches[:6]])
    np.testing.assert_array_equal(labels, epoch0 % 3)

    # Two hosts: disjoint shards of 15; a global batch of 6 is 3 per host, 5 steps per epoch.
    assert ds.steps_per_epoch(6, process_count=2) == 5
    seen = []
    for host in range(2):
        it = ds.train_iterator(6, process_index=host, process_count=2)
        ids = np.concatenate([_ids(b["image"]) for b in _take(it, 5)])
        assert len(set(ids)) == 15
        seen.append(set(ids))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(30))

    # Eval on two hosts: 11 examples split 6 + 5, both hosts run 2 steps, each counted once.
    counted = []
    for host in range(2):
        evals = list(ds.eval_iterator(8, process_index=host, process_count=2))
        assert len(evals) == 2 and all(len(b["mask"]) == 4 for b in evals)
        for b in evals:
            counted += list(_ids(b["image"][b["mask"] == 1]))
    assert sorted(counted) == list(range(30, 41))


def test_tiny_tfds_cache_gives_the_same_stream(tiny_dir):
    plain = registry.create_dataset(
        make_config(dataset="resnet_jax_tiny_shapes", data_dir=tiny_dir, **TINY_NORM)
    )
    cached = registry.create_dataset(
        make_config(dataset="resnet_jax_tiny_shapes", data_dir=tiny_dir, cache=True, **TINY_NORM)
    )
    a = np.concatenate([_ids(b["image"]) for b in _take(cached.train_iterator(5), 12)])
    assert sorted(a[:30]) == sorted(a[30:]) == list(range(30))
    # Resuming a cached stream mid-epoch continues it exactly.
    b = np.concatenate([_ids(b["image"]) for b in _take(cached.train_iterator(5, start_step=8), 4)])
    np.testing.assert_array_equal(a[40:], b)
    assert plain.info == cached.info


# --- errors --------------------------------------------------------------------------------------


def test_missing_imagenet_says_where_the_tar_files_go(tmp_path):
    manual = tmp_path / "manual"
    cfg = make_config(dataset="imagenet2012", data_dir=str(tmp_path), manual_dir=str(manual))
    with pytest.raises(core.DatasetError) as e:
        registry.create_dataset(cfg)
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert str(manual) in msg and "python -m train.prepare" in msg


def test_prepare_gets_to_the_download_of_a_real_builder(tmp_path, monkeypatch):
    """``python -m train.prepare`` (and --config.download=True) on a fresh install reaches TFDS's
    real cifar10 download (no Beam, no missing module), and a failed download is one line. The
    network is a closed port on 127.0.0.1, through the proxy variables that requests reads."""
    import socket

    from tensorflow_datasets.core.download import downloader

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # free, and nothing listens once closed
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, closed)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS's back-off would wait minutes
    config = make_config(dataset="cifar10", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(Exception) as e:
        prepare.prepare(config)
    chain, error = [], e.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert any("cifar-10-binary.tar.gz" in link for link in chain), chain  # TFDS's own URL
    line = prepare._download_failure(e.value)
    assert line is not None and "\n" not in line, chain
    assert line.startswith("the download failed (") and "--config.data_dir=DIR" in line, line
    assert prepare.prepare(make_config(dataset="sklearn_digits")).startswith(
        "sklearn_digits is not a TFDS dataset: nothing to prepare"
    )


def test_missing_and_unknown_datasets(tmp_path):
    with pytest.raises(core.DatasetError, match=r"python -m train.prepare.*--config.download=True"):
        registry.create_dataset(make_config(dataset="cifar100", data_dir=str(tmp_path)))
    with pytest.raises(core.DatasetError, match="unknown dataset 'no_such_set'"):
        registry.create_dataset(make_config(dataset="no_such_set"))


def test_bad_batch_and_augment():
    with pytest.raises(core.DatasetError, match="multiple of the number of processes"):
        core.host_batch_size(10, 3)
    digits = registry.create_dataset(make_config(dataset="sklearn_digits", train_augment="inception_crop"))
    with pytest.raises(core.DatasetError, match="pad_crop"):
        next(digits.train_iterator(8))


# --- eval preprocessing ----------------------------------------------------------------------


def test_eval_center_crop_geometry():
    # 300 x 400 image: a 24 px red border around blue.
    img = np.zeros((300, 400, 3), np.uint8)
    img[..., 0] = 255
    img[24:-24, 24:-24] = (0, 0, 255)
    info = core.DatasetInfo("x", 2, (56, 56, 3), 1, 1, ("a", "b"), (0.0,) * 3, (1.0,) * 3)
    cropped = np.asarray(tf_ops.preprocess_eval_image(img, info, 0.875))
    full = np.asarray(tf_ops.preprocess_eval_image(img, info, 1.0))
    assert cropped.shape == full.shape == (56, 56, 3)
    red = cropped[..., 0] > 127
    # Shorter side -> 64 (scale 64/300), so 300 x 400 -> 64 x 85, then the central 56 x 56:
    # 4 rows cut top and bottom (18.75 original px, less than the band: a red row remains),
    # 14 columns cut left and right (65.6 original px: the red columns are gone).
    assert red[0].all() and red[-1].all()
    assert not red[2:-2].any()
    # Symmetric content stays symmetric: the crop is centred.
    np.testing.assert_allclose(cropped, cropped[::-1], atol=1.0)
    np.testing.assert_allclose(cropped, cropped[:, ::-1], atol=1.0)
    # Without cropping the whole image is squeezed to 56 x 56 and keeps its red sides.
    assert (full[2:-2, 0, 0] > 127).all() and (full[2:-2, -1, 0] > 127).all()


# --- digits --------------------------------------------------------------------------------------


def test_digits_split_is_fixed_and_stratified():
    a = registry.create_dataset(make_config(dataset="sklearn_digits", seed=0))
    b = registry.create_dataset(make_config(dataset="sklearn_digits", seed=5))
    src_a, src_b = a.source, b.source
    np.testing.assert_array_equal(src_a.x_eval, src_b.x_eval)
    assert a.info.num_train_examples == 1437 and a.info.num_eval_examples == 360
    assert a.info.image_shape == (8, 8, 1) and a.info.num_classes == 10
    counts = np.bincount(src_a.y_eval, minlength=10)
    total = np.bincount(np.concatenate([src_a.y_train, src_a.y_eval]), minlength=10)
    assert np.all(np.abs(counts - total * 360 / 1797) <= 1)
    assert src_a.x_train.max() == 255 and src_a.x_train.min() == 0


def test_digits_hosts_slice_the_same_global_batch():
    cfg = make_config(dataset="sklearn_digits", train_augment="pad_crop", crop_padding=1)
    ds = registry.create_dataset(cfg)
    one = _take(ds.train_iterator(16, start_step=20), 4)  # crosses the epoch end (89 steps)
    hosts = [
        _take(ds.train_iterator(16, start_step=20, process_index=i, process_count=2), 4) for i in range(2)
    ]
    for step in range(4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                one[step][key], np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            )
    resumed = next(ds.train_iterator(16, start_step=22))
    np.testing.assert_array_equal(resumed["image"], one[2]["image"])
    # Shifts by at most one pixel: every augmented image is a translate of a training image.
    src = ds.source
    raw = one[0]["image"] * np.array(src.std) + np.array(src.mean)
    padded = np.pad(src.x_train, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = set()
    for img in raw:
        found = [
            (dy, dx)
            for dy in range(3)
            for dx in range(3)
            if (np.abs(padded[:, dy : dy + 8, dx : dx + 8] - img).max(axis=(1, 2, 3)) < 1e-3).any()
        ]
        assert found, "an augmented image is not a one-pixel shift of a training image"
        shifts.update(found)
    assert len(shifts) > 1  # not all unshifted


def test_digits_eval_counts_every_example_once_on_two_hosts():
    ds = registry.create_dataset(make_config(dataset="sklearn_digits"))
    labels = []
    steps = []
    for host in range(2):
        evals = list(ds.eval_iterator(64, process_index=host, process_count=2))
        steps.append(len(evals))
        labels += [b["label"][b["mask"] == 1] for b in evals]
    assert steps == [6, 6]  # ceil(360 / 64)
    all_labels = np.concatenate(labels)
    assert len(all_labels) == 360
    np.testing.assert_array_equal(np.bincount(all_labels), np.bincount(ds.source.y_eval))


# --- synthetic and prefetch --------------------------------------------------------------------


def test_synthetic_batches():
    cfg = make_config(dataset="synthetic", image_size=12, synthetic_num_classes=5)
    cfg.synthetic_channels = 3
    cfg.synthetic_num_examples = 100
    cfg.synthetic_num_eval_examples = 10
    ds = registry.create_dataset(cfg)
    it = ds.train_iterator(8)
    a, b = next(it), next(it)
    assert a["image"].shape == (8, 12, 12, 3) and a["label"].max() < 5
    # Pixels, as TFDS batches are: the step normalises them on the device.
    assert a["image"].dtype == np.uint8 and a["image"].min() < 30 and a["image"].max() > 225
    np.testing.assert_array_equal(a["image"], b["image"])
    assert ds.steps_per_epoch(8) == 12 and len(list(ds.eval_iterator(4))) == 3


def test_prefetch_keeps_order_and_stays_bounded():
    placed = []

    def place(x):
        placed.append(x)
        return x * 10

    out = []
    for y in core.prefetch_to_device(iter(range(7)), place, size=2):
        out.append(y)
        assert len(placed) - len(out) <= 2
    assert out == [x * 10 for x in range(7)]


# --- the registry and the augmentation options -------------------------------------------------


def test_registry_maps_named_sources_and_sends_every_other_name_to_tfds():
    from train.data.digits import DigitsSource
    from train.data.image_folder import ImageFolderSource
    from train.data.synthetic import SyntheticSource
    from train.data.tfds import TFDSSource

    assert registry.get("sklearn_digits") is DigitsSource
    assert registry.get("synthetic") is SyntheticSource and SyntheticSource.repeats_one_batch
    assert registry.get("image_folder") is ImageFolderSource
    assert registry.get("cifar10") is TFDSSource and registry.get("imagenet2012:5.1.0") is TFDSSource
    assert not registry.create_dataset(make_config(dataset="sklearn_digits")).repeats_one_batch


def test_augment_options_are_config_fields_and_both_paths_offer_every_crop():
    from train.data import image_ops
    from train.data.augment import TRAIN_AUGMENTATIONS, AugmentOptions

    config = make_config(train_augment="pad_crop", crop_padding=3)
    options = AugmentOptions.from_config(config)
    assert options.train_augment == "pad_crop" and options.crop_padding == 3
    assert set(image_ops.CROPS) == set(tf_ops.CROPS) == set(TRAIN_AUGMENTATIONS)


@pytest.mark.parametrize(
    "fields",
    [dict(auto_augment="ta_wide"), dict(auto_augment="rand-m9-mstd0.5-inc1", random_erase_prob=1.0)],
)
def test_tiny_tfds_runs_the_image_folder_augmentation_keyed_on_the_example(tiny_dir, fields):
    plain = registry.create_dataset(
        make_config(dataset="resnet_jax_tiny_shapes", data_dir=tiny_dir, **TINY_NORM)
    )
    config = make_config(dataset="resnet_jax_tiny_shapes", data_dir=tiny_dir, **TINY_NORM, **fields)
    ds = registry.create_dataset(config)
    want = next(plain.train_iterator(5, start_step=2))
    got = next(ds.train_iterator(5, start_step=2))
    np.testing.assert_array_equal(got["label"], want["label"])
    options = AugmentOptions.from_config(config)
    for k in range(5):
        # Step 2 of epoch 0 holds positions 10..14 of host 0's epoch; the generator is keyed on
        # the example's seed (fold_seed(seed, epoch, host), position).
        rng = host_ops.example_rng([core.fold_seed(0, 0, 0), 10 + k])
        expected = host_ops.host_augment(want["image"][k], rng, options, ds.info)
        assert got["image"].dtype == expected.dtype
        np.testing.assert_array_equal(got["image"][k], expected)
    assert (got["image"] != want["image"]).any()
    # A fresh pipeline from step 0 reaches the same batch at step 2.
    np.testing.assert_array_equal(_take(ds.train_iterator(5), 3)[2]["image"], got["image"])


@pytest.mark.parametrize("repeats", [3, 2.5])
def test_tiny_tfds_aug_repeats_reads_each_example_in_a_row_as_timms_sampler(tiny_dir, repeats):
    plain = registry.create_dataset(
        make_config(dataset="resnet_jax_tiny_shapes", data_dir=tiny_dir, **TINY_NORM)
    )
    config = make_config(
        dataset="resnet_jax_tiny_shapes", data_dir=tiny_dir, aug_repeats=repeats, **TINY_NORM
    )
    ds = registry.create_dataset(config)
    order = np.concatenate([_ids(b["image"]) for b in _take(plain.train_iterator(5), 6)])
    got = np.concatenate([_ids(b["image"]) for b in _take(ds.train_iterator(5), 6)])
    # Position p reads example p // repeats of the epoch's order (timm's RepeatAugSampler); the
    # epoch keeps its 6 steps.
    np.testing.assert_array_equal(got, order[[int(p // repeats) for p in range(30)]])
    resumed = np.concatenate([_ids(b["image"]) for b in _take(ds.train_iterator(5, start_step=4), 2)])
    np.testing.assert_array_equal(resumed, got[20:])
