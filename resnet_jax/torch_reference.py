"""PyTorch reference models, written here so parity checks need no torchvision.

``TorchResNetBase`` mirrors labml.ai's annotated ResNet, ``labml_nn.resnet`` (module names
``conv``, ``bn``, ``blocks.N``), with the same ``strides``/``conv_bias`` switches as
``resnet_jax.ResNetBase``.
``TorchResNet`` has torchvision's layout and state_dict keys (``conv1 bn1 layer1..4 fc``,
``downsample.0/1``), so a torchvision state_dict loads into it and vice versa; with
``stem_type``/``stem_width``/``avg_down`` it has timm's ResNet-C/D/T layout and keys
(``conv1.0 .. conv1.6``, ``downsample.1/2`` after an average pool), and with ``attn_layer='se'``
timm's squeeze-and-excitation (``layerN.M.se.fc1/fc2``), so timm state_dicts load too.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Optional, Sequence

import torch
from torch import nn

from resnet_jax.models import PRESETS


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class _Projection(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bias: bool):
        super().__init__()
        self.conv = _conv(cin, cout, 1, stride, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class _SqueezeExcite(nn.Module):
    """timm's ``SEModule`` with its defaults: mean, 1x1 conv, ReLU, 1x1 conv, sigmoid gate; the
    reduced width is ``make_divisible(channels / 16, 8, round_limit=0)``, written out here."""

    def __init__(self, channels: int, divisor: int = 8):
        super().__init__()
        reduced = max(divisor, int(channels / 16 + divisor / 2) // divisor * divisor)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class _Basic(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        bias: bool = False,
        torchvision: bool = False,
        avg_down: bool = False,
        se: bool = False,
    ):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride, bias=bias)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv(cout, cout, 3, bias=bias)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = _SqueezeExcite(cout) if se else nn.Identity()
        self.relu = nn.ReLU()
        self._add_shortcut(cin, cout, stride, bias, torchvision, avg_down)

    def _add_shortcut(
        self, cin: int, cout: int, stride: int, bias: bool, torchvision: bool, avg_down: bool = False
    ) -> None:
        proj = stride != 1 or cin != cout
        if torchvision and avg_down:
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
            pool = pool if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, _conv(cin, cout, 1), nn.BatchNorm2d(cout)) if proj else None
        elif torchvision:
            self.downsample = (
                nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout)) if proj else None
            )
        else:
            self.shortcut = _Projection(cin, cout, stride, bias) if proj else nn.Identity()
        self.torchvision = torchvision

    def skip(self, x):
        if self.torchvision:
            return x if self.downsample is None else self.downsample(x)
        return self.shortcut(x)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return self.relu(y + self.skip(x))


class _Bottleneck(_Basic):
    def __init__(
        self,
        cin: int,
        width: int,
        cout: int,
        stride: int,
        groups: int = 1,
        bias: bool = False,
        torchvision: bool = False,
        avg_down: bool = False,
        se: bool = False,
    ):
        nn.Module.__init__(self)
        self.conv1 = _conv(cin, width, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, groups=groups, bias=bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, cout, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(cout)
        self.se = _SqueezeExcite(cout) if se else nn.Identity()
        self.relu = nn.ReLU()
        self._add_shortcut(cin, cout, stride, bias, torchvision, avg_down)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.se(self.bn3(self.conv3(y)))
        return self.relu(y + self.skip(x))


class TorchResNetBase(nn.Module):
    """labml.ai's annotated ResNet (``ResNetBase``) in PyTorch: conv+BN stem, ``blocks``, global
    average pooling."""

    def __init__(
        self,
        n_blocks: Sequence[int],
        n_channels: Sequence[int],
        bottlenecks: Optional[Sequence[int]] = None,
        img_channels: int = 3,
        first_kernel_size: int = 7,
        strides: Optional[Sequence[int]] = None,
        conv_bias: bool = False,
    ):
        super().__init__()
        if strides is None:
            strides = (1,) + (2,) * (len(n_channels) - 1)
        self.conv = _conv(img_channels, n_channels[0], first_kernel_size, 2, bias=conv_bias)
        self.bn = nn.BatchNorm2d(n_channels[0])
        blocks, prev = [], n_channels[0]
        for i, (n, ch) in enumerate(zip(n_blocks, n_channels)):
            for j in range(n):
                stride = strides[i] if j == 0 else 1
                if bottlenecks is None:
                    blocks.append(_Basic(prev, ch, stride, bias=conv_bias))
                else:
                    blocks.append(_Bottleneck(prev, bottlenecks[i], ch, stride, bias=conv_bias))
                prev = ch
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        x = self.blocks(self.bn(self.conv(x)))
        return x.flatten(2).mean(-1)


class TorchResNet(nn.Module):
    """torchvision-layout ResNet/ResNeXt/Wide ResNet (v1.5), with an optional 3x3 small stem, and
    timm's deep (``'deep'``) and tiered (``'deep_tiered'``) stems and average-pool shortcuts."""

    def __init__(
        self,
        stage_sizes: Sequence[int],
        block: str = "bottleneck",
        num_classes: int = 1000,
        groups: int = 1,
        width_per_group: int = 64,
        img_channels: int = 3,
        small_stem: bool = False,
        stem_type: str = "",
        stem_width: int = 64,
        avg_down: bool = False,
        attn_layer: str = "",
    ):
        super().__init__()
        block_args = dict(torchvision=True, avg_down=avg_down, se=attn_layer == "se")
        stem_out = 2 * stem_width if stem_type else 64
        if small_stem:
            self.conv1 = _conv(img_channels, 64, 3)
            self.maxpool = nn.Identity()
        elif stem_type:
            first = stem_width if stem_type == "deep" else 3 * (stem_width // 4)
            self.conv1 = nn.Sequential(
                _conv(img_channels, first, 3, 2),
                nn.BatchNorm2d(first),
                nn.ReLU(),
                _conv(first, stem_width, 3),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(),
                _conv(stem_width, stem_out, 3),
            )
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = _conv(img_channels, 64, 7, 2)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stem_out)
        self.relu = nn.ReLU()
        prev = stem_out
        for i, n in enumerate(stage_sizes):
            planes, layer = 64 * 2**i, []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if block == "basic":
                    layer.append(_Basic(prev, planes, stride, **block_args))
                    prev = planes
                else:
                    width = int(planes * (width_per_group / 64.0)) * groups
                    layer.append(_Bottleneck(prev, width, planes * 4, stride, groups, **block_args))
                    prev = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.n_stages = len(stage_sizes)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean((2, 3)))


def torch_resnet(arch: str, num_classes: int = 1000, **kwargs) -> TorchResNet:
    """The PyTorch twin of ``resnet_jax.get_model(arch, ...)``."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(PRESETS)}.")
    return TorchResNet(num_classes=num_classes, **{**PRESETS[arch], **kwargs})


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm affine parameters and running statistics (and any conv biases) drawn like a
    trained network's, in place, so that eval mode differs from train mode; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
    return model


def import_reference(name: str) -> Any:
    """Import ``'torchvision'`` or ``'timm'`` (which imports torchvision) as a reference.

    A torchvision wheel whose compiled operators do not match the installed PyTorch (a CUDA
    torchvision beside a CPU PyTorch) fails at import in ``torchvision._meta_registrations``,
    which registers fake kernels for those operators (``operator torchvision::nms does not
    exist``). The models and transforms used as references need none of them, so that one
    module is replaced by an empty one and the import retried.
    """
    try:
        return importlib.import_module(name)
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for module in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[module]  # the half-imported packages
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    return importlib.import_module(name)


def randomize_for_parity(model, gen, branch_gain: tuple[float, float]) -> None:
    """BatchNorm affine and statistics shaped like a trained network's, so eval differs from train.

    The last BatchNorm of each residual branch gets a small scale drawn from ``branch_gain``, as
    in trained torchvision ResNets (and zero_init_residual). With scales near 1 there, a deep
    train-mode ResNet at init is so ill-conditioned that PyTorch's own float32 gradients differ
    from its float64 ones by far more than rounding (docs/pytorch.md); parity would then measure
    rounding amplification, not the implementation.

    A pre-activation block (timm's ResNetV2) ends its branch with ``conv3`` and no norm, so each
    output channel of that conv is scaled by a gain from ``branch_gain`` instead: the same
    per-channel factor on the branch's output.
    """
    last_bns, last_convs = set(), []
    for m in model.modules():
        if hasattr(m, "conv1") and hasattr(m, "bn2"):  # a residual block (ours or torchvision's)
            last_bns.add(id(getattr(m, "bn3", m.bn2)))
        elif hasattr(m, "norm3") and hasattr(m, "conv3"):  # a pre-activation bottleneck
            last_convs.append(m.conv3)
    with torch.no_grad():
        for conv in last_convs:
            gain = torch.empty(conv.out_channels, dtype=conv.weight.dtype).uniform_(
                *branch_gain, generator=gen
            )
            conv.weight.mul_(gain[:, None, None, None])
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):  # BiT's: an affine transform, no statistics
                m.weight.uniform_(0.8, 1.2, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
            elif isinstance(m, torch.nn.BatchNorm2d):
                lo, hi = branch_gain if id(m) in last_bns else (0.8, 1.2)
                m.weight.uniform_(lo, hi, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
