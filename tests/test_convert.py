"""PyTorch <-> Flax weight conversion: exact round trips, inference of the architecture (torchvision,
timm and labml.ai's annotated ResNet layouts), fresh heads, .pth/.safetensors files, errors."""

import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import resnet_jax
from resnet_jax import convert
from resnet_jax.torch_reference import TorchResNetBase, import_reference, randomize_batchnorm, torch_resnet

SEED_CONFIGS = [
    dict(n_blocks=(2, 2), n_channels=(8, 16)),
    dict(n_blocks=(1, 2, 1), n_channels=(8, 16, 32), bottlenecks=(4, 8, 16), conv_bias=True),
]


def _assert_state_dicts_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torch_flax_torch_round_trip_is_exact_and_loads_strictly(arch):
    tm = torch_resnet(arch, num_classes=7)
    sd = tm.state_dict()
    variables = convert.torch_to_flax(sd)
    back = convert.flax_to_torch(variables)
    expected = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    _assert_state_dicts_equal({k: v for k, v in back.items() if k in expected}, expected)
    assert {k for k in back if k not in expected} == {k for k in sd if k.endswith("num_batches_tracked")}
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_flax_torch_flax_round_trip_is_exact():
    model = resnet_jax.resnext50_32x4d(num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    back = convert.torch_to_flax(convert.flax_to_torch(variables), model)
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))


def test_layout_rules_on_known_tensors():
    tm = torch_resnet("resnet18", num_classes=4)
    sd = tm.state_dict()
    v = convert.torch_to_flax(sd)
    w = sd["layer2.0.downsample.0.weight"].numpy()  # O, I, kH, kW
    np.testing.assert_array_equal(v["params"]["layer2_0"]["downsample_0"]["kernel"][0, 0], w[:, :, 0, 0].T)
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(v["params"]["bn1"]["scale"], sd["bn1.weight"].numpy())
    np.testing.assert_array_equal(
        v["batch_stats"]["layer1_1"]["bn2"]["var"], sd["layer1.1.bn2.running_var"].numpy()
    )
    k = v["params"]["conv1"]["kernel"]
    assert k.shape == (7, 7, 3, 64)
    np.testing.assert_array_equal(k[1, 2, 0, 5], sd["conv1.weight"].numpy()[5, 0, 1, 2])


@pytest.mark.parametrize("arch", sorted(resnet_jax.PRESETS))
def test_infer_model_recovers_every_preset(arch):
    """Each preset is what torchvision's model of that name (timm's where torchvision has none)
    holds: every stage's depth, width and groups, the stem and the shortcuts, read from its
    state_dict. With this, the float64 parity of one preset per block kind (test_parity) covers
    its deeper and wider siblings."""
    torchvision = import_reference("torchvision")
    with torch.device("meta"):  # shapes only, no memory
        if hasattr(torchvision.models, arch):
            reference = getattr(torchvision.models, arch)(weights=None, num_classes=10)
        else:
            reference = import_reference("timm").create_model(arch, pretrained=False, num_classes=10)
        sd = reference.state_dict()
    assert convert.infer_model(sd) == resnet_jax.get_model(arch, num_classes=10)
    # Our own PyTorch twin, which the parity command's default reference is, holds the same.
    with torch.device("meta"):
        twin = torch_resnet(arch, num_classes=10).state_dict()
    assert {k: tuple(v.shape) for k, v in twin.items()} == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("cfg", SEED_CONFIGS)
def test_seed_style_state_dict_converts_and_round_trips(cfg):
    tm = TorchResNetBase(**cfg)
    sd = tm.state_dict()
    model = resnet_jax.ResNetBase(**cfg)
    variables = convert.torch_to_flax(sd, model)
    inferred = convert.infer_model(sd)
    assert inferred.n_blocks == cfg["n_blocks"] and inferred.n_channels == cfg["n_channels"]
    assert inferred.conv_bias == cfg.get("conv_bias", False)
    back = convert.flax_to_torch(variables)
    _assert_state_dicts_equal(
        {k: v for k, v in back.items() if not k.endswith("num_batches_tracked")},
        {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    )


def test_accepts_numpy_wrapped_and_dataparallel_state_dicts():
    sd = {f"module.{k}": v.numpy() for k, v in torch_resnet("resnet18", num_classes=3).state_dict().items()}
    v = convert.torch_to_flax({"state_dict": sd})
    assert v["params"]["fc"]["kernel"].shape == (512, 3)


def test_converted_arrays_do_not_alias_torch_memory():
    tm = torch_resnet("resnet18", num_classes=3)
    v = convert.torch_to_flax(tm.state_dict())
    before = v["params"]["bn1"]["bias"].copy()
    with torch.no_grad():
        tm.bn1.bias.add_(1.0)
    np.testing.assert_array_equal(v["params"]["bn1"]["bias"], before)


def test_other_architecture_lists_offending_keys():
    sd = torch_resnet("resnet50").state_dict()
    with pytest.raises(convert.StateDictMismatchError) as e:
        convert.torch_to_flax(sd, "resnet18")
    msg = str(e.value)
    assert "resnet18" in msg and "unexpected keys" in msg and "layer1.0.conv3.weight" in msg
    assert "wrong shapes" in msg and "looks like ResNet (resnet50)" in msg


def test_missing_unexpected_and_wrong_shape_keys_are_all_listed():
    sd = dict(torch_resnet("resnet18", num_classes=10).state_dict())
    del sd["layer3.1.bn2.running_var"]
    sd["layer9.extra.weight"] = torch.zeros(3, 3)
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    with pytest.raises(convert.StateDictMismatchError) as e:
        convert.torch_to_flax(sd, resnet_jax.resnet18(num_classes=10))
    msg = str(e.value)
    assert "missing keys (1): layer3.1.bn2.running_var" in msg
    assert "unexpected keys (1): layer9.extra.weight" in msg
    assert "layer2.0.conv1.weight: got (5, 5, 64, 128)" in msg
    err = e.value  # the same, as fields
    assert err.missing == ("layer3.1.bn2.running_var",) and err.unexpected == ("layer9.extra.weight",)
    assert err.wrong_shapes == (("layer2.0.conv1.weight", (5, 5, 64, 128), (3, 3, 64, 128)),)
    assert err.target == "ResNet (resnet18)" == err.looks_like


def test_not_a_resnet_state_dict():
    with pytest.raises(convert.StateDictMismatchError, match="not a ResNet state_dict"):
        convert.torch_to_flax({"encoder.weight": np.zeros((3, 3))})


def test_load_torch_checkpoint_reads_weights_only(tmp_path):
    tm = torch_resnet("resnet18", num_classes=2)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": tm.state_dict()}, path)
    sd = convert.load_torch_checkpoint(str(path))
    assert set(sd) == set(tm.state_dict())
    evil = tmp_path / "evil.pth"
    torch.save({"model": tm.state_dict(), "obj": _Pickled()}, evil)
    with pytest.raises(ValueError, match="never unpickles"):
        convert.load_torch_checkpoint(str(evil))


class _Pickled:
    pass


def _f64(model):
    return model.clone(dtype=jnp.float64, param_dtype=jnp.float64)


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _assert_same_function_float64(tm, model, variables, size=33):
    """Eval and train-mode logits and updated running statistics of a float64 twin."""
    with jax.enable_x64(True):
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        tm = tm.double().eval()
        with torch.no_grad():
            ref_eval = tm(x).numpy()
        tm.train()
        with torch.no_grad():
            ref_train = tm(x).numpy()
        model = _f64(model)
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        out_eval = model.apply(v, _nhwc(x), train=False)
        out_train, upd = model.apply(v, _nhwc(x), train=True, mutable=["batch_stats"])
        chex.assert_trees_all_close(np.asarray(out_eval), ref_eval, rtol=1e-10, atol=1e-12)
        chex.assert_trees_all_close(np.asarray(out_train), ref_train, rtol=1e-10, atol=1e-12)
        stats = convert.flax_to_torch({"batch_stats": upd["batch_stats"]})
        ref_stats = {k: v.numpy() for k, v in tm.state_dict().items() if ".running_" in k}
        stats = {k: v for k, v in stats.items() if ".running_" in k}
        chex.assert_trees_all_close(stats, ref_stats, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["resnet18d", "resnet26t", "resnet50d"])
def test_timm_layout_converts_by_inference_and_computes_the_same_function(arch):
    """timm's names (conv1.0/1/3/4/6, downsample.1/2 after the pool) convert with no model given;
    the result is the same function in eval and train mode at float64 (odd size: ceil-mode pool)."""
    tm = randomize_batchnorm(torch_resnet(arch, num_classes=5, stage_sizes=(1, 2)))
    sd = tm.state_dict()
    timm_names = {"conv1.0.weight", "conv1.1.running_var", "conv1.6.weight", "layer2.0.downsample.1.weight"}
    assert timm_names <= set(sd)
    variables = convert.torch_to_flax(sd)
    model = convert.infer_model(sd)
    assert model == resnet_jax.get_model(arch, num_classes=5, stage_sizes=(1, 2))
    _assert_same_function_float64(tm, model, variables)


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("seresnext26d_32x4d", dict(stage_sizes=(1, 2))),
        ("resnet18", dict(stage_sizes=(1, 1), attn_layer="se")),  # SE on a basic block
    ],
)
def test_squeeze_excite_converts_by_inference_and_computes_the_same_function(arch, overrides):
    """timm's ``layerN.M.se.fc1/fc2`` (1x1 convs with biases) convert with no model given, back to
    the same state_dict, and compute the PyTorch twin's function at float64."""
    tm = randomize_batchnorm(torch_resnet(arch, num_classes=5, **overrides))
    sd = tm.state_dict()
    assert {"layer1.0.se.fc1.weight", "layer1.0.se.fc1.bias", "layer2.0.se.fc2.bias"} <= set(sd)
    variables = convert.torch_to_flax(sd)
    model = convert.infer_model(sd)
    assert model == resnet_jax.get_model(arch, num_classes=5, **overrides)
    _assert_state_dicts_equal(convert.flax_to_torch(variables), sd)
    _assert_same_function_float64(tm, model, variables)


@pytest.mark.parametrize("arch", ["resnet18d", "seresnext26d_32x4d"])
def test_timm_state_dict(arch):
    timm = import_reference("timm")
    tm = randomize_batchnorm(timm.create_model(arch, pretrained=False, num_classes=5))
    variables = convert.torch_to_flax(tm.state_dict())
    model = convert.infer_model(tm.state_dict())
    assert model == resnet_jax.get_model(arch, num_classes=5)
    _assert_same_function_float64(tm, model, variables, size=65)


# The annotated labml ResNet strides only the network's first block and keeps conv biases, so
# block 0 projects its shortcut although its channels do not change.
LABML_CONFIGS = [
    dict(n_blocks=(2, 2), n_channels=(8, 16)),
    dict(n_blocks=(1, 2, 1), n_channels=(8, 16, 32)),
    dict(n_blocks=(1, 1, 1, 1), n_channels=(4, 8, 16, 32)),
    dict(n_blocks=(2, 2), n_channels=(8, 16), bottlenecks=(4, 8)),
    dict(n_blocks=(1, 1, 2), n_channels=(8, 16, 32), bottlenecks=(4, 8, 16)),
    dict(n_blocks=(1, 1, 1, 1), n_channels=(8, 16, 32, 64), bottlenecks=(4, 4, 8, 16)),
]


@pytest.mark.parametrize("cfg", LABML_CONFIGS)
def test_labml_layout_converts_by_inference_with_the_strides_its_weights_imply(cfg):
    strides = (2,) + (1,) * (len(cfg["n_channels"]) - 1)
    tm = randomize_batchnorm(TorchResNetBase(**cfg, strides=strides, conv_bias=True))
    sd = tm.state_dict()
    assert "blocks.0.shortcut.conv.weight" in sd
    variables = convert.torch_to_flax(sd)
    model = convert.infer_model(sd)
    assert model == resnet_jax.ResNetBase(**cfg, strides=strides, conv_bias=True)
    _assert_same_function_float64(tm, model, variables)


def test_stride_shown_by_a_projection_without_channel_change_in_a_later_stage():
    # The default strides (1, 2, 2) with a stage that keeps 16 channels: its projection shows it.
    cfg = dict(n_blocks=(1, 1, 1), n_channels=(8, 16, 16))
    tm = randomize_batchnorm(TorchResNetBase(**cfg))
    model = convert.infer_model(tm.state_dict())
    assert model == resnet_jax.ResNetBase(**cfg)
    _assert_same_function_float64(tm, model, convert.torch_to_flax(tm.state_dict()))


def test_wrong_strides_error_says_strides_are_not_in_the_weights_and_how_to_pass_them():
    sd = TorchResNetBase((2, 2), (8, 16), strides=(2, 1), conv_bias=True).state_dict()
    with pytest.raises(convert.StateDictMismatchError) as e:
        convert.torch_to_flax(sd, resnet_jax.ResNetBase((2, 2), (8, 16), conv_bias=True))
    msg = str(e.value)
    assert "not match ResNetBase(n_blocks=(2, 2), n_channels=(8, 16), strides=(1, 2), conv_bias=True)" in msg
    assert "unexpected keys (6): blocks.0.shortcut.bn.bias" in msg
    assert "cannot be known from the weights" in msg and "ResNetBase(..., strides=...)" in msg
    assert "looks like ResNetBase(n_blocks=(2, 2), n_channels=(8, 16), strides=(2, 1), conv_bias=True)" in msg


def _tiny_sd(num_classes=7, arch="resnet18"):
    return randomize_batchnorm(torch_resnet(arch, num_classes=num_classes, stage_sizes=(1, 1))).state_dict()


def test_new_head_reinitialises_only_fc():
    sd = _tiny_sd(num_classes=7)
    kept = convert.torch_to_flax(sd)
    fresh = convert.torch_to_flax(sd, num_classes=3, rng=1)

    def not_fc(variables):
        flat = jax.tree_util.tree_flatten_with_path(variables)[0]
        return {jax.tree_util.keystr(k): v for k, v in flat if "'fc'" not in jax.tree_util.keystr(k)}

    others, fresh_others = not_fc(kept), not_fc(fresh)
    assert others.keys() == fresh_others.keys()
    for k in others:  # bitwise
        np.testing.assert_array_equal(fresh_others[k], others[k], err_msg=k)
    fc = fresh["params"]["fc"]
    chex.assert_shape((fc["kernel"], fc["bias"]), [(64 * 2, 3), (3,)])
    bound = 1 / np.sqrt(128)  # torch.nn.Linear's init
    assert np.abs(fc["kernel"]).max() <= bound and np.abs(fc["bias"]).max() <= bound
    assert np.abs(fc["kernel"]).std() > bound / 4
    again = convert.torch_to_flax(sd, num_classes=3, rng=1)["params"]["fc"]
    other = convert.torch_to_flax(sd, num_classes=3, rng=2)["params"]["fc"]
    np.testing.assert_array_equal(again["kernel"], fc["kernel"])
    assert not np.array_equal(other["kernel"], fc["kernel"])


def test_new_head_with_an_explicit_model_and_without_a_head():
    sd = _tiny_sd(num_classes=7)
    model = resnet_jax.resnet18(num_classes=3, stage_sizes=(1, 1))
    with pytest.raises(convert.StateDictMismatchError, match=r"fc has 7 classes and the model's 3: pass new"):
        convert.torch_to_flax(sd, model)
    v = convert.torch_to_flax(sd, model, new_head=True)
    assert v["params"]["fc"]["kernel"].shape == (128, 3)
    same = convert.torch_to_flax(sd, model.clone(num_classes=7), new_head=True)  # fresh even if 7 == 7
    assert not np.array_equal(same["params"]["fc"]["kernel"], sd["fc.weight"].numpy().T)
    backbone = convert.torch_to_flax(sd, model.clone(num_classes=None), new_head=True)
    assert "fc" not in backbone["params"]


def _trained_variables(model, size=32):
    """Variables with non-trivial BatchNorm statistics (one train-mode pass)."""
    x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return {"params": variables["params"], "batch_stats": upd["batch_stats"]}


@pytest.mark.parametrize("arch, suffix", [("resnet18", ".pth"), ("resnet18d", ".safetensors")])
def test_export_loads_strictly_into_pytorch_and_predicts_the_same(tmp_path, arch, suffix):
    model = resnet_jax.get_model(arch, num_classes=5, stage_sizes=(1, 1))
    variables = _trained_variables(model)
    path = tmp_path / f"w{suffix}"
    written = convert.save_torch_checkpoint(variables, path, arch=model)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, weights_only=True)
    assert set(sd) == set(written)
    tm = torch_resnet(arch, num_classes=5, stage_sizes=(1, 1))
    tm.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tm.eval()(x).numpy()
    out = np.asarray(model.apply(variables, _nhwc(x), train=False))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-5
    # And back: the file reads as the same numpy state_dict and the same variables, bitwise.
    back = convert.load_torch_checkpoint(path)
    _assert_state_dicts_equal(back, written)
    jax.tree.map(np.testing.assert_array_equal, convert.torch_to_flax(back, model), jax.device_get(variables))


def test_safetensors_both_ways_without_torch(tmp_path, monkeypatch):
    model = resnet_jax.resnet18(num_classes=3, stage_sizes=(1, 1))
    variables = _trained_variables(model)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    path = tmp_path / "w.safetensors"
    convert.save_torch_checkpoint(variables, path)
    back = convert.torch_to_flax(convert.load_torch_checkpoint(path))
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))
    with pytest.raises(ImportError, match="write .safetensors without it"):
        convert.save_torch_checkpoint(variables, tmp_path / "w.pth")
    with pytest.raises(ImportError, match="needs PyTorch"):
        convert.load_torch_checkpoint(tmp_path / "w.pth")


def test_export_checked_against_arch_writes_nothing_on_mismatch(tmp_path):
    variables = _trained_variables(resnet_jax.resnet18(num_classes=3, stage_sizes=(1, 1)))
    path = tmp_path / "w.safetensors"
    with pytest.raises(convert.StateDictMismatchError, match="missing keys"):
        convert.save_torch_checkpoint(variables, path, arch="resnet18")
    with pytest.raises(ValueError, match="must end with .safetensors, .pth or .pt"):
        convert.save_torch_checkpoint(variables, tmp_path / "w.npz")
    assert os.listdir(tmp_path) == []
