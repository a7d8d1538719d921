"""Architecture, state, dtype and input-validation behaviour of the Flax modules."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import resnet_jax
from resnet_jax import BatchNorm, ResNetBase
from resnet_jax.torch_reference import TorchResNetBase, torch_resnet

# Published parameter counts of torchvision.models (and resnet200 from He et al. 2016, as timm).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnet200": 64_673_832,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
}


# timm's published parameter counts in millions (results/results-imagenet.csv, param_count).
TIMM_PARAMS_M = {
    "resnet18d": 11.71,
    "resnet34d": 21.82,
    "resnet26d": 16.01,
    "resnet26t": 16.01,
    "resnet50d": 25.58,
    "resnet101d": 44.57,
    "resnet152d": 60.21,
    "resnet200d": 64.69,
    "seresnet50": 28.09,
    "seresnext50_32x4d": 27.56,
    "seresnext101_32x8d": 93.57,
    "seresnext26d_32x4d": 16.81,
}


def _abstract_init(model, shape=(1, 224, 224, 3)):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_preset_parameter_count_equals_torchvision(arch):
    variables = _abstract_init(getattr(resnet_jax, arch)())
    assert _count(variables["params"]) == TORCHVISION_PARAMS[arch]
    with torch.device("meta"):  # shapes only: no 60M-parameter random init
        assert _count(variables["params"]) == sum(p.numel() for p in torch_resnet(arch).parameters())


@pytest.mark.parametrize("arch", sorted(TIMM_PARAMS_M))
def test_timm_preset_parameter_count_equals_timm(arch):
    n = _count(_abstract_init(getattr(resnet_jax, arch)())["params"])
    assert round(n / 1e6, 2) == TIMM_PARAMS_M[arch]
    with torch.device("meta"):
        assert n == sum(p.numel() for p in torch_resnet(arch).parameters())


def test_deep_and_tiered_stems_have_timm_widths_and_names():
    for arch, widths in (("resnet50d", (32, 32, 64)), ("resnet50t", (24, 32, 64))):
        params = _abstract_init(getattr(resnet_jax, arch)())["params"]
        assert [params[f"conv1_{i}"]["kernel"].shape[-1] for i in (0, 3, 6)] == list(widths)
        assert params["conv1_0"]["kernel"].shape == (3, 3, 3, widths[0])
        assert set(params["layer2_0"]) >= {"downsample_1", "downsample_2"}
        assert "downsample_0" not in params["layer2_0"]
        assert params["layer2_0"]["downsample_1"]["kernel"].shape == (1, 1, 256, 512)


def test_squeeze_excite_has_timm_names_widths_and_place():
    """``layerN_M/se/fc1|fc2`` 1x1 convs with biases, reduced to make_divisible(C / 16, 8) as
    timm's SEModule (at least 8, nearest multiple, halves up), applied after the last BN."""
    params = _abstract_init(resnet_jax.seresnet50(), (1, 64, 64, 3))["params"]
    se = params["layer4_2"]["se"]
    assert jax.tree.map(lambda a: a.shape, se) == {
        "fc1": {"kernel": (1, 1, 2048, 128), "bias": (128,)},
        "fc2": {"kernel": (1, 1, 128, 2048), "bias": (2048,)},
    }
    assert params["layer1_0"]["se"]["fc1"]["kernel"].shape == (1, 1, 256, 16)
    assert "se" not in _abstract_init(resnet_jax.resnet50(), (1, 64, 64, 3))["params"]["layer1_0"]
    # 64 / 16 = 4 -> 8 (the floor); 200 / 16 = 12.5 -> 16; 120 / 16 = 7.5 -> 8; 2048 -> 128.
    from resnet_jax.blocks import se_channels

    assert [se_channels(c) for c in (64, 200, 120, 2048, 392)] == [8, 16, 8, 128, 24]
    with pytest.raises(ValueError, match="attn_layer must be '' or 'se'"):
        resnet_jax.resnet18(attn_layer="eca").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_stem_options_are_validated():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="stem_type must be"):
        resnet_jax.resnet18(stem_type="wide").init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="cannot be combined with stem_type"):
        resnet_jax.resnet18d(small_stem=True).init(jax.random.key(0), x, train=False)


def _init(model, x, seed=0):
    """``model.init`` under ``jax.jit``: one program, where an eager init compiles every op and
    every parameter shape's random kernel on its own."""
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)


def _filled(model, x, seed=0):
    """Variables of ``model`` for input ``x``, random but without running its init: the shapes
    from ``jax.eval_shape``, the values from NumPy (variances positive). Calling a deep model's
    init eagerly compiles each of its ops on its own (about 140 small programs for a ResNet-50)."""
    rng = np.random.default_rng(seed)
    shapes = _abstract_init(model, x.shape)
    fill = lambda path, s: (  # noqa: E731
        rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var" else 0.1 * rng.normal(size=s.shape)
    ).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_resnet50_feature_maps_are_c2_to_c5():
    model = resnet_jax.resnet50(num_classes=None)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
    variables = _filled(model, x)
    run = jax.jit(
        lambda v, x: (model.apply(v, x, train=False, method="features"), model.apply(v, x, train=False))
    )
    feats, pooled = run(variables, x)
    chex.assert_shape(feats["stem"], (2, 16, 16, 64))
    chex.assert_shape(feats["layer1"], (2, 16, 16, 256))
    chex.assert_shape(feats["layer2"], (2, 8, 8, 512))
    chex.assert_shape(feats["layer3"], (2, 4, 4, 1024))
    chex.assert_shape(feats["layer4"], (2, 2, 2, 2048))
    chex.assert_trees_all_close(pooled, feats["layer4"].mean(axis=(1, 2)), rtol=1e-6)
    assert "fc" not in variables["params"]


def test_small_stem_keeps_resolution_and_has_no_maxpool():
    model = resnet_jax.resnet18(num_classes=10, small_stem=True)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = _abstract_init(model, x.shape)
    chex.assert_shape(variables["params"]["conv1"]["kernel"], (3, 3, 3, 64))
    feats = jax.eval_shape(functools.partial(model.apply, train=False, method="features"), variables, x)
    chex.assert_shape(feats["stem"], (2, 32, 32, 64))
    chex.assert_shape(feats["layer4"], (2, 4, 4, 512))


def test_resnetbase_default_strides_and_output_shape():
    model = ResNetBase(n_blocks=(1, 1, 1), n_channels=(8, 16, 32), img_channels=1, first_kernel_size=3)
    x = jnp.zeros((3, 16, 16, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    feats = model.apply(variables, x, train=False, method="features")
    # stem /2, first stage stride 1, then /2 per stage
    assert [feats[k].shape[1] for k in ("stem", "stage1", "stage2", "stage3")] == [8, 8, 4, 2]
    chex.assert_shape(model.apply(variables, x, train=False), (3, 32))


def test_resnetbase_labml_strides_only_first_block():
    model = ResNetBase(n_blocks=(1, 1), n_channels=(8, 16), strides=(2, 1), conv_bias=True)
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    feats = model.apply(variables, x, train=False, method="features")
    assert [feats[k].shape[1] for k in ("stem", "stage1", "stage2")] == [16, 8, 8]
    assert "bias" in variables["params"]["conv"]
    assert "bias" in variables["params"]["blocks_0"]["shortcut"]["conv"]


def test_batch_stats_only_in_their_collection_and_eval_needs_no_mutable():
    model = resnet_jax.resnet18(num_classes=5)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = _init(model, x)
    assert set(variables) == {"params", "batch_stats"}
    leaf_names = {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])}
    assert leaf_names == {"mean", "var"}
    passes = jax.jit(
        lambda v, x: (model.apply(v, x, train=False), model.apply(v, x, train=True, mutable=["batch_stats"]))
    )
    eval_logits, (logits, updates) = passes(variables, x)
    chex.assert_shape(eval_logits, (4, 5))
    chex.assert_shape(logits, (4, 5))
    old = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], old)


def test_bfloat16_compute_with_float32_params():
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    f32 = resnet_jax.resnet18(num_classes=10)
    bf16 = resnet_jax.resnet18(num_classes=10, dtype=jnp.bfloat16)
    variables = _init(f32, x)
    bf_vars = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(bf_vars))
    passes = jax.jit(
        lambda v, x: (
            bf16.apply(v, x, train=False, method="features"),
            bf16.apply(v, x, train=False),
            f32.apply(v, x, train=False),
        )
    )
    feats, logits, ref = passes(variables, x)
    assert feats["layer3"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 5e-2  # bfloat16 has an 8-bit mantissa: close, but not equal


def test_kaiming_fan_out_and_torch_linear_init():
    # ResNet-50 with one block per stage: its layer4_0.conv2 and fc are the preset's.
    model = resnet_jax.resnet50(num_classes=1000).clone(stage_sizes=(1, 1, 1, 1))
    variables = _init(model, jnp.zeros((1, 32, 32, 3)))
    kernel = variables["params"]["layer4_0"]["conv2"]["kernel"]  # 3x3x512x512
    fan_out = 3 * 3 * 512
    np.testing.assert_allclose(float(jnp.std(kernel)), np.sqrt(2.0 / fan_out), rtol=0.02)
    fc = variables["params"]["fc"]
    bound = 1 / np.sqrt(2048)
    assert float(jnp.max(jnp.abs(fc["kernel"]))) <= bound
    assert float(jnp.max(jnp.abs(fc["bias"]))) <= bound
    np.testing.assert_allclose(float(jnp.std(fc["kernel"])), bound / np.sqrt(3), rtol=0.02)
    assert float(jnp.min(variables["params"]["layer1_0"]["bn3"]["scale"])) == 1.0


def test_zero_init_residual_zeroes_last_bn_of_each_branch():
    for arch, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        model = getattr(resnet_jax, arch)(zero_init_residual=True).clone(stage_sizes=(1, 2))  # its blocks
        params = _init(model, jnp.zeros((1, 32, 32, 3)))["params"]
        blocks = [k for k in params if k.startswith("layer")]
        assert all(float(jnp.abs(params[b][last]["scale"]).max()) == 0.0 for b in blocks)
        assert float(params["layer1_0"]["bn1"]["scale"].min()) == 1.0


@pytest.mark.parametrize(
    "shape, match",
    [
        ((32, 32, 3), "rank 4"),
        ((2, 3, 32, 32), "NCHW"),
        ((2, 32, 32, 1), "img_channels=1"),
    ],
)
def test_bad_input_shape_gives_clear_error(shape, match):
    model = resnet_jax.resnet18()
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def test_unknown_architecture_and_bad_config_errors():
    with pytest.raises(ValueError, match="unknown architecture 'resnet51'.*resnet50"):
        resnet_jax.get_model("resnet51")
    with pytest.raises(TypeError, match="unknown ResNet field"):
        resnet_jax.resnet50(widht_per_group=3)
    bad = ResNetBase(n_blocks=(1, 1), n_channels=(8,))
    with pytest.raises(ValueError, match="one entry per stage"):
        bad.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    bad = ResNetBase(n_blocks=(1, 1), n_channels=(8, 16), bottlenecks=(4,))
    with pytest.raises(ValueError, match="bottlenecks"):
        bad.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


def test_batchnorm_matches_torch_running_update_including_unbiased_variance():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 5, 6))
    bn = BatchNorm(dtype=jnp.float32)
    variables = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
    y, upd = bn.apply(variables, jnp.asarray(x, jnp.float32), train=True, mutable=["batch_stats"])
    tbn = torch.nn.BatchNorm2d(6)
    ty = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5)
    # independent closed form: 0.9 * 1 + 0.1 * unbiased variance
    expected = 0.9 + 0.1 * x.reshape(-1, 6).var(axis=0, ddof=1)
    np.testing.assert_allclose(upd["batch_stats"]["var"], expected, rtol=1e-5)


def test_batchnorm_axis_name_synchronises_statistics_across_shards():
    x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, (8, 4, 4, 3)), jnp.float32)
    model = resnet_jax.resnet18(num_classes=4)
    variables = _filled(model, x)
    synced = model.clone(axis_name="batch")
    shards = x.reshape(4, 2, *x.shape[1:])

    @jax.jit  # one program for the three passes (run eagerly, each op would compile alone)
    def passes(variables, x, shards):
        full = model.apply(variables, x, train=True, mutable=["batch_stats"])
        apply = functools.partial(synced.apply, train=True, mutable=["batch_stats"])
        sharded = jax.vmap(apply, in_axes=(None, 0), axis_name="batch")(variables, shards)
        # without the axis name each shard normalises alone, which differs
        local = jax.vmap(
            functools.partial(model.apply, train=True, mutable=["batch_stats"]), in_axes=(None, 0)
        )
        return full, sharded, local(variables, shards)

    (full, full_upd), (out, upd), (out_local, _) = passes(variables, x, shards)
    chex.assert_trees_all_close(out.reshape(full.shape), full, rtol=2e-4, atol=2e-5)
    first = jax.tree.map(lambda a: a[0], upd)
    chex.assert_trees_all_close(first, full_upd, rtol=2e-4, atol=1e-5)
    assert not np.allclose(out_local.reshape(full.shape), full, atol=1e-3)


def test_train_mode_batch_of_one_pixel_is_rejected():
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.zeros((1, 1, 1, 4)), train=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.apply(variables, jnp.zeros((1, 1, 1, 4)), train=True, mutable=["batch_stats"])


def test_seed_reference_matches_blocks_names():
    """The PyTorch seed model and ResNetBase have the same parameter names modulo '.N' -> '_N'."""
    from flax import traverse_util

    kw = dict(n_blocks=(2, 1), n_channels=(8, 16), bottlenecks=(4, 8), conv_bias=True)
    tm = TorchResNetBase(**kw)
    variables = ResNetBase(**kw).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    flax_names = {"/".join(k[1:-1]) for k in traverse_util.flatten_dict(variables)}
    torch_names = {
        k.rsplit(".", 1)[0].replace(".", "/").replace("blocks/", "blocks_") for k in tm.state_dict()
    }
    assert flax_names == torch_names


def test_speed_options_leave_values_unchanged_at_float64():
    """The one-pass 'shifted' variance is the two-pass value, and the recomputed BatchNorm
    and the channel-padded stem change nothing: logits, gradients and running statistics over
    three SGD steps (the shift is non-zero from the second) at float64."""
    jax.config.update("jax_enable_x64", True)
    try:
        x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (4, 12, 12, 3)), jnp.float64)
        labels = jnp.arange(4) % 5
        runs = {}
        variants = {
            "shifted": dict(bn_variance="shifted", stem_pad_channels=0),
            "two_pass": dict(bn_variance="two_pass", stem_pad_channels=0),
            "recompute_pad8": dict(bn_recompute=True, stem_pad_channels=8),
        }
        for variant, options in variants.items():
            model = resnet_jax.ResNet(
                stage_sizes=[1, 1],
                block="bottleneck",
                num_classes=5,
                dtype=jnp.float64,
                param_dtype=jnp.float64,
                **options,
            )
            variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)

            def loss_fn(params, stats, model=model):
                logits, upd = model.apply(
                    {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
                return loss, (logits, upd["batch_stats"])

            @jax.jit  # compiled once per variant (eagerly, each op would compile alone)
            def step(params, stats, loss_fn=loss_fn):
                grads, (logits, stats) = jax.grad(loss_fn, has_aux=True)(params, stats)
                return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), (logits, grads, stats)

            params, stats, trace = variables["params"], variables["batch_stats"], []
            for _ in range(3):
                params, record = step(params, stats)
                stats = record[2]
                trace.append(record)
            runs[variant] = trace
        assert jax.tree.leaves(runs["shifted"])[0].dtype == jnp.float64
        for other in ("two_pass", "recompute_pad8"):
            for a, b in zip(runs["shifted"], runs[other]):
                chex.assert_trees_all_close(a, b, rtol=1e-12, atol=1e-12)
        # the running mean (the shift) really moved away from zero
        assert float(jnp.max(jnp.abs(runs["shifted"][0][2]["bn1"]["mean"]))) > 0.1
    finally:
        jax.config.update("jax_enable_x64", False)


def test_shifted_variance_float32_error_once_the_running_mean_tracks():
    """Mean 1000, std 1: with the running mean near the batch mean the one-pass variance is as
    accurate in float32 as the two-pass one (both bounded by float32 rounding of x itself)."""
    x64 = np.random.default_rng(1).normal(1000.0, 1.0, (16, 6, 6, 4))
    truth = x64.reshape(-1, 4).var(axis=0, ddof=1)
    x = jnp.asarray(x64, jnp.float32)
    errs = {}
    for variance in ("shifted", "two_pass"):
        bn = BatchNorm(variance=variance)
        variables = bn.init(jax.random.key(0), x, train=False)
        stats = {"mean": jnp.full((4,), 999.7, jnp.float32), "var": jnp.zeros((4,), jnp.float32)}
        _, upd = bn.apply({**variables, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        errs[variance] = float(np.max(np.abs(np.asarray(upd["batch_stats"]["var"]) / 0.1 - truth) / truth))
    # float32 spacing at 1000 is 6e-5 (relative 6e-8): both land within 1e-4 of the exact value
    assert errs["two_pass"] < 1e-4 and errs["shifted"] < 1e-4, errs


def test_unknown_batchnorm_variance_is_refused():
    bn = BatchNorm(variance="welford")
    with pytest.raises(ValueError, match="'two_pass' or 'shifted'"):
        bn.init(jax.random.key(0), jnp.ones((2, 2, 2, 3)), train=True)


def test_channel_padded_stem_keeps_the_parameter_and_pads_inside():
    model = resnet_jax.resnet18(num_classes=3, stage_sizes=[1], stem_pad_channels=8)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
    plain = resnet_jax.resnet18(num_classes=3, stage_sizes=[1], stem_pad_channels=0)
    chex.assert_trees_all_equal_shapes(variables, plain.init(jax.random.key(0), x, train=False))
    hlo = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()
    assert "7x7x8x64" in hlo  # the convolution really runs on 8 input channels


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (1, 8, 7, 2), (2, 28, 27, 4)])
def test_max_pool_with_elementwise_backward_is_the_max_pool(shape):
    """``ops.max_pool_3x3_elementwise`` (the GPU experiment) against XLA's max-pool gradient and
    PyTorch's ``MaxPool2d(3, 2, 1)`` backward, at float64, on post-ReLU inputs full of ties
    (whole windows of zeros): the same values, and each window's gradient on the same pixel."""
    from resnet_jax import ops

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(sum(shape))
        x = np.maximum(rng.integers(-2, 3, shape), 0).astype(np.float64)
        y = np.asarray(ops.max_pool_3x3(x))
        g = rng.normal(size=y.shape)
        y_new, vjp = jax.vjp(ops.max_pool_3x3_elementwise, jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(g))
        assert dx.dtype == jnp.float64 and np.array_equal(np.asarray(y_new), y)
        (dx_xla,) = jax.vjp(ops.max_pool_3x3, jnp.asarray(x))[1](jnp.asarray(g))
        # Ties go to the same pixel; only the order in which up to four overlapping windows add
        # into one pixel may differ (a few float64 ulps).
        np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_xla), rtol=1e-13, atol=1e-13)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(True)
        yt = torch.nn.MaxPool2d(3, 2, 1)(xt)
        yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2)))
        np.testing.assert_array_equal(yt.detach().numpy().transpose(0, 2, 3, 1), y)
        dx_torch = xt.grad.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(dx), dx_torch, rtol=1e-13, atol=1e-13)
        # Ties were really there (a wrong tie rule would move whole gradients, O(1) apart), and
        # every window's gradient landed on exactly one pixel.
        assert (x == 0).mean() > 0.4
        assert np.count_nonzero(np.asarray(dx)) <= g.size and np.asarray(dx).sum() == pytest.approx(g.sum())
        # The CPU's max-pool (ops.max_pool_3x3_first_max, a custom JVP): the same gradient in
        # reverse mode, and PyTorch's forward-mode derivative of MaxPool2d in forward mode.
        y_jvp, vjp = jax.vjp(ops.max_pool_3x3_first_max, jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(y_jvp), y)
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_torch, rtol=1e-13, atol=1e-13)
        t = rng.normal(size=shape)
        _, ty = jax.jvp(ops.max_pool_3x3_first_max, (jnp.asarray(x),), (jnp.asarray(t),))
        _, ty_torch = torch.func.jvp(
            torch.nn.MaxPool2d(3, 2, 1),
            (torch.from_numpy(x.transpose(0, 3, 1, 2)),),
            (torch.from_numpy(t.transpose(0, 3, 1, 2)),),
        )
        np.testing.assert_array_equal(np.asarray(ty), ty_torch.numpy().transpose(0, 2, 3, 1))
    finally:
        jax.config.update("jax_enable_x64", False)


def test_cpu_max_pool_derivative_is_elementwise_and_others_keep_xlas(monkeypatch):
    """On the CPU backend ``ops.max_pool_3x3`` differentiates through the first-max selects (no
    ``select_and_scatter``); a program exported for a TPU keeps XLA's; the switch restores it."""
    from resnet_jax import conv_grad, ops

    x = jnp.ones((2, 8, 8, 3))

    def grad_hlo(export_for=None):
        fn = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool_3x3(x) ** 2)))
        if export_for:
            return jax.export.export(fn, platforms=[export_for])(x).mlir_module()
        return fn.lower(x).as_text()

    assert "select_and_scatter" not in grad_hlo()
    assert "select_and_scatter" in grad_hlo("tpu")
    monkeypatch.setenv(conv_grad.ENV_VAR, "0")
    assert "select_and_scatter" in grad_hlo()


def _bn_args(rng, shape, residual: bool):
    c = shape[-1]
    x = rng.normal(2.0, 3.0, shape)
    scale, bias = rng.normal(1.0, 0.5, c), rng.normal(0.0, 0.5, c)
    ra_mean, ra_var = rng.normal(1.5, 0.5, c), rng.uniform(5.0, 12.0, c)
    res = rng.normal(0.0, 2.0, shape) if residual else None
    return x, scale, bias, ra_mean, ra_var, res


@pytest.mark.parametrize(
    "relu,residual,variance,devices",
    [
        (True, True, "two_pass", 0),
        (True, False, "two_pass", 0),
        (False, False, "shifted", 0),
        (False, True, "two_pass", 0),
        (True, True, "shifted", 3),  # synchronised over a vmap axis, as under pmap
    ],
)
def test_fused_batch_norm_is_batch_norm(relu, residual, variance, devices):
    """``batchnorm.batch_norm(fused=True)`` (one custom VJP with BatchNorm's closed-form backward, the
    GPU experiment) against the same call unfused (autodiff of the separate ops), at float64: the
    output, the running statistics and the gradients of x, scale, bias and the residual."""
    from resnet_jax import batchnorm

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(7 + devices)
        shape = (devices, 2, 5, 4, 6) if devices else (3, 5, 4, 6)
        x, scale, bias, ra_mean, ra_var, res = _bn_args(rng, shape, residual)
        if devices:  # per-channel parameters are replicated over the devices
            ra_mean, ra_var = np.broadcast_to(ra_mean, (devices, 6)), np.broadcast_to(ra_var, (devices, 6))
            scale, bias = np.broadcast_to(scale, (devices, 6)), np.broadcast_to(bias, (devices, 6))
        g = rng.normal(size=shape)
        axis = "batch" if devices else None

        def one(x, scale, bias, res, ra_mean, ra_var, g, fused):
            def f(x, scale, bias, res):
                return batchnorm.batch_norm(
                    x, scale, bias, ra_mean, ra_var, train=True, variance=variance,
                    axis_name=axis, residual=res, relu=relu, fused=fused,
                )  # fmt: skip

            (y, m, v), vjp = jax.vjp(f, x, scale, bias, res)
            return (y, m, v), vjp((g, jnp.zeros_like(m), jnp.zeros_like(v)))

        def run(fused):
            args, fn = (x, scale, bias, res, ra_mean, ra_var, g), functools.partial(one, fused=fused)
            return jax.vmap(fn, axis_name="batch")(*args) if devices else fn(*args)

        (y0, m0, v0), grads0 = run(False)
        (y1, m1, v1), grads1 = run(True)
        assert y1.dtype == jnp.float64
        np.testing.assert_allclose(y1, y0, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(m1, m0, rtol=1e-13)
        np.testing.assert_allclose(v1, v0, rtol=1e-13)
        for name, a, b in zip(("x", "scale", "bias", "residual"), grads1, grads0):
            if b is None:
                assert a is None, name
                continue
            # Reductions add in another order: a few float64 ulps of the largest entry.
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11 * np.abs(b).max(), err_msg=name)
        if relu:
            assert (np.asarray(y0) == 0).mean() > 0.1  # the ReLU's mask was really exercised
    finally:
        jax.config.update("jax_enable_x64", False)


def test_fused_batch_norm_matches_torch_and_carries_statistic_gradients():
    """The fused BatchNorm + add + ReLU against PyTorch's ``relu(BatchNorm2d(x) + r)`` autograd at
    float64, and the custom VJP's cotangents for the batch mean and variance (zero in training,
    where they only feed the running statistics) against autodiff of the unfused moments."""
    from resnet_jax import batchnorm

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(3)
        x, scale, bias, ra_mean, ra_var, res = _bn_args(rng, (4, 3, 5, 8), True)
        g = rng.normal(size=x.shape)
        f = functools.partial(batchnorm.batch_norm, train=True, relu=True, fused=True)
        step = lambda x, s, b, r: f(x, s, b, ra_mean, ra_var, residual=r)  # noqa: E731
        (y, new_mean, new_var), vjp = jax.vjp(step, x, scale, bias, res)
        dx, dscale, dbias, dres = vjp((g, jnp.zeros(8), jnp.zeros(8)))

        bn = torch.nn.BatchNorm2d(8, momentum=0.1, eps=1e-5).double()
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(scale))
            bn.bias.copy_(torch.from_numpy(bias))
            bn.running_mean.copy_(torch.from_numpy(ra_mean))
            bn.running_var.copy_(torch.from_numpy(ra_var))
        nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).requires_grad_(True)  # noqa: E731
        xt, rt = nchw(x), nchw(res)
        yt = torch.relu(bn(xt) + rt)
        yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
        nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
        np.testing.assert_allclose(y, nhwc(yt), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(new_mean, bn.running_mean.numpy(), rtol=1e-13)
        np.testing.assert_allclose(new_var, bn.running_var.numpy(), rtol=1e-13)
        np.testing.assert_allclose(dx, nhwc(xt.grad), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dres, nhwc(rt.grad), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dscale, bn.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(dbias, bn.bias.grad.numpy(), rtol=1e-10)

        # Non-zero cotangents for the batch mean and variance outputs of the custom VJP.
        def unfused(x, scale, bias, r):
            mean, var, _ = batchnorm._batch_moments(x, jnp.asarray(ra_mean), "two_pass", None)
            y = batchnorm._add_relu(batchnorm._normalize(x, mean, var, scale, bias, 1e-5, x.dtype), r, True)
            return y, mean, var

        fused = lambda *a: batchnorm._bn_train_fused(
            *a, jnp.asarray(ra_mean), 1e-5, True, "two_pass", None, x.dtype
        )  # noqa: E731
        cts = (g, rng.normal(size=8), rng.normal(size=8))
        want = jax.vjp(unfused, x, scale, bias, res)[1](cts)
        got = jax.vjp(fused, x, scale, bias, res)[1](cts)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11 * np.abs(b).max())
    finally:
        jax.config.update("jax_enable_x64", False)


def test_fused_batch_norm_model_is_the_model():
    """``bn_fused=True`` changes no value: a small Linen ResNet and its NNX twin, fused and
    unfused, at float64: logits, running statistics and every parameter's gradient. Its blocks
    fold each kind of ending: ReLU alone (deep stem, inner convs), an identity shortcut, and an
    average-pooled projection (plain BatchNorm)."""
    from flax import nnx

    from resnet_jax import nnx as rnnx

    fields = dict(stage_sizes=(1, 1), block="basic", stem_type="deep", avg_down=True)
    jax.config.update("jax_enable_x64", True)
    try:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)))
        labels = jnp.array([1, 3])
        out = {}
        for fused in (False, True):
            model = resnet_jax.ResNet(
                num_classes=5, bn_fused=fused, dtype=jnp.float64, param_dtype=jnp.float64, **fields
            )
            variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)

            def loss(params, model=model, variables=variables):
                logits, upd = model.apply(
                    {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
                )
                nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
                return nll, (logits, upd)

            (_, (logits, upd)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
            out[fused] = (logits, upd["batch_stats"], grads)

            nmodel = rnnx.ResNet(
                num_classes=5,
                bn_fused=fused,
                dtype=jnp.float64,
                param_dtype=jnp.float64,
                rngs=nnx.Rngs(0),
                **fields,
            )
            nmodel.train()

            def nloss(m):
                return -jnp.take_along_axis(jax.nn.log_softmax(m(x)), labels[:, None], 1).mean()

            nloss_value, ngrads = nnx.jit(nnx.value_and_grad(nloss))(nmodel)
            out["nnx", fused] = (nloss_value, nnx.state(nmodel, nnx.BatchStat), ngrads)
        for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        for a, b in zip(jax.tree.leaves(out["nnx", True]), jax.tree.leaves(out["nnx", False]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_fused_batch_norm_rejects_what_it_cannot_fold():
    from resnet_jax import batchnorm

    x, ones = jnp.ones((2, 3, 3, 4)), jnp.ones(4)
    with pytest.raises(ValueError, match="folds in only a ReLU"):
        BatchNorm(fused=True).init_with_output(jax.random.key(0), x, True, None, jax.nn.gelu)
    with pytest.raises(ValueError, match="exclude each other"):
        batchnorm.batch_norm(x, ones, ones, ones, ones, train=True, fused=True, recompute=True)
