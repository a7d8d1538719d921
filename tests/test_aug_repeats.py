"""Repeated augmentation (``aug_repeats``, image folders) against timm's own ``RepeatAugSampler``."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_worker import tiny_config  # noqa: E402

from resnet_jax.torch_reference import import_reference  # noqa: E402
from train.data import image_folder  # noqa: E402

timm = import_reference("timm")
torch = pytest.importorskip("torch")
from timm.data.distributed_sampler import RepeatAugSampler  # noqa: E402

N, RANKS, PER_RANK = 40, 4, 2  # timm: 4 GPUs of 2; here one global batch of 8


def _our_batches(monkeypatch, repeats, process_count, epochs):
    """Each global batch's example indices, read by ``process_count`` hosts."""
    monkeypatch.setattr(image_folder, "load_example", lambda path, fn: np.int32(path.split("/")[-1]))
    config = tiny_config(aug_repeats=repeats)
    paths, glob = [f"/data/{i}" for i in range(N)], RANKS * PER_RANK
    steps = N // glob
    per_host = glob // process_count
    hosts = [
        image_folder._TrainExample(paths, np.zeros(N), config, per_host, glob, p, steps, ((0.0,), (1.0,)))
        for p in range(process_count)
    ]
    return [
        sorted(int(host(s * per_host + i)["image"]) for host in hosts for i in range(per_host))
        for s in range(epochs * steps)
    ]


def _timm_batches(monkeypatch, repeats, epochs, seed):
    """timm's global batches (the union of the ranks'), its permutation replaced by ours."""
    perms = {}

    def randperm(n, generator):
        epoch = generator.initial_seed()
        perms[epoch] = image_folder.epoch_order(seed, epoch, n)
        return torch.from_numpy(perms[epoch].copy())

    monkeypatch.setattr(torch, "randperm", randperm)
    batches = []
    for epoch in range(epochs):
        ranks = []
        for rank in range(RANKS):
            sampler = RepeatAugSampler(range(N), num_replicas=RANKS, rank=rank, num_repeats=repeats)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        steps = len(ranks[0]) // PER_RANK
        for s in range(steps):
            batches.append(sorted(i for r in ranks for i in r[s * PER_RANK : (s + 1) * PER_RANK]))
    return batches


@pytest.mark.parametrize("repeats", [3, 2.5])
@pytest.mark.parametrize("process_count", [1, 2])
def test_global_batches_hold_the_examples_of_timms_repeat_aug_sampler(monkeypatch, repeats, process_count):
    want = _timm_batches(monkeypatch, repeats, epochs=2, seed=0)
    got = _our_batches(monkeypatch, repeats, process_count, epochs=2)
    assert got == want
    if repeats == 3:  # the first 24 rows: 8 images, three times each
        assert (np.unique(np.concatenate(got[:3]), return_counts=True)[1] == 3).all()


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(aug_repeats=3), "aug_repeats is implemented for dataset='image_folder' and TFDS sets"),
        (dict(aug_repeats=-1), "aug_repeats must be >= 0"),
        (
            dict(dataset="image_folder", aug_repeats=3, mixup_alpha=0.2, batch_size=64),
            "aug_repeats=3.0 with mixup/cutmix must be a whole number that divides config.batch_size=64",
        ),
    ],
)
def test_bad_aug_repeats_is_one_line_naming_the_field(fields, message):
    from train.config import ConfigError, default_config, validate_config

    config = default_config()
    config.update(fields)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)
