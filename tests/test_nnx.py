"""resnet_jax.nnx: the Linen models' structure for every preset, their outputs, gradients and
BatchNorm statistics at float64, conversions, and an NNX user's training on 8 fake devices."""

import contextlib
import dataclasses
import functools
import inspect
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

import resnet_jax
from resnet_jax import bridge, convert
from resnet_jax import nnx as rnnx
from resnet_jax.torch_reference import TorchResNetBase, torch_resnet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from float_bounds import float32_bound, rel  # noqa: E402
from sharding_worker import run_in_subprocess  # noqa: E402

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def rngs(seed: int = 0) -> nnx.Rngs:
    # rbg keys: threefry's kernels take seconds to compile on CPU, for every new parameter shape.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def linen_init(model, x):
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl="rbg"), x)


@contextlib.contextmanager
def float64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _linen_abstract(model, size=64):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _shapes(tree):
    return jax.tree.map(lambda v: (tuple(v.shape), jnp.dtype(v.dtype)), tree)


# --------------------------------------------------------------------------------------------
# Structure


@pytest.mark.parametrize("arch", sorted(resnet_jax.PRESETS))
def test_preset_state_tree_equals_linen_and_eval_shape_allocates_nothing(arch):
    abstract = nnx.eval_shape(lambda: getattr(rnnx, arch)(num_classes=10, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert leaves and all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    linen = _linen_abstract(getattr(resnet_jax, arch)(num_classes=10))
    assert _shapes(convert.nnx_to_linen(abstract)) == _shapes(linen)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_classes=None),
        dict(small_stem=True, img_channels=1),
        dict(dtype=jnp.bfloat16),
        dict(zero_init_residual=True, bn_variance="two_pass"),
    ],
)
def test_preset_overrides_give_the_linen_state_tree(overrides):
    for arch in ("resnet18", "resnext50_32x4d"):
        fields = {"num_classes": 5, **overrides}
        abstract = nnx.eval_shape(lambda arch=arch, f=fields: rnnx.get_model(arch, rngs=nnx.Rngs(0), **f))
        linen_model = resnet_jax.get_model(arch, **fields)
        x = jax.ShapeDtypeStruct((1, 32, 32, linen_model.img_channels), jnp.float32)
        linen = jax.eval_shape(functools.partial(linen_model.init, jax.random.key(0), train=False), x)
        assert _shapes(convert.nnx_to_linen(abstract)) == _shapes(linen)
        # bfloat16 compute, float32 parameters and statistics
        assert {v.dtype for v in jax.tree.leaves(nnx.state(abstract))} == {jnp.dtype(jnp.float32)}


def test_state_paths_are_pytorch_module_paths():
    model = nnx.eval_shape(lambda: rnnx.resnet50(rngs=nnx.Rngs(0)))
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    torch_keys = {k for k in torch_resnet("resnet50").state_dict() if not k.endswith("num_batches_tracked")}
    leaf = {
        "kernel": "weight",
        "scale": "weight",
        "bias": "bias",
        "mean": "running_mean",
        "var": "running_var",
    }
    assert {p.rsplit(".", 1)[0] + "." + leaf[p.rsplit(".", 1)[1]] for p in paths} == torch_keys
    assert "layer2.0.downsample.1.mean" in paths and "layer4.2.conv3.kernel" in paths
    seed = nnx.eval_shape(lambda: rnnx.ResNetBase([2, 1], [8, 16], bottlenecks=[4, 8], rngs=nnx.Rngs(0)))
    seed_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(seed))}
    assert {"conv.kernel", "bn.var", "blocks.2.shortcut.conv.kernel", "blocks.1.conv3.kernel"} <= seed_paths
    assert not any(p.startswith("blocks.0.shortcut") for p in seed_paths)  # identity shortcut


def test_nnx_module_imports_no_linen_module():
    """resnet_jax.nnx builds from the shared definitions (blocks, networks, layers), which know
    neither API; it imports no Linen module, and Linen <-> NNX variables live in bridge.py."""
    import ast

    tree = ast.parse(open(rnnx.__file__).read())
    imported = set()
    for node in tree.body:  # module level: what importing resnet_jax.nnx runs
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnet_jax"):
            imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("resnet_jax")}
    assert imported and not any(m.split(".")[1] in ("models", "bridge") for m in imported if "." in m)
    for shared in ("blocks", "networks", "layers", "presets"):  # API-neutral: no Linen module either
        source = open(rnnx.__file__.replace("nnx.py", f"{shared}.py")).read()
        assert "flax.linen" not in source and "from flax import linen" not in source, shared
    assert rnnx.from_linen is bridge.from_linen and rnnx.to_linen is bridge.to_linen  # still importable


def test_fields_and_defaults_equal_the_linen_modules():
    required = object()

    def nnx_params(cls, extra=()):
        sig = inspect.signature(cls.__init__).parameters
        return {
            k: required if p.default is inspect.Parameter.empty else p.default
            for k, p in sig.items()
            if k not in ("self", "rngs", *extra)
        }

    def linen_fields(cls):
        return {
            k: required if f.default is dataclasses.MISSING else f.default
            for k, f in cls.__dataclass_fields__.items()
            if k not in ("parent", "name")
        }

    def same(a, b):
        return a.keys() == b.keys() and all(
            a[k] is b[k] or a[k] == b[k] or (callable(a[k]) and callable(b[k])) for k in a
        )

    assert same(nnx_params(rnnx.ResNet), linen_fields(resnet_jax.ResNet))
    assert same(nnx_params(rnnx.ResNetBase), linen_fields(resnet_jax.ResNetBase))
    # NNX builds eagerly, so blocks also take their input channels and BatchNorm its features.
    for name in ("ResidualBlock", "BottleneckResidualBlock", "ShortcutProjection"):
        n, lin = nnx_params(getattr(rnnx, name), ("in_channels",)), linen_fields(getattr(resnet_jax, name))
        assert n.keys() == lin.keys(), name
    bn = nnx_params(rnnx.BatchNorm, ("num_features", "use_running_average"))
    assert same(bn, linen_fields(resnet_jax.BatchNorm))
    assert rnnx.PRESETS is resnet_jax.PRESETS
    assert all(callable(getattr(rnnx, arch)) for arch in resnet_jax.PRESETS)
    linen = resnet_jax.resnext50_32x4d(num_classes=3, small_stem=True)
    assert rnnx.to_linen(nnx.eval_shape(lambda: rnnx.from_linen(linen, rngs=nnx.Rngs(0)))) == linen


def test_train_and_eval_switch_every_batchnorm():
    model = rnnx.ResNet(stage_sizes=(1, 1), block="basic", num_classes=3, rngs=rngs(0))
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, rnnx.BatchNorm)]
    assert len(bns) == 1 + 2 + 3  # stem, two blocks, one projection
    assert not any(bn.use_running_average for bn in bns)  # new models train, as in PyTorch
    model.eval()
    assert all(bn.use_running_average for bn in bns)
    model.train()
    assert not any(bn.use_running_average for bn in bns)


def test_features_num_classes_none_and_zero_init_residual():
    model = rnnx.resnet18(num_classes=None, zero_init_residual=True, rngs=rngs(0))
    model.eval()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    feats = model.features(x)
    assert [feats[k].shape for k in ("stem", "layer1", "layer2", "layer3", "layer4")] == [
        (2, 8, 8, 64),
        (2, 8, 8, 64),
        (2, 4, 4, 128),
        (2, 2, 2, 256),
        (2, 1, 1, 512),
    ]
    assert model.fc is None
    chex.assert_trees_all_close(model(x), feats["layer4"].mean(axis=(1, 2)), rtol=1e-6)
    assert all(
        float(jnp.abs(b.bn2.scale[...]).max()) == 0.0 for layer in (model.layer1, model.layer4) for b in layer
    )
    assert float(model.layer1[0].bn1.scale[...].min()) == 1.0


@pytest.mark.parametrize(
    "shape, match",
    [((32, 32, 3), "rank 4"), ((2, 3, 32, 32), "NCHW"), ((2, 32, 32, 1), "img_channels=1")],
)
def test_bad_input_shape_gives_clear_error(shape, match):
    model = rnnx.ResNetBase([1], [8], rngs=rngs(0))
    with pytest.raises(ValueError, match=match):
        model(jnp.zeros(shape))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="unknown architecture 'resnet51'.*resnet50"):
        rnnx.get_model("resnet51", rngs=rngs(0))
    with pytest.raises(TypeError, match="unknown ResNet field"):
        rnnx.resnet50(widht_per_group=3, rngs=rngs(0))
    with pytest.raises(ValueError, match="block must be 'basic' or 'bottleneck'"):
        rnnx.ResNet(stage_sizes=(1,), block="basics", rngs=rngs(0))
    with pytest.raises(ValueError, match="one entry per stage"):
        rnnx.ResNetBase([1, 1], [8], rngs=rngs(0))
    with pytest.raises(ValueError, match="'two_pass' or 'shifted'"):
        rnnx.BatchNorm(4, variance="welford", rngs=rngs(0))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        rnnx.BatchNorm(4, rngs=rngs(0))(jnp.ones((1, 1, 1, 4)))
    with pytest.raises(TypeError, match="ResNet or ResNetBase"):
        rnnx.from_linen(resnet_jax.BatchNorm(), rngs=rngs(0))


# --------------------------------------------------------------------------------------------
# Numerics: NNX == Linen at float64 (outputs, features, gradients, BatchNorm statistics)


def _reduced(arch, **overrides):
    """A preset's block configuration with two one-block stages, in float64."""
    fields = {**resnet_jax.PRESETS[arch], "stage_sizes": (1, 1), "num_classes": 5, **overrides}
    return functools.partial(resnet_jax.ResNet, **fields, **F64)


def _preset_groups():
    """The presets grouped by everything but their depth: each group is one configuration of
    blocks and stem, which two one-block stages exercise completely. The SE presets are one
    group, run as the one with the most options (SE on grouped convs, deep stem, avg_down): their
    other options are the plain presets' and have their own groups. Each group's first member
    has the most fields."""
    groups: dict = {}
    for arch, fields in resnet_jax.PRESETS.items():
        key = tuple(sorted((k, v) for k, v in fields.items() if k != "stage_sizes"))
        if fields.get("attn_layer"):
            key = (("attn_layer", fields["attn_layer"]),)
        groups.setdefault(key, []).append(arch)
    return [sorted(archs, key=lambda a: -len(resnet_jax.PRESETS[a])) for archs in groups.values()]


# The speed options that leave values unchanged, folded into groups so they cost no extra compile.
_OPTIONS = {
    "resnet18d": dict(bn_recompute=True),
    "resnet26t": dict(stem_pad_channels=8, bn_variance="shifted"),
}

# Every preset (reduced to two one-block stages), the small stem, and labml.ai's ResNetBase.
NUMERIC_CONFIGS = [
    *(
        pytest.param(_reduced(archs[0], **_OPTIONS.get(archs[0], {})), id=",".join(archs))
        for archs in _preset_groups()
    ),
    pytest.param(
        _reduced("resnet18", small_stem=True, zero_init_residual=True, bn_variance="shifted"),
        id="resnet18-small-stem-zero-init-shifted",
    ),
    pytest.param(functools.partial(resnet_jax.ResNetBase, (2, 1), (8, 16), **F64), id="resnetbase-basic"),
    pytest.param(
        functools.partial(
            resnet_jax.ResNetBase,
            (1, 2),
            (8, 16),
            bottlenecks=(4, 8),
            strides=(2, 1),
            conv_bias=True,
            first_kernel_size=3,
            **F64,
        ),
        id="resnetbase-labml-bottleneck",
    ),
]


def _nontrivial(variables, seed=1):
    """BatchNorm affine and statistics like a trained network's, so eval differs from train."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, v in traverse_util.flatten_dict(variables).items():
        v = np.asarray(v)
        if path[-1] == "mean":
            v = 0.2 * rng.normal(size=v.shape)
        elif path[-1] == "var":
            v = rng.uniform(0.5, 2.0, v.shape)
        elif path[-1] in ("scale", "bias"):
            v = v + 0.1 * rng.normal(size=v.shape)
        out[path] = jnp.asarray(v.astype(variables_dtype(variables)))
    return traverse_util.unflatten_dict(out)


def variables_dtype(variables):
    return jax.tree.leaves(variables)[0].dtype


@pytest.mark.parametrize("make_linen", NUMERIC_CONFIGS)
def test_nnx_equals_linen_at_float64(make_linen):
    with float64():
        linen = make_linen()
        x = jnp.asarray(np.random.default_rng(0).normal(0.5, 2.0, (4, 16, 16, 3)))
        variables = _nontrivial(linen_init(linen, x))
        # Built abstractly and filled with the Linen variables: no random init to compute.
        model = convert.linen_to_nnx(
            variables, nnx.eval_shape(lambda: rnnx.from_linen(linen, rngs=nnx.Rngs(2)))
        )
        model.eval()
        eval_def, state = nnx.split(model)
        model.train()
        train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

        # One compiled function per configuration: both APIs, eval and train, forward and backward.
        @jax.jit
        def run(variables, state, params, stats, x):
            linen_eval = linen.apply(variables, x, train=False)
            linen_feats = linen.apply(variables, x, train=False, method="features")
            nnx_model = nnx.merge(eval_def, state)
            nnx_eval, nnx_feats = nnx_model(x), nnx_model.features(x)

            def linen_loss(p):
                out, upd = linen.apply(
                    {"params": p, "batch_stats": variables["batch_stats"]},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.sum(jnp.sin(out)), (out, upd["batch_stats"])

            def nnx_loss(m):
                out = m(x)
                return jnp.sum(jnp.sin(out)), out

            ref = jax.value_and_grad(linen_loss, has_aux=True)(variables["params"])
            m = nnx.merge(train_def, params, stats)
            (loss, out), grads = nnx.value_and_grad(nnx_loss, has_aux=True)(m)
            got = (loss, (out, nnx.state(m, nnx.BatchStat))), grads
            return (linen_eval, linen_feats, ref), (nnx_eval, nnx_feats, got)

        (
            (l_eval, l_feats, ((l_loss, (l_out, l_stats)), l_grads)),
            (n_eval, n_feats, ((n_loss, (n_out, n_stats)), n_grads)),
        ) = run(variables, state, params, stats, x)
        assert l_out.dtype == jnp.float64
        tight = dict(rtol=1e-12, atol=1e-12)
        chex.assert_trees_all_close(n_eval, l_eval, **tight)
        chex.assert_trees_all_close(n_feats, l_feats, **tight)
        chex.assert_trees_all_close((n_loss, n_out), (l_loss, l_out), **tight)
        chex.assert_trees_all_close(convert.nnx_to_linen(n_grads)["params"], l_grads, **tight)
        chex.assert_trees_all_close(convert.nnx_to_linen(n_stats)["batch_stats"], l_stats, **tight)
        # The statistics moved, and the gradients are not trivially zero.
        stem = "bn1" if "bn1" in l_stats else "bn"
        assert not np.allclose(l_stats[stem]["var"], variables["batch_stats"][stem]["var"])
        first_conv = next(k for k in ("conv1", "conv1_0", "conv") if k in l_grads)  # stem kinds
        assert float(jnp.abs(l_grads[first_conv]["kernel"]).max()) > 1e-3


def test_eager_calls_match_linen_and_only_train_mode_updates_statistics():
    with float64():
        linen = _reduced("resnet50")()
        x = jnp.asarray(np.random.default_rng(0).normal(0.5, 2.0, (4, 16, 16, 3)))
        variables = _nontrivial(linen_init(linen, x))
        model = convert.linen_to_nnx(
            variables, nnx.eval_shape(lambda: rnnx.from_linen(linen, rngs=nnx.Rngs(0)))
        )
        tight = dict(rtol=1e-12, atol=1e-12)
        model.eval()
        chex.assert_trees_all_close(model(x), linen.apply(variables, x, train=False), **tight)
        chex.assert_trees_all_equal(convert.nnx_to_linen(model), variables)  # eval changed nothing
        model.train()
        out = model(x)
        ref, upd = linen.apply(variables, x, train=True, mutable=["batch_stats"])
        chex.assert_trees_all_close(out, ref, **tight)
        chex.assert_trees_all_close(convert.nnx_to_linen(model)["batch_stats"], upd["batch_stats"], **tight)


@pytest.mark.parametrize("variance", ["shifted", "two_pass"])
def test_batchnorm_matches_torch_at_float64(variance):
    """Two train steps (the second with a non-zero running mean as the shift), then eval."""
    with float64():
        rng = np.random.default_rng(0)
        xs = [rng.normal(3.0, 2.0, (4, 5, 5, 6)) for _ in range(3)]
        bn = rnnx.BatchNorm(6, variance=variance, rngs=rngs(0), **F64)
        tbn = torch.nn.BatchNorm2d(6).double()
        nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))  # noqa: E731
        for x in xs[:2]:
            y = bn(jnp.asarray(x))
            ty = tbn(nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
            chex.assert_trees_all_close(y, ty, rtol=1e-12, atol=1e-12)
            chex.assert_trees_all_close(bn.mean[...], tbn.running_mean.numpy(), rtol=1e-12, atol=1e-12)
            chex.assert_trees_all_close(bn.var[...], tbn.running_var.numpy(), rtol=1e-12, atol=1e-12)
        # independent closed form of the first update: 0.1 * mean, 0.9 + 0.1 * unbiased variance
        first = rnnx.BatchNorm(6, variance=variance, rngs=rngs(0), **F64)
        first(jnp.asarray(xs[0]))
        flat = xs[0].reshape(-1, 6)
        chex.assert_trees_all_close(first.mean[...], 0.1 * flat.mean(0), rtol=1e-12)
        chex.assert_trees_all_close(first.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-12)
        bn.eval()
        tbn.eval()
        before = (np.asarray(bn.mean[...]), np.asarray(bn.var[...]))
        y = bn(jnp.asarray(xs[2]))
        chex.assert_trees_all_close(y, tbn(nchw(xs[2])).detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12)
        chex.assert_trees_all_equal((bn.mean[...], bn.var[...]), before)


def test_bfloat16_compute_float32_params_and_logits():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    f32 = rnnx.ResNet(stage_sizes=(1, 1), block="basic", num_classes=4, rngs=rngs(0))
    bf16 = rnnx.ResNet(stage_sizes=(1, 1), block="basic", num_classes=4, dtype=jnp.bfloat16, rngs=rngs(0))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype(jnp.float32)}
    nnx.update(bf16, nnx.state(f32))
    f32.eval()
    bf16.eval()
    assert bf16.features(x)["layer2"].dtype == jnp.bfloat16
    logits, ref = bf16(x), f32(x)
    assert logits.dtype == jnp.float32
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 5e-2  # bfloat16 has an 8-bit mantissa: close, but not equal


# --------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_torch_to_nnx_infers_the_model_and_round_trips_exactly(arch):
    tm = torch_resnet(arch, num_classes=7)
    sd = tm.state_dict()
    model = convert.torch_to_nnx(sd)  # architecture inferred, built with nnx.eval_shape
    assert isinstance(model, rnnx.ResNet) and model.num_classes == 7
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(model)))
    np.testing.assert_array_equal(
        model.layer1[0].conv1.kernel[...], sd["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(model.fc.kernel[...], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(
        model.layer2[0].downsample[1].var[...], sd["layer2.0.downsample.1.running_var"].numpy()
    )
    back = convert.nnx_to_torch(model)
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_torch_to_nnx_into_a_given_model_and_by_preset_name():
    sd = torch_resnet("resnet18", num_classes=3).state_dict()
    model = rnnx.resnet18(num_classes=3, rngs=rngs(0))
    assert convert.torch_to_nnx(sd, model) is model
    np.testing.assert_array_equal(model.bn1.scale[...], sd["bn1.weight"].numpy())
    named = convert.torch_to_nnx(sd, "resnet18")
    chex.assert_trees_all_equal(nnx.state(named), nnx.state(model))
    assert convert.torch_to_flax(sd, model).keys() == {"params", "batch_stats"}  # checked against NNX


def test_seed_state_dict_into_nnx_resnetbase():
    cfg = dict(n_blocks=(1, 2), n_channels=(8, 16), bottlenecks=(4, 8), conv_bias=True)
    tm = TorchResNetBase(**cfg)
    sd = tm.state_dict()
    model = convert.torch_to_nnx(sd, rnnx.ResNetBase(**cfg, rngs=rngs(0)))
    np.testing.assert_array_equal(
        model.blocks[1].shortcut.conv.bias[...], sd["blocks.1.shortcut.conv.bias"].numpy()
    )
    back = convert.nnx_to_torch(model)
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_linen_nnx_round_trips_are_exact_both_ways():
    linen = resnet_jax.ResNet(stage_sizes=(1, 2), groups=2, width_per_group=8, num_classes=3)
    variables = _nontrivial(linen_init(linen, jnp.zeros((1, 32, 32, 3))))
    model = convert.linen_to_nnx(variables, rnnx.from_linen(linen, rngs=rngs(5)))
    chex.assert_trees_all_equal(convert.nnx_to_linen(model), variables)
    other = rnnx.from_linen(linen, rngs=rngs(6))
    source = rnnx.from_linen(linen, rngs=rngs(7))
    assert not np.array_equal(other.conv1.kernel[...], source.conv1.kernel[...])
    convert.linen_to_nnx(convert.nnx_to_linen(source), other)
    chex.assert_trees_all_equal(nnx.state(other), nnx.state(source))


def test_mismatched_variables_list_every_offending_key_and_write_nothing():
    linen = resnet_jax.ResNet(stage_sizes=(1, 1), block="basic", num_classes=4)
    variables = linen_init(linen, jnp.zeros((1, 32, 32, 3)))
    model = rnnx.ResNet(stage_sizes=(2, 1), block="basic", num_classes=5, rngs=rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(convert.StateDictMismatchError) as e:
        convert.linen_to_nnx(variables, model)
    msg = str(e.value)
    assert "NNX ResNet (stage_sizes=(2, 1), block=basic)" in msg
    assert "missing keys (10): batch_stats/layer1_1/bn1/mean, batch_stats/layer1_1/bn1/var" in msg
    assert "params/layer1_1/conv2/kernel" in msg
    assert "wrong shapes (2): params/fc/bias: got (4,), expected (5,), params/fc/kernel: got (128, 4)" in msg
    assert "unexpected" not in msg
    chex.assert_trees_all_equal(nnx.state(model), before)
    abstract18 = nnx.eval_shape(lambda: rnnx.resnet18(rngs=nnx.Rngs(0)))
    with pytest.raises(convert.StateDictMismatchError, match="looks like ResNet \\(resnet50\\)"):
        convert.torch_to_nnx(torch_resnet("resnet50").state_dict(), abstract18)
    with pytest.raises(TypeError, match="NNX module"):
        convert.nnx_to_linen(linen)


# --------------------------------------------------------------------------------------------
# An NNX user's training step on 8 fake CPU devices (subprocess: the device count is fixed when
# JAX starts)


@pytest.fixture(scope="module")
def nnx_user(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("nnx_user") / "out.npz")
    run_in_subprocess("nnx_user", out, devices=8)
    return dict(np.load(out))


def test_nnx_optimizer_train_step_on_8_devices_lowers_the_loss(nnx_user):
    assert int(nnx_user["devices"]) == 8
    losses = nnx_user["losses"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert np.sum(np.diff(losses) < 0) >= 6, losses
    # data parallel: replicated parameters and gradients, logits sharded along the batch
    assert all("data" not in s for s in nnx_user["param_specs"])
    assert all("data" not in s for s in nnx_user["grad_specs"])
    assert str(nnx_user["eval_logits_spec"]) == "P('data', None)"


def test_nnx_training_updates_batchnorm_statistics_like_torch(nnx_user):
    stats0 = {k.split("|", 1)[1]: v for k, v in nnx_user.items() if k.startswith("stats0|")}
    stats1 = {k.split("|", 1)[1]: v for k, v in nnx_user.items() if k.startswith("stats1|")}
    assert stats0.keys() == stats1.keys() and len(stats0) == 2 * 6  # mean and var of 6 BatchNorms
    assert all(not np.array_equal(stats0[k], stats1[k]) for k in stats0)
    # Independent reference for the stem's first update: the bfloat16 conv on one device, then
    # PyTorch's rule in float64: 0.9 * old + 0.1 * batch mean / unbiased batch variance. The
    # sharded bfloat16 conv may round a few outputs the other way: within 1e-4, or twice the
    # reference's own bfloat16 error against the same conv in float64.
    x, kernel = nnx_user["x"], nnx_user["conv1_init"]

    def stem_update(dtype):
        y = jax.lax.conv_general_dilated(
            jnp.asarray(x, dtype),
            jnp.asarray(kernel, dtype),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        flat = np.asarray(y, np.float64).reshape(-1, kernel.shape[-1])
        return 0.1 * flat.mean(0), 0.9 + 0.1 * flat.var(0, ddof=1)

    ref = stem_update(jnp.bfloat16)
    with jax.enable_x64(True):
        exact = stem_update(jnp.float64)
    for got, want, want64 in zip((nnx_user["bn1_mean_step1"], nnx_user["bn1_var_step1"]), ref, exact):
        assert rel(got, want) <= float32_bound(rel(want, want64), 1e-4), (rel(got, want), rel(want, want64))


def test_nnx_eval_mode_mutates_nothing_and_dtypes_stay_float32(nnx_user):
    stats1 = {k.split("|", 1)[1]: v for k, v in nnx_user.items() if k.startswith("stats1|")}
    stats2 = {k.split("|", 1)[1]: v for k, v in nnx_user.items() if k.startswith("stats2|")}
    chex.assert_trees_all_equal(stats2, stats1)
    np.testing.assert_array_equal(nnx_user["eval_logits"], nnx_user["eval_again"])
    assert list(nnx_user["param_dtypes"]) == ["float32"]
    assert list(nnx_user["opt_dtypes"]) == ["float32"]
    assert str(nnx_user["feature_dtype"]) == "bfloat16"
    assert str(nnx_user["train_logits_dtype"]) == str(nnx_user["eval_logits_dtype"]) == "float32"
