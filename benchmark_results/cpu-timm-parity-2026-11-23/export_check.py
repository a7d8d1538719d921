import sys, tempfile, os
import numpy as np, torch, timm, torchvision
sys.path.insert(0, "/work/main")
from resnet_jax import convert
out = []
cases = [("timm", a) for a in ("resnet18d", "resnet50d", "resnet26t", "resnet50t", "resnet50")] + [("torchvision", a) for a in ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")]
for src, arch in cases:
    make = (lambda: timm.create_model(arch, pretrained=False, num_classes=7)) if src == "timm" else (lambda: getattr(torchvision.models, arch)(num_classes=7))
    ref = make()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(); m.running_var.uniform_(0.5, 2); m.num_batches_tracked.fill_(3)
    sd = ref.state_dict()
    variables = convert.torch_to_flax(sd)
    for suffix in (".pth", ".safetensors"):
        path = os.path.join(tempfile.mkdtemp(), "m" + suffix)
        convert.save_torch_checkpoint(variables, path, arch=arch)
        if suffix == ".pth":
            loaded = torch.load(path, weights_only=True)
        else:
            from safetensors.torch import load_file
            loaded = load_file(path)
        tgt = make()
        tgt.load_state_dict(loaded, strict=True)
        same = all(torch.equal(v, tgt.state_dict()[k]) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
        out.append((src, arch, suffix, same))
        print(src, arch, suffix, "strict load ok, tensors equal:", same, flush=True)
assert all(s for *_, s in out)
