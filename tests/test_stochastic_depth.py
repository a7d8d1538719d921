"""Stochastic depth (``drop_path_rate``) and dropout before the classifier (``drop_rate``) against
timm's ``ResNet`` and ``ResNetV2``: timm's per-block rates, timm's forward in training given the
same random draws (ours are recorded and fed to timm's ``DropPath`` and to the dropout), the
identity in evaluation, and one-line errors for rates outside [0, 1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import resnet_jax
from resnet_jax import bridge, convert
from resnet_jax import nnx as rnnx
from resnet_jax.networks import ResNetDef, ResNetV2Def
from resnet_jax.parity import rel
from resnet_jax.torch_reference import import_reference

timm = import_reference("timm")
from timm.layers import DropPath  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck  # noqa: E402
from timm.models.resnet import ResNet as TimmResNet  # noqa: E402
from timm.models.resnetv2 import ResNetV2 as TimmResNetV2  # noqa: E402

WIDTHS = (64, 128, 256, 512)
V2_WIDTHS = (256, 512, 1024, 2048)


def _our_rates(definition) -> list[float]:
    return [block.drop_path_rate for _, blocks in definition.stages() for _, block in blocks]


def _timm_rates(blocks) -> list[float]:
    return [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]


@pytest.mark.parametrize(
    "layers, rate", [((3, 4, 6, 3), 0.05), ((3, 4, 23, 3), 0.1), ((2, 2), 0.3), ((3, 8, 36, 3), 0.2)]
)
def test_drop_path_rates_per_block_equal_timm_resnet_and_resnetv2(layers, rate):
    """Bit for bit: timm's ResNet computes ``rate * k / (n - 1)`` in Python floats, its ResNetV2
    ``torch.linspace`` in float32."""
    with torch.device("meta"):
        tm = TimmResNet(Bottleneck, list(layers), channels=WIDTHS[: len(layers)], drop_path_rate=rate)
        tv2 = TimmResNetV2(list(layers), channels=V2_WIDTHS[: len(layers)], drop_path_rate=rate)
    timm_v1 = _timm_rates(b for i in range(len(layers)) for b in getattr(tm, f"layer{i + 1}"))
    assert _our_rates(ResNetDef(layers, drop_path_rate=rate)) == timm_v1
    timm_v2 = _timm_rates(b for stage in tv2.stages for b in stage.blocks)
    assert _our_rates(ResNetV2Def(layers, channels=V2_WIDTHS, drop_path_rate=rate)) == timm_v2
    assert timm_v1[0] == 0.0 and timm_v1[-1] == pytest.approx(rate)


@pytest.fixture
def draws(monkeypatch):
    """Every ``jax.random.bernoulli`` draw, ``(p, mask)`` in call order; under ``jit`` the masks
    are tracers, which the traced function returns (:func:`_run`)."""
    out = []
    real = jax.random.bernoulli

    def recording(key, p=0.5, shape=None, **kw):
        mask = real(key, p, shape, **kw)
        out.append((p, mask))
        return mask

    monkeypatch.setattr(jax.random, "bernoulli", recording)
    return out


def _replay_in_torch(monkeypatch, draws):
    """Make timm's ``DropPath`` draw our per-example masks (``Tensor.bernoulli_``), and its
    classifier dropout use our mask with ``F.dropout``'s scale 1/(1-p); return timm's keep
    probabilities as they ask."""
    path = [(p, m) for p, m in draws if m.ndim == 4]
    drop = [(p, m) for p, m in draws if m.ndim == 2]
    asked = []

    def bernoulli_(self, p=0.5, **kw):
        asked.append(p)
        self.copy_(torch.from_numpy(path[len(asked) - 1][1].astype(np.float64)).reshape(self.shape))
        return self

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        asked.append(1 - p)
        return x * torch.from_numpy(drop.pop(0)[1].astype(np.float64)).reshape(x.shape) / (1 - p)

    monkeypatch.setattr(torch.Tensor, "bernoulli_", bernoulli_)
    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    return asked


def _randomise_norms(tm):
    with torch.no_grad():  # timm zero-initialises each block's last BN: make every branch count
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return tm


def _timm_model(kind, drop_path_rate, drop_rate):
    torch.manual_seed(0)
    rates = dict(num_classes=7, drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    if kind == "basic":
        tm = TimmResNet(BasicBlock, [2, 1], channels=(64, 128), **rates)
    elif kind == "se_bottleneck":
        tm = TimmResNet(Bottleneck, [2, 1], channels=(64, 128), block_args=dict(attn_layer="se"), **rates)
    else:
        tm = timm.create_model("resnetv2_50", layers=[2, 1], channels=(256, 512), **rates)
    if kind != "preact":  # timm's ResNet.forward_features runs layer1..layer4: two stages here
        tm.layer3 = tm.layer4 = torch.nn.Identity()
    return _randomise_norms(tm).double()


def _ours(tm, **fields):
    sd = tm.state_dict()
    model = convert.infer_model(sd).clone(dtype=jnp.float64, param_dtype=jnp.float64, **fields)
    variables = jax.tree.map(jnp.asarray, convert.torch_to_flax(sd))
    return model, variables


def _nnx(model, variables):
    """The NNX twin with these variables, built abstractly (eager float64 initialisation is
    slow), its dropout streams then seeded."""
    net = nnx.eval_shape(lambda: rnnx.from_linen(model, rngs=nnx.Rngs(0, dropout=0)))
    net = bridge.linen_to_nnx(variables, net)
    nnx.reseed(net, dropout=3)
    return net


X = np.random.default_rng(0).normal(size=(8, 32, 32, 3))
RATES = dict(drop_path_rate=0.6, drop_rate=0.4)


@pytest.mark.parametrize(
    "api, kind",
    [("linen", "basic"), ("linen", "se_bottleneck"), ("linen", "preact"), ("nnx", "se_bottleneck")],
)
def test_train_mode_equals_timm_given_the_same_draws(kind, api, x64, draws, monkeypatch):
    tm = _timm_model(kind, **RATES)
    model, variables = _ours(tm, **RATES)
    if api == "linen":
        apply = functools.partial(model.apply, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
        out, masks = jax.jit(lambda v, x: (apply(v, x)[0], [m for _, m in draws]))(variables, X)
    else:
        net = _nnx(model, variables)
        out, masks = nnx.jit(lambda net, x: (net(x), [m for _, m in draws]))(net, X)
    draws[:] = [(p, np.asarray(m)) for (p, _), m in zip(draws, masks)]
    # Two drop paths (blocks 1 and 2 of 3: rates 0.3, 0.6), then the dropout; some of each dropped.
    assert [m.shape for _, m in draws] == [(8, 1, 1, 1)] * 2 + [(8, model.network().out_channels)]
    assert all(0 < m.sum() < m.size for _, m in draws)
    asked = _replay_in_torch(monkeypatch, draws)
    with torch.no_grad():
        ref = tm.train()(torch.from_numpy(X.transpose(0, 3, 1, 2))).numpy()
    assert asked == [p for p, _ in draws]  # timm's keep probabilities, to the bit
    assert rel(out, ref) < 1e-12


@pytest.mark.parametrize("kind", ["se_bottleneck", "preact"])
def test_eval_mode_is_the_identity(kind, x64, draws):
    tm = _timm_model(kind, **RATES).eval()
    model, variables = _ours(tm, **RATES)
    with torch.no_grad():
        ref = tm(torch.from_numpy(X.transpose(0, 3, 1, 2))).numpy()
    out = jax.jit(functools.partial(model.apply, train=False))(variables, X)
    net = _nnx(model, variables)
    net.eval()
    assert rel(out, ref) < 1e-12 and rel(nnx.jit(lambda net, x: net(x))(net, X), ref) < 1e-12
    assert draws == []


@pytest.mark.parametrize("arch", ["resnet18", "resnetv2_50"])
@pytest.mark.parametrize("field", ["drop_rate", "drop_path_rate"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_rate_outside_unit_interval_is_a_one_line_error(arch, field, value):
    message = f"{field} must be in [0, 1); got {value}."
    small = dict(stage_sizes=(1,)) if arch == "resnet18" else dict(stage_sizes=(1,), channels=(64,))
    with pytest.raises(ValueError) as linen:
        resnet_jax.get_model(arch, **small, **{field: value}).init(
            jax.random.key(0), jnp.ones((1, 32, 32, 3))
        )
    with pytest.raises(ValueError) as nnx_error:
        rnnx.get_model(arch, **small, **{field: value}, rngs=nnx.Rngs(0))
    assert str(linen.value).splitlines()[0] == str(nnx_error.value) == message  # JAX adds a note below


def test_train_step_draws_are_keyed_on_seed_and_step():
    """The training program's step: ``config.model.drop_path_rate`` and ``drop_rate`` reach the
    model, and each step draws from the seed's dropout key folded with the step number, so a
    resumed run draws what the uninterrupted one did."""
    import optax

    from train import build, steps
    from train.config import default_config
    from train.model import build_model

    config = default_config()
    assert build.dropout_rng(config) is None  # off by default: the step passes no RNG
    config.model.arch, config.model.drop_path_rate, config.model.drop_rate = "resnet18", 0.5, 0.5
    model = build_model(config.model, 5, 3)
    assert (model.drop_path_rate, model.drop_rate) == (0.5, 0.5)
    key = build.dropout_rng(config)
    state = jax.jit(steps.create_train_state, static_argnums=(1, 2, 3))(
        jax.random.key(0), model, optax.sgd(0.1), (1, 16, 16, 3)
    )
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32), "label": np.arange(8) % 5}
    step = jax.jit(steps.make_train_step(model, optax.sgd(0.1), dropout_rng=key))
    loss = [float(step(state.replace(step=jnp.int32(k)), batch)[1]["loss"]) for k in (7, 7, 8)]
    apply = functools.partial(model.apply, mutable=["batch_stats"])
    logits, _ = jax.jit(apply)(state.variables, batch["image"], rngs={"dropout": jax.random.fold_in(key, 7)})
    direct = float(jnp.mean(steps.cross_entropy(logits, batch["label"])))
    assert loss[0] == loss[1] != loss[2] and loss[0] == pytest.approx(direct, rel=1e-6)
