"""Export check: weights converted from timm/torchvision models, saved with
``convert.save_torch_checkpoint`` (.pth and .safetensors), load strictly back into those models
with every tensor equal. Needs timm and torchvision (see BENCHMARKS.md for how they were run)."""

import os
import sys
import tempfile

import timm
import torch
import torchvision
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from resnet_jax import convert  # noqa: E402

TIMM = ("resnet18d", "resnet50d", "resnet26t", "resnet50t", "resnet50")
TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")


def make(src, arch):
    if src == "timm":
        return timm.create_model(arch, pretrained=False, num_classes=7)
    return getattr(torchvision.models, arch)(num_classes=7)


def main():
    out = []
    for src, arch in [("timm", a) for a in TIMM] + [("torchvision", a) for a in TORCHVISION]:
        ref = make(src, arch)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(3)
        sd = ref.state_dict()
        variables = convert.torch_to_flax(sd)
        for suffix in (".pth", ".safetensors"):
            path = os.path.join(tempfile.mkdtemp(), "m" + suffix)
            convert.save_torch_checkpoint(variables, path, arch=arch)
            loaded = torch.load(path, weights_only=True) if suffix == ".pth" else load_file(path)
            tgt = make(src, arch)
            tgt.load_state_dict(loaded, strict=True)
            tgt_sd = tgt.state_dict()
            same = all(
                torch.equal(v, tgt_sd[k]) for k, v in sd.items() if not k.endswith("num_batches_tracked")
            )
            out.append(same)
            print(src, arch, suffix, "strict load ok, tensors equal:", same, flush=True)
    assert all(out)


if __name__ == "__main__":
    main()
