"""PyTorch <-> Flax weight conversion: exact round trips, inference of the architecture, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import resnet_jax
from resnet_jax import convert
from resnet_jax.torch_reference import TorchResNetBase, torch_resnet

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
    sd = {
        k: np.zeros(v.shape, np.float32) for k, v in torch_resnet(arch, num_classes=10).state_dict().items()
    }
    model = convert.infer_model(sd)
    assert model == resnet_jax.get_model(arch, num_classes=10)


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
