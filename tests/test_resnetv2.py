"""ResNetV2 and BiT: timm's state_dicts convert both ways, the architecture is read from the keys,
and named weights load offline from the Hugging Face cache with a fresh head for transfer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import resnet_jax
from resnet_jax import convert, pretrained
from resnet_jax import nnx as rnnx
from resnet_jax.parity import rel
from resnet_jax.torch_reference import import_reference

timm = import_reference("timm")
# Small timm models with the presets' structure: two stages of one block each.
SMALL = dict(layers=[1, 1], channels=(128, 256))
FIELDS = dict(stage_sizes=(1, 1), channels=(128, 256))


def _timm(arch, num_classes=7, seed=0):
    torch.manual_seed(seed)
    if arch.endswith("_bit"):  # timm's BiT constructor fixes the depth; these are its other arguments
        from functools import partial

        from timm.layers import GroupNormAct, StdConv2d
        from timm.models.resnetv2 import ResNetV2

        bit = dict(stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8))
        tm = ResNetV2(
            num_classes=num_classes, norm_layer=partial(GroupNormAct, num_groups=32), **bit, **SMALL
        )
    else:
        tm = timm.create_model(arch, pretrained=False, num_classes=num_classes, **SMALL)
    tm = tm.eval()
    with torch.no_grad():  # non-trivial norms and statistics, so eval differs from train
        for m in tm.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return tm


def _logits(model, variables, tm, size=40):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tm(x).numpy()
    return np.asarray(model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False)), ref


@pytest.mark.parametrize("arch", ["resnetv2_50", "resnetv2_50d", "resnetv2_50x1_bit"])
def test_timm_state_dict_round_trips_and_is_inferred(arch):
    tm = _timm(arch)
    sd = tm.state_dict()
    model = convert.infer_model(sd)
    assert model == resnet_jax.get_model(arch, num_classes=7, **FIELDS)
    variables = convert.torch_to_flax(sd)
    back = convert.flax_to_torch(variables)
    expected = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert set(expected) <= set(back) and all(np.array_equal(back[k], v) for k, v in expected.items())
    tm2 = _timm(arch, seed=1)
    tm2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    out, ref = _logits(model, variables, tm)
    assert rel(out, ref) <= 1e-5


def test_nnx_resnetv2_has_timm_state_paths_and_linen_values():
    from flax import nnx

    model = rnnx.resnetv2_50x1_bit(num_classes=5, rngs=nnx.Rngs(0), **FIELDS)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert {
        "stem.conv.kernel",
        "stages.1.blocks.0.downsample.conv.kernel",
        "norm.scale",
        "head.fc.bias",
    } <= paths
    assert "stages.0.blocks.0.norm1.mean" not in paths  # GroupNorm: no statistics
    linen = rnnx.to_linen(model)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    np.testing.assert_allclose(
        np.asarray(model(x)), np.asarray(linen.apply(convert.nnx_to_linen(model), x)), rtol=1e-5, atol=1e-6
    )


def test_bit_weights_load_offline_from_the_cache_with_a_fresh_head(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "resnetv2_50x1_bit.goog_in21k"
    tm = _timm("resnetv2_50x1_bit", num_classes=pretrained.info(name).num_classes)
    repo = tmp_path / "hf" / f"models--timm--{name}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    convert.save_torch_checkpoint(
        convert.torch_to_flax(tm.state_dict()), repo / "snapshots" / "abc123" / "model.safetensors"
    )
    model, variables = pretrained.load(name, download=False, **FIELDS)
    out, ref = _logits(model, variables, tm)
    assert out.shape == (2, 21843) and rel(out, ref) <= 1e-5
    # Transfer: a fresh 3-class head.fc; every other tensor loads bitwise.
    small, fresh = pretrained.load(name, num_classes=3, download=False, **FIELDS)
    assert small.num_classes == 3 and fresh["params"]["head"]["fc"]["kernel"].shape == (1, 1, 256, 3)
    same = jax.tree.map(
        np.array_equal, {**fresh["params"], "head": None}, {**variables["params"], "head": None}
    )
    assert all(jax.tree.leaves(same))


def test_train_imports_bit_weights_with_a_fresh_head_and_labels_it_the_head(tmp_path):
    """The training program fine-tunes BiT: a timm BiT state_dict with 21,843 classes loads into a
    3-class ResNetV2 config, every backbone tensor exactly and ``head.fc`` fresh; the optimizer's
    ``freeze_backbone`` labels ``head`` as the head."""
    from train import init_from, optim, steps
    from train import model as train_model

    tm = _timm("resnetv2_50x1_bit", num_classes=21843)
    path = str(tmp_path / "bit.safetensors")
    convert.save_torch_checkpoint(convert.torch_to_flax(tm.state_dict()), path)
    cfg = {"arch": "resnetv2_50x1_bit", "overrides": FIELDS}
    model = train_model.build_model(cfg, num_classes=3, img_channels=3)
    fresh = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    state = steps.TrainState(step=0, params=fresh["params"], batch_stats={}, opt_state=None)
    loaded, note = init_from.import_weights(path, model, state)
    loaded = {"params": loaded.params}
    assert "head.fc" not in note and "classifier" in note and "21843 classes" in note
    ref = convert.torch_to_flax(tm.state_dict())["params"]
    assert np.array_equal(loaded["params"]["stem"]["conv"]["kernel"], ref["stem"]["conv"]["kernel"])
    assert np.array_equal(loaded["params"]["head"]["fc"]["kernel"], fresh["params"]["head"]["fc"]["kernel"])
    labels = optim.head_labels(loaded["params"])
    assert set(jax.tree.leaves(labels["head"])) == {"head"} and set(jax.tree.leaves(labels["stages_0"])) == {
        "backbone"
    }
