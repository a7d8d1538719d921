"""The PyTorch side of ``python -m train.parity``: a config's recipe written as a PyTorch user
writes it, from PyTorch's, timm's and torchvision's own components.

Each ingredient is one entry of a small table, keyed by the config value that selects it:
``OPTIMIZERS`` (``torch.optim.SGD``/``AdamW``, timm's ``Lamb``, and LARS as the MLPerf reference
computes it, transcribed below because PyTorch has no LARS), ``SCHEDULES`` (timm's or
torchvision's schedulers: ``train/parity_schedules.py``), ``LOSSES``
(``torch.nn.CrossEntropyLoss(label_smoothing=)``, timm's ``SoftTargetCrossEntropy`` and
``BinaryCrossEntropy``). A new ingredient is a few lines here and its field in
``train/parity.py``'s ``CHECKED`` list.

The random draws are this program's, given to the PyTorch components: each step's mixup/cutmix
draws (``train/mixup.py``'s ``lam``, switch and box) replace the draws of timm's ``Mixup``
(its ``_params_per_*`` and, for the box, the ``np.random.randint`` that timm's ``rand_bbox``
calls), so timm's own code mixes the batch and its targets; each step's drop-path and dropout
masks replace ``Tensor.bernoulli_`` in timm's ``drop_path`` and ``F.dropout`` in timm's head,
so timm's own ``DropPath`` scales and applies them. Nothing is redrawn on the PyTorch side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from resnet_jax.torch_reference import import_reference
from train import parity_schedules

# ---------------------------------------------------------------------------------------------
# The model: torchvision's or timm's, with the config's model fields.

# config.model.overrides that the PyTorch model follows (the rest are refused by train.parity):
# the two that change its layout, and those that change only how our side computes or
# initialises (the weights are copied from our side, so the initialisation does not matter).
MODEL_OVERRIDES = (
    "stage_sizes",
    "small_stem",
    "zero_init_residual",
    "bn_variance",
    "bn_recompute",
    "bn_fused",
)
_WIDTHS = (64, 128, 256, 512)


def pick_reference(config: Any, channels: int, reference: str = "auto") -> str:
    """``'torchvision'`` where torchvision has the arch and the config needs nothing of timm's
    (drop path, dropout, fewer than 4 stages, other input channels), else ``'timm'``."""
    torchvision = import_reference("torchvision")
    stages = config.model.overrides.get("stage_sizes")
    timm_only = (
        config.model.drop_rate
        or config.model.drop_path_rate
        or channels != 3
        or (stages is not None and len(stages) != 4)
    )
    has_it = hasattr(torchvision.models, config.model.arch)
    if reference == "torchvision" and (timm_only or not has_it):
        raise ValueError(
            f"--reference=torchvision: torchvision builds no such model ({config.model.arch}; it has no "
            f"drop path or dropout, only 3 input channels and 4 stages); use --reference=timm or auto."
        )
    if reference != "auto":
        return reference
    return "torchvision" if has_it and not timm_only else "timm"


def build_model(config: Any, num_classes: int, channels: int, reference: str) -> torch.nn.Module:
    """The float64 PyTorch twin of ``config.model``, from ``reference``'s own model builder."""
    arch, overrides = config.model.arch, dict(config.model.overrides or {})
    stages = tuple(overrides.get("stage_sizes", ()))
    if reference == "torchvision":
        torchvision = import_reference("torchvision")
        kwargs = {"layers": list(stages)} if stages else {}
        if stages:  # torchvision builds a preset's block with other stage sizes through ResNet
            block = getattr(torchvision.models, arch)(weights=None).layer1[0].__class__
            model = torchvision.models.resnet.ResNet(block, num_classes=num_classes, **kwargs)
        else:
            model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    else:
        timm = import_reference("timm")
        kwargs: dict[str, Any] = dict(
            num_classes=num_classes,
            in_chans=channels,
            drop_rate=float(config.model.drop_rate),
            drop_path_rate=float(config.model.drop_path_rate),
        )
        if stages:
            kwargs.update(layers=list(stages), channels=_WIDTHS[: len(stages)])
        model = timm.create_model(arch, pretrained=False, **kwargs)
        for i in range(len(stages) + 1, 5) if stages else ():  # timm's forward runs layer1..layer4
            setattr(model, f"layer{i}", torch.nn.Identity())
    if overrides.get("small_stem"):  # resnet_jax's: a 3x3 stride-1 conv, no max pool
        model.conv1 = torch.nn.Conv2d(channels, model.bn1.num_features, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model.double()


def load_weights(model: torch.nn.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Our initial weights, converted to PyTorch's names (``resnet_jax.convert``); strict, so a
    model of another layout is refused rather than half loaded."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)).clone() for k, v in state_dict.items()})


# ---------------------------------------------------------------------------------------------
# Optimizers: parameter groups as timm builds them (no weight decay on BatchNorm and biases
# unless the config says so), then the optimizer the config names.


def param_groups(model: torch.nn.Module, config: Any) -> list[dict]:
    """The trained parameters (``requires_grad``) in groups split as timm's
    ``param_groups_weight_decay`` splits them (1-d parameters and biases apart), the split group
    undecayed unless ``weight_decay_on_bn_and_bias``; with ``backbone_lr_multiplier`` the
    backbone's groups (all but ``fc``) get that multiple of the rate (``lr_scale``)."""
    wd, multiplier = float(config.weight_decay), float(config.backbone_lr_multiplier)
    out = []
    for part in ("head", "backbone"):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("fc.") == (part == "head")]
        holder = types.SimpleNamespace(named_parameters=lambda named=named: iter(named))
        # weight 1 marks the decayed group: timm puts everything in one group at weight 0.
        for group in import_reference("timm.optim").param_groups_weight_decay(holder, weight_decay=1.0):
            decayed = bool(group["weight_decay"]) or bool(config.weight_decay_on_bn_and_bias)
            out.append(
                {
                    "params": group["params"],
                    "weight_decay": wd if decayed else 0.0,
                    "decayed": decayed,  # MLPerf's LARS scales only these by the trust ratio
                    "lr_scale": multiplier if part == "backbone" else 1.0,
                }
            )
    return out


class MLPerfLARS(torch.optim.Optimizer):
    """A transcription into PyTorch of the LARS that MLPerf's ResNet-50 reference trains with
    (TensorFlow's ``LARSOptimizer``, MLPerf ``lars_optimizer.py``): PyTorch and timm ship none
    that computes it. Per tensor outside the skip list (here: BatchNorm parameters and biases,
    unless the config decays them), the trust ratio is ``eeta * |w| / (|g| + wd * |w| + eps)``
    (1 where ``|w|`` or ``|g|`` is 0), the gradient gets ``wd * w`` added, and
    ``v = momentum * v + lr * trust * g``; ``w -= v`` (Nesterov: ``w -= lr * trust * g +
    momentum * v``). Skipped tensors take plain momentum SGD at ``lr``."""

    def __init__(self, params, lr: float, momentum: float, eeta: float, epsilon: float, nesterov: bool):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, eeta=eeta, epsilon=epsilon, nesterov=nesterov)
        )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            wd, m = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, scaled_lr = p.grad, group["lr"]
                if group["decayed"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = group["eeta"] * w_norm / (g_norm + wd * w_norm + group["epsilon"])
                    trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    scaled_lr = scaled_lr * trust
                    g = g + wd * p
                step = g * scaled_lr
                v = self.state[p].setdefault("momentum", torch.zeros_like(p))
                v.mul_(m).add_(step)
                p.sub_(step + m * v if group["nesterov"] else v)


def _sgd(config: Any, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    momentum = float(config.momentum)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(config.nesterov) and momentum > 0)


def _adamw(config: Any, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    b1, b2 = (float(b) for b in config.opt_betas)
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=float(config.opt_eps))


def _lars(config: Any, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    return MLPerfLARS(
        groups,
        lr=lr,
        momentum=float(config.momentum),
        eeta=float(config.lars_trust_coefficient),
        epsilon=float(config.lars_eps),
        nesterov=bool(config.nesterov),
    )


def _lamb(config: Any, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """timm's own ``Lamb``: its global-norm clipping at ``lamb_max_grad_norm`` (None: off) and,
    for ``lambc``, its ``trust_clip``; the trust ratio only on the decayed group, as timm's
    ``always_adapt=False`` does."""
    b1, b2 = (float(b) for b in config.opt_betas)
    return import_reference("timm.optim").Lamb(
        groups,
        lr=lr,
        betas=(b1, b2),
        eps=float(config.opt_eps),
        max_grad_norm=float(config.lamb_max_grad_norm) or None,
        trust_clip=config.optimizer == "lambc",
    )


OPTIMIZERS: dict[str, Callable[[Any, list[dict], float], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
    "lars": _lars,
    "lamb": _lamb,
    "lambc": _lamb,
}


def make_optimizer(model: torch.nn.Module, config: Any, peak_lr: float) -> torch.optim.Optimizer:
    """The config's optimizer over :func:`param_groups`. A group's ``lr_scale`` is timm's: its
    schedulers set that group's rate to the scheduled rate times ``lr_scale``."""
    return OPTIMIZERS[config.optimizer](config, param_groups(model, config), peak_lr)


# ---------------------------------------------------------------------------------------------
# Schedules: timm's or torchvision's, configured from the config's fields (train/parity_schedules.py).

SCHEDULES = ("cosine", "polynomial", "constant", "step")


def make_scheduler(opt: torch.optim.Optimizer, config: Any, steps_per_epoch: int, total_steps: int):
    """The config's schedule, already at step 0's rates; ``.after(n)`` after update ``n``."""
    return parity_schedules.make(opt, config, steps_per_epoch, total_steps)


# ---------------------------------------------------------------------------------------------
# Losses: on int labels, or on mixup's soft targets (already smoothed by timm's mixup_target,
# as timm's train.py then picks SoftTargetCrossEntropy, or BCE without smoothing).


def _softmax(config: Any, mixed: bool):
    if mixed:
        return import_reference("timm.loss").SoftTargetCrossEntropy()
    return torch.nn.CrossEntropyLoss(label_smoothing=float(config.label_smoothing))


def _bce(config: Any, mixed: bool):
    return import_reference("timm.loss").BinaryCrossEntropy(
        smoothing=0.0 if mixed else float(config.label_smoothing),
        target_threshold=float(config.bce_target_threshold) or None,
        sum_classes=bool(config.bce_sum),
    )


LOSSES = {"softmax": _softmax, "bce": _bce}


# ---------------------------------------------------------------------------------------------
# Our draws, given to timm's components.


def make_mixup(config: Any, num_classes: int):
    """timm's ``Mixup`` with the config's fields (timm's flag names), or None when off."""
    minmax = tuple(float(v) for v in config.cutmix_minmax) or None
    if (config.mixup_alpha <= 0 and config.cutmix_alpha <= 0 and not minmax) or config.mixup_prob <= 0:
        return None
    return import_reference("timm.data").Mixup(
        mixup_alpha=float(config.mixup_alpha),
        cutmix_alpha=float(config.cutmix_alpha),
        cutmix_minmax=minmax,
        prob=float(config.mixup_prob),
        switch_prob=float(config.mixup_switch_prob),
        mode=str(config.mixup_mode),
        correct_lam=bool(config.correct_lam),
        label_smoothing=float(config.label_smoothing),
        num_classes=num_classes,
    )


class _NumpyGivingBoxes:
    """numpy for timm's ``mixup`` module, whose ``np.random.randint`` (the cutmix box: centre,
    or size and corner) returns our draws in the order timm asks for them."""

    def __init__(self, queue: list[int]):
        self.queue = queue
        self.random = types.SimpleNamespace(randint=lambda low, high=None, size=None: self.queue.pop(0))

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def mix(mixup, draws: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor):
    """timm's ``Mixup(x, y)`` with our step's draws (``lam``, ``use_cutmix``, ``cy``, ``cx``,
    ``cut_h``, ``cut_w``, one per batch, pair or row as ``mixup_mode`` says)."""
    lam, cut = np.asarray(draws["lam"], np.float64), np.asarray(draws["use_cutmix"], bool)
    mixup._params_per_batch = lambda: (float(lam[0]), bool(cut[0]))
    mixup._params_per_elem = lambda n: (lam[:n].copy(), cut[:n].copy())
    sized = mixup.cutmix_minmax is not None
    fields = ("cut_h", "cut_w", "cy", "cx") if sized else ("cy", "cx")
    queue = [int(draws[f][i]) for i in range(len(lam)) if lam[i] != 1.0 and cut[i] for f in fields]
    timm_mixup = import_reference("timm.data.mixup")
    shim = _NumpyGivingBoxes(queue)
    real, timm_mixup.np = timm_mixup.np, shim
    try:
        x, target = mixup(x, y)
    finally:
        timm_mixup.np = real
    if shim.queue:
        raise RuntimeError(f"timm's Mixup left {len(shim.queue)} of our box draws unused")
    return x, target


@dataclasses.dataclass
class Masks:
    """One step's masks, in the order our model drew them: ``(keep probability, mask)``."""

    drop_path: list[tuple[float, np.ndarray]]  # [B, 1, 1, 1] per block with drop path
    dropout: list[tuple[float, np.ndarray]]  # [B, C] before the classifier
    asked: list[float] = dataclasses.field(default_factory=list)  # timm's keep probabilities


@contextlib.contextmanager
def given_masks(masks: Masks) -> Iterator[Masks]:
    """timm's ``drop_path`` draws our masks (its ``Tensor.bernoulli_``), and ``F.dropout`` (timm's
    head) applies ours with PyTorch's scale ``1 / (1 - p)``; ``masks.asked`` gets each keep
    probability timm asks for, to compare with ours."""
    path, drop = list(masks.drop_path), list(masks.dropout)
    real_bernoulli, real_dropout = torch.Tensor.bernoulli_, torch.nn.functional.dropout

    def bernoulli_(self, p=0.5, **kw):
        masks.asked.append(float(p))
        self.copy_(torch.from_numpy(path.pop(0)[1].astype(np.float64)).reshape(self.shape))
        return self

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        masks.asked.append(1.0 - p)
        return x * torch.from_numpy(drop.pop(0)[1].astype(np.float64)).reshape(x.shape) * (1.0 / (1.0 - p))

    torch.Tensor.bernoulli_, torch.nn.functional.dropout = bernoulli_, dropout
    try:
        yield masks
    finally:
        torch.Tensor.bernoulli_, torch.nn.functional.dropout = real_bernoulli, real_dropout
    if path or drop:
        raise RuntimeError(f"timm's model left {len(path)} drop-path and {len(drop)} dropout masks unused")
