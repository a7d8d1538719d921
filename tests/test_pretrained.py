"""Named pretrained weights, offline: each test writes its own tiny weight files from the PyTorch
twin, registers them, and puts them where torch.hub and huggingface_hub cache files."""

import hashlib
import io
import os
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import resnet_jax
from resnet_jax import convert, pretrained
from resnet_jax.parity import rel
from resnet_jax.pretrained import Preprocess
from resnet_jax.torch_reference import randomize_batchnorm, torch_resnet

TINY = dict(stage_sizes=(1, 1))


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Empty caches under tmp_path, no network, and a registry each test may change."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "_REGISTRY", dict(pretrained._REGISTRY))
    monkeypatch.setattr(pretrained, "_DEFAULTS", dict(pretrained._DEFAULTS))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", no_network)


def _twin(arch="resnet18", num_classes=10, seed=0):
    """A tiny PyTorch twin with random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batchnorm(torch_resnet(arch, num_classes=num_classes, **TINY), seed).eval()


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_torchvision_style(tm, directory, stem):
    """torch.save to ``directory/stem-<sha256[:8]>.pth``, torchvision's file naming."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "unnamed.pth"
    torch.save(tm.state_dict(), tmp)
    path = directory / f"{stem}-{_sha256(tmp)[:8]}.pth"
    os.replace(tmp, path)
    return path


def _register(name, path_or_file_name, arch="resnet18", num_classes=10, **kwargs):
    file_name = getattr(path_or_file_name, "name", path_or_file_name)
    return pretrained.register(
        name,
        arch,
        url=f"https://example.invalid/models/{file_name}",
        num_classes=num_classes,
        preprocess=Preprocess(40, 32),
        model_kwargs=TINY,
        **kwargs,
    )


def _logits(model, variables, tm, size=32):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tm(x).numpy()
    out = np.asarray(model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False))
    return out, ref


def test_loads_from_the_torch_hub_cache_and_predicts_like_pytorch():
    tm = _twin()
    path = _save_torchvision_style(tm, pretrained.torch_hub_dir(), "tiny")
    _register("tiny.tv_in1k", path)
    model, variables, info = pretrained.load("tiny.tv_in1k", download=False, return_info=True)
    assert info.found_in == "torch hub cache" and info.path == str(path)
    assert not info.new_head and info.num_classes == 10 == model.num_classes
    assert info.weights.preprocess == Preprocess(40, 32)
    out, ref = _logits(model, variables, tm)
    assert rel(out, ref) <= 1e-5


def test_a_file_whose_sha256_does_not_match_its_name_is_rejected():
    tm = _twin()
    good = _save_torchvision_style(tm, pretrained.torch_hub_dir(), "tiny")
    digest = _sha256(good)
    wrong_name = good.with_name("tiny-0badc0de.pth")  # registered with a hash the file does not have
    wrong_name.write_bytes(good.read_bytes())
    _register("tiny.wrong_in1k", wrong_name)
    with pytest.raises(pretrained.HashMismatchError) as e:
        pretrained.load("tiny.wrong_in1k", download=False)
    msg = str(e.value)
    assert str(wrong_name) in msg and "0badc0de" in msg and digest[:16] in msg and "was not used" in msg
    # The right name, but damaged contents (a truncated download), is rejected too.
    _register("tiny.tv_in1k", good)
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(pretrained.HashMismatchError, match=f"must start with {digest[:8]}"):
        pretrained.load("tiny.tv_in1k", download=False)


def test_registered_full_sha256_is_checked_too(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(_twin().state_dict(), path)
    common = dict(file_name="weights.pth", num_classes=10, model_kwargs=TINY)
    pretrained.register("tiny.full", "resnet18", sha256=_sha256(path), **common)
    assert pretrained.load("tiny.full", path=path)[1]["params"]["fc"]["kernel"].shape == (128, 10)
    pretrained.register("tiny.other", "resnet18", sha256="ab" * 32, **common)
    with pytest.raises(pretrained.HashMismatchError):
        pretrained.load("tiny.other", path=tmp_path)  # a directory holding the file


def test_offline_and_not_cached_gives_one_error_naming_file_and_directory():
    _register("tiny.tv_in1k", "tiny-12345678.pth")
    with pytest.raises(pretrained.WeightsNotFoundError) as e:
        pretrained.load("tiny.tv_in1k")
    msg = str(e.value)
    assert "tiny-12345678.pth is not cached and the download failed (URLError" in msg
    url = "https://example.invalid/models/tiny-12345678.pth"
    assert f"Download {url} and put it in {pretrained.torch_hub_dir()}/" in msg
    with pytest.raises(pretrained.WeightsNotFoundError, match=r"downloads are off \(download=False\)"):
        pretrained.load("tiny.tv_in1k", download=False)
    assert not pretrained.torch_hub_dir().exists() or not os.listdir(pretrained.torch_hub_dir())

    pretrained.register("tiny.hub", "resnet18", hf_hub_id="someone/tiny", num_classes=10, model_kwargs=TINY)
    with pytest.raises(pretrained.WeightsNotFoundError) as e:
        pretrained.load("tiny.hub")
    msg = str(e.value)
    snapshot = pretrained.hf_hub_cache_dir() / "models--someone--tiny" / "snapshots" / "main"
    assert "model.safetensors is not cached" in msg and f"put it in {snapshot}/" in msg
    assert "https://huggingface.co/someone/tiny/resolve/main/model.safetensors" in msg


def test_download_is_verified_then_cached(monkeypatch, tmp_path):
    tm = _twin()
    served = _save_torchvision_style(tm, tmp_path / "server", "tiny")
    _register("tiny.tv_in1k", served)
    requested = []

    def serve(url, timeout):
        requested.append(url)
        return io.BytesIO(served.read_bytes())

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", serve)
    model, variables, info = pretrained.load("tiny.tv_in1k", return_info=True)
    assert info.found_in == "download" and requested == [f"https://example.invalid/models/{served.name}"]
    assert (pretrained.torch_hub_dir() / served.name).read_bytes() == served.read_bytes()
    assert pretrained.load("tiny.tv_in1k", return_info=True)[2].found_in == "torch hub cache"
    out, ref = _logits(model, variables, tm)
    assert rel(out, ref) <= 1e-5

    # A download whose bytes do not match the name's hash is discarded, not cached.
    _register("tiny.bad_in1k", "tiny-00000000.pth")
    with pytest.raises(pretrained.HashMismatchError):
        pretrained.load("tiny.bad_in1k")
    assert sorted(os.listdir(pretrained.torch_hub_dir())) == [served.name]


def test_loads_timm_layout_safetensors_from_the_hugging_face_cache():
    tm = _twin("resnet18d")
    snapshot = pretrained.hf_hub_cache_dir() / "models--someone--tiny-d" / "snapshots" / "0123abcd"
    variables = convert.torch_to_flax(tm.state_dict())
    snapshot.mkdir(parents=True)
    model = resnet_jax.resnet18d(num_classes=10, **TINY)
    convert.save_torch_checkpoint(variables, snapshot / "model.safetensors", arch=model)
    (snapshot.parent.parent / "refs").mkdir()  # the cache layout: refs/main -> snapshots/<rev>
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    hub = dict(hf_hub_id="someone/tiny-d", num_classes=10, model_kwargs=TINY)
    pretrained.register("tiny_d.hub", "resnet18d", **hub)
    loaded_model, loaded, info = pretrained.load("tiny_d.hub", download=False, return_info=True)
    assert loaded_model == model
    assert info.found_in == "hugging face cache" and info.path == str(snapshot / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    out, ref = _logits(loaded_model, loaded, tm, size=33)
    assert rel(out, ref) <= 1e-5


def test_new_head_is_fresh_and_every_other_tensor_loads_bitwise():
    tm = _twin()
    path = _save_torchvision_style(tm, pretrained.torch_hub_dir(), "tiny")
    _register("tiny.tv_in1k", path)
    model, variables, info = pretrained.load("tiny.tv_in1k", num_classes=3, download=False, return_info=True)
    assert info.new_head and info.num_classes == 3 == model.num_classes
    sd = {k: v.numpy() for k, v in tm.state_dict().items() if not k.endswith("num_batches_tracked")}
    back = convert.flax_to_torch(variables)
    assert back["fc.weight"].shape == (3, 128) and back["fc.bias"].shape == (3,)
    assert np.abs(back["fc.weight"]).max() <= 1 / np.sqrt(128)  # torch.nn.Linear's init
    others = [k for k in sd if not k.startswith("fc.")]
    assert len(others) == len(sd) - 2
    for k in others:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    logits = model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False)
    assert logits.shape == (1, 3)
    same = pretrained.load("tiny.tv_in1k", num_classes=10, download=False, return_info=True)
    assert not same[2].new_head
    np.testing.assert_array_equal(same[1]["params"]["fc"]["kernel"], sd["fc.weight"].T)


def test_path_argument_file_or_directory(tmp_path):
    tm = _twin()
    _register("tiny.tv_in1k", "tiny-12345678.pth")
    mine = tmp_path / "my_finetune.pth"  # another name: the user's own file, no hash to check
    torch.save(tm.state_dict(), mine)
    model, variables, info = pretrained.load("tiny.tv_in1k", path=mine, return_info=True)
    assert info.found_in == "path"
    out, ref = _logits(model, variables, tm)
    assert rel(out, ref) <= 1e-5
    with pytest.raises(pretrained.WeightsNotFoundError, match="no weights file at .*tiny-12345678.pth"):
        pretrained.load("tiny.tv_in1k", path=tmp_path)
    named = _save_torchvision_style(tm, tmp_path / "dir", "tiny")
    _register("tiny.v2_in1k", named)
    assert pretrained.load("tiny.v2_in1k", path=named.parent, return_info=True)[2].path == str(named)


def test_state_dict_of_another_model_names_the_file_and_what_it_holds(tmp_path):
    other = tmp_path / "r50.pth"
    torch.save(_twin("resnet50").state_dict(), other)
    _register("tiny.tv_in1k", "tiny-12345678.pth")
    with pytest.raises(convert.StateDictMismatchError) as e:
        pretrained.load("tiny.tv_in1k", path=other)
    msg = str(e.value)
    assert f"{other} does not hold the tiny.tv_in1k weights (resnet18)" in msg
    assert "unexpected keys" in msg and "looks like ResNet (stage_sizes=(1, 1), block=bottleneck)" in msg


def test_unknown_name_lists_close_names_and_bare_names_mean_the_default():
    with pytest.raises(pretrained.UnknownWeightsError) as e:
        pretrained.load("resnet50.tv3_in1k")
    assert "no pretrained weights named 'resnet50.tv3_in1k'" in str(e.value)
    assert "resnet50.tv_in1k" in str(e.value) and "resnet50.tv2_in1k" in str(e.value)
    with pytest.raises(pretrained.UnknownWeightsError, match="resnet50d"):
        pretrained.info("renset50d")
    assert pretrained.info("resnet50").name == "resnet50.tv2_in1k"  # torchvision's DEFAULT
    assert pretrained.info("resnet18").name == "resnet18.tv_in1k"
    assert pretrained.info("resnet50d").name == "resnet50d.ra2_in1k"
    with pytest.raises(ValueError, match="already registered"):
        pretrained.register("resnet50.tv_in1k", "resnet50", url="https://example.invalid/x-12345678.pth")
    with pytest.raises(ValueError, match="unknown architecture 'resnet51'"):
        pretrained.register("x", "resnet51", url="https://example.invalid/x.pth")


def test_builtin_entries_carry_torchvision_and_timm_metadata():
    names = pretrained.list_pretrained()
    tv = [n for n in names if ".tv" in n]
    v2 = [n for n in names if n.startswith("resnetv2_")]
    assert len(tv) == 17 and len(names) - len(tv) - len(v2) == 20 and len(v2) == 5
    # Every torchvision architecture with ImageNet weights has them (resnet200 has none).
    assert {pretrained.info(n).arch for n in tv} == set(resnet_jax.TORCHVISION_ARCHS) - {"resnet200"}
    for n in v2:  # timm's ResNetV2 and BiT: Inception normalisation, no quoted top-1
        entry = pretrained.info(n)
        assert entry.arch in resnet_jax.ALL_PRESETS and entry.hf_hub_id == f"timm/{n}" and entry.top1 is None
        assert entry.preprocess.mean == entry.preprocess.std == (0.5, 0.5, 0.5)
        assert entry.num_classes == (21843 if n.endswith("in21k") else 1000)
    for n in set(names) - set(v2):
        entry = pretrained.info(n)
        assert entry.arch in resnet_jax.PRESETS and entry.num_classes == 1000 and entry.top1 > 69
        if n in tv:
            assert entry.url == f"https://download.pytorch.org/models/{entry.file_name}"
            assert len(entry.expected_sha256) == 8 and entry.preprocess.interpolation == "bilinear"
        else:
            assert entry.hf_hub_id == f"timm/{n}" and entry.file_name == "model.safetensors"
            assert entry.preprocess.interpolation == "bicubic"
    v2 = pretrained.info("resnet50.tv2_in1k")
    assert (v2.file_name, v2.top1, v2.preprocess) == ("resnet50-11ad3fa6.pth", 80.858, Preprocess(232, 224))
    v1 = pretrained.info("resnet50.tv_in1k")
    assert (v1.file_name, v1.top1, v1.preprocess) == ("resnet50-0676ba61.pth", 76.13, Preprocess(256, 224))
    d = pretrained.info("resnet50d.ra2_in1k")
    assert (d.top1, d.preprocess) == (81.356, Preprocess(303, 288, "bicubic"))  # crop_pct 0.95
    assert pretrained.list_pretrained("resnet50d*") == ["resnet50d.a1_in1k", "resnet50d.ra2_in1k"]
    se = pretrained.info("seresnext26d_32x4d")  # a bare name: timm's weights for the preset
    assert (se.name, se.top1, se.preprocess) == (
        "seresnext26d_32x4d.bt_in1k",
        78.816,
        Preprocess(303, 288, "bicubic"),
    )
    assert pretrained.info("seresnext101_32x8d").preprocess == Preprocess(288, 288, "bicubic")  # crop_pct 1


def test_preprocess_resizes_the_shorter_side_crops_the_centre_and_normalises():
    # Pixel value = column index: nearest-neighbour resizing by 1/2 keeps source column 2j + 1.
    cols = np.broadcast_to(np.arange(250, dtype=np.uint8)[None, :, None], (100, 250, 3))
    p = Preprocess(resize=50, crop=40, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    x = p(np.ascontiguousarray(cols))
    assert x.shape == (40, 40, 3) and x.dtype == np.float32
    left = 42  # resized to 125x50; the central crop starts at int(round(42.5)), as torchvision
    expected = (2 * (left + np.arange(40)) + 1).astype(np.float32)
    np.testing.assert_allclose(x[:, :, 0] * 255, np.broadcast_to(expected, (40, 40)), rtol=1e-6)
    grey = np.full((50, 70, 3), 128, np.uint8)
    y = Preprocess(40, 32)(grey)
    expected = (128 / 255 - np.array(pretrained.IMAGENET_MEAN)) / np.array(pretrained.IMAGENET_STD)
    np.testing.assert_allclose(y, np.broadcast_to(expected, (32, 32, 3)), rtol=1e-6)
