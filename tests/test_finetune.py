"""Fine-tuning in train/: weights from another run, a new head, a frozen or slower backbone,
resuming without re-importing, and export to PyTorch (configs/finetune.py's workflow)."""

import os
import shutil
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from train_worker import tiny_config  # noqa: E402

from train import checkpoint, export, loop, optim  # noqa: E402
from train.config import ConfigError, validate_config  # noqa: E402
from train.data import registry  # noqa: E402


def test_class_subset_keeps_and_relabels_digits():
    full = registry.create_dataset(tiny_config())
    sub = registry.create_dataset(tiny_config(class_subset=(7, 2)))
    src_full, src_sub = full.source, sub.source
    assert sub.info.num_classes == 2 and sub.info.class_names == ("7", "2")
    for x, y, xs, ys in (
        (src_full.x_train, src_full.y_train, src_sub.x_train, src_sub.y_train),
        (src_full.x_eval, src_full.y_eval, src_sub.x_eval, src_sub.y_eval),
    ):
        np.testing.assert_array_equal(xs, x[(y == 7) | (y == 2)])
        np.testing.assert_array_equal(ys, np.where(y[(y == 7) | (y == 2)] == 7, 0, 1))
    assert sub.info.mean == full.info.mean  # one normalisation for every subset
    with pytest.raises(ConfigError, match="class_subset must be 2 or more distinct digits"):
        validate_config(tiny_config(class_subset=(3, 3)))
    with pytest.raises(ConfigError, match="contradict"):
        validate_config(tiny_config(freeze_backbone=True, backbone_lr_multiplier=0.1))


def test_frozen_backbone_gets_no_update_and_multiplier_scales_it():
    params = {"fc": {"kernel": jnp.ones((3, 2))}, "layer1_0": {"conv1": {"kernel": jnp.ones((3, 3, 2, 2))}}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    schedule = optax.constant_schedule(0.1)
    updates = {}
    for name, kw in (
        ("plain", {}),
        ("frozen", {"freeze_backbone": True}),
        ("slow", {"backbone_lr_multiplier": 0.1}),
    ):
        tx = optim.create_optimizer(tiny_config(weight_decay=0.0, **kw), schedule)
        updates[name], _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates["frozen"]["fc"], updates["plain"]["fc"])
    chex.assert_trees_all_equal(
        updates["frozen"]["layer1_0"], jax.tree.map(jnp.zeros_like, params["layer1_0"])
    )
    chex.assert_trees_all_equal(updates["slow"]["fc"], updates["plain"]["fc"])
    chex.assert_trees_all_close(
        updates["slow"]["layer1_0"], jax.tree.map(lambda u: 0.1 * u, updates["plain"]["layer1_0"])
    )


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """12 steps on digits 0-5 (6 classes), the source of the fine-tuning runs below."""
    workdir = str(tmp_path_factory.mktemp("pre"))
    loop.train_and_evaluate(tiny_config(class_subset=(0, 1, 2, 3, 4, 5)), workdir)
    return workdir


def test_fine_tune_new_head_frozen_backbone_and_resume(pretrained_run, tmp_path, capsys):
    source = checkpoint.restore_variables(pretrained_run)
    ft = str(tmp_path / "ft")
    cfg = dict(class_subset=(6, 7, 8, 9), init_from=pretrained_run, freeze_backbone=True, num_train_steps=6)
    loop.train_and_evaluate(tiny_config(**cfg), ft)
    out = capsys.readouterr().out
    assert f"Initialised from {pretrained_run}: every tensor loaded exactly" in out
    assert "the classifier (fc) is freshly initialised: 6 classes in" in out and "4 in this dataset" in out
    tuned = checkpoint.restore_variables(ft)
    # The frozen backbone is bitwise the pretrained one; the new head has 4 classes and trained.
    chex.assert_trees_all_equal(tuned["params"]["backbone"], source["params"]["backbone"])
    assert tuned["params"]["fc"]["kernel"].shape[-1] == 4
    # BatchNorm statistics follow the documented choice: they keep updating in train mode.
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(tuned["batch_stats"]), jax.tree.leaves(source["batch_stats"]))
    )

    # Resuming never re-imports: the source may even be gone.
    gone = str(tmp_path / "gone")
    shutil.copytree(pretrained_run, gone)
    loop.train_and_evaluate(tiny_config(**{**cfg, "init_from": gone}), str(tmp_path / "ft2"))
    shutil.rmtree(gone)
    summary = loop.train_and_evaluate(
        tiny_config(**{**cfg, "init_from": gone, "num_train_steps": 8}), str(tmp_path / "ft2")
    )
    assert summary["start_step"] == 6 and summary["final_step"] == 8
    assert "Initialised from" not in capsys.readouterr().out.split("Resuming from checkpoint step 6")[-1]


def test_resume_of_a_run_without_an_ema_with_the_ema_on_is_one_line(pretrained_run):
    """A fresh EMA in place of the missing one would silently restart the average: refused."""
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(tiny_config(class_subset=(0, 1, 2, 3, 4, 5), ema_decay=0.9), pretrained_run)
    line = str(e.value)
    assert "\n" not in line and "was trained with ema_decay=0.0 but this run has 0.9" in line, line


def test_init_from_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not a file, a run's workdir or a pretrained name"):
        loop.train_and_evaluate(tiny_config(init_from="no_such_weights"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="no checkpoints"):
        loop.train_and_evaluate(tiny_config(init_from=str(tmp_path)), str(tmp_path / "b"))


def test_offline_pretrained_name_says_how_to_set_the_file_in_the_config(tmp_path, monkeypatch):
    """The library's advice (``path=``, its Python API) becomes the config field's."""
    from resnet_jax import pretrained
    from train import init_from

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = pretrained.locate
    monkeypatch.setattr(pretrained, "locate", lambda entry, **kw: real(entry, download=False))  # offline
    with pytest.raises(ConfigError) as e:
        init_from._from_pretrained("resnet18.tv_in1k", None, "resnet18", "init_from")
    msg = str(e.value)
    assert msg.startswith("config.init_from='resnet18.tv_in1k': ") and "is not cached" in msg, msg
    assert msg.endswith("or download it anywhere and set --config.init_from=FILE."), msg
    assert "path=" not in msg and "\n" not in msg, msg


def test_init_from_another_architecture_is_one_line_from_the_structured_error(tmp_path):
    """init_from formats the library's StateDictMismatchError fields: counts, a first key each,
    the architecture the file looks like."""
    from resnet_jax import get_model
    from resnet_jax.convert import save_torch_checkpoint
    from train import init_from

    r50 = get_model("resnet50", num_classes=10, stage_sizes=(1, 1))
    shapes = jax.eval_shape(lambda: r50.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    path = str(tmp_path / "r50.safetensors")
    save_torch_checkpoint(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), path)
    model = get_model("resnet18", num_classes=10, stage_sizes=(1, 1))
    with pytest.raises(ConfigError) as e:
        init_from._from_torch_file(path, model, "init_from")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"config.init_from={path!r} does not fit config.model (ResNet): "
    )
    # bottleneck-only: conv3/bn3 of 2 blocks and layer1.0's projection (5 tensors each); misshapen:
    # layer1.0.conv1 (1x1), layer2.0.conv1 (256 in), downsample.0 and its 4 BN tensors (512), fc.
    assert "unexpected keys (15), e.g. layer1.0.bn3.bias" in msg
    assert "wrong shapes (8), e.g. fc.weight: got (512, 10), expected (128, 10)" in msg
    assert "The state_dict looks like ResNet (stage_sizes=(1, 1), block=bottleneck)." in msg


def test_export_loads_strictly_into_pytorch_and_gives_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    from resnet_jax.torch_reference import torch_resnet
    from train import build
    from train.model import create_model

    overrides = {"stage_sizes": (1, 1), "small_stem": True}
    workdir = str(tmp_path / "r18")
    c = tiny_config(num_train_steps=4, checkpoint_every_steps=0, eval_every_steps=-1, eval_at_end=False)
    c.model.arch, c.model.overrides = "resnet18", overrides
    c.ema_decay = 0.5  # with an EMA: export --ema writes its weights, the default the trained ones
    loop.train_and_evaluate(c, workdir)
    for suffix, ema in ((".safetensors", True), (".pth", False)):
        out = str(tmp_path / f"model{suffix}")
        export.export(workdir, out, ema=ema)
        twin = torch_resnet("resnet18", num_classes=10, img_channels=1, **overrides).eval()
        if suffix == ".pth":
            state_dict = torch.load(out, weights_only=True)
        else:
            from safetensors.torch import load_file

            state_dict = load_file(out)
        twin.load_state_dict(state_dict, strict=True)
        config, info = build.load_run_info(workdir)
        model, _ = create_model(config, info)
        variables = checkpoint.restore_variables(workdir, ema=ema)
        x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
        want = np.asarray(model.apply(variables, x, train=False))
        with torch.no_grad():
            got = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    trained, averaged = (checkpoint.restore_variables(workdir, ema=e) for e in (False, True))
    assert not np.allclose(trained["params"]["fc"]["kernel"], averaged["params"]["fc"]["kernel"])
    with pytest.raises(ConfigError, match="no torchvision/timm"):
        base = str(tmp_path / "base")
        loop.train_and_evaluate(tiny_config(num_train_steps=2, eval_at_end=False, eval_every_steps=-1), base)
        export.export(base, str(tmp_path / "x.pth"))
    assert not os.path.exists(tmp_path / "x.pth")
