"""bfloat16 numerics of the library against PyTorch: ``python -m benchmarks.bf16_numerics``.

One PyTorch ResNet with BatchNorm statistics shaped like a trained network's (the parity
command's ``_randomize``) is converted to Flax. Eval-mode and train-mode logits on one batch are
then computed by

* PyTorch in float64 (the reference), in float32 (TF32 off) and under bf16 ``torch.autocast``;
* the library in float32 (``jax_default_matmul_precision='highest'``) and with
  ``dtype=bfloat16`` (float32 parameters), the training program's setting.

Every row is ‖logits − reference‖ / ‖reference‖, so the library's bf16 error stands beside
PyTorch's own bf16 error on the same weights and data. JSON on stdout.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import resnet_jax
from benchmarks.report import emit_json, host_environment
from resnet_jax import convert
from resnet_jax.parity import _randomize, rel
from resnet_jax.platform import skip_absent_tpu


def _torch_model(arch: str, num_classes: int):
    try:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes), "torchvision"
    except Exception:  # torchvision missing or unusable: the project's own twin
        from resnet_jax.torch_reference import torch_resnet

        return torch_resnet(arch, num_classes=num_classes), "resnet_jax.torch_reference"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(args.seed)
    base, source = _torch_model(args.arch, args.num_classes)
    _randomize(base, gen, (0.2, 0.5))
    variables = convert.torch_to_flax(base.state_dict(), args.arch)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)

    def torch_logits(dtype: torch.dtype, autocast: torch.dtype | None, train: bool) -> np.ndarray:
        model = copy.deepcopy(base).to(device=device, dtype=dtype).train(train)
        xin = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=autocast or dtype, enabled=autocast is not None),
        ):
            return model(xin).double().cpu().numpy()

    x_nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())

    def jax_logits(dtype: Any, train: bool) -> np.ndarray:
        model = resnet_jax.get_model(args.arch, num_classes=args.num_classes, dtype=dtype)
        with jax.default_matmul_precision("highest"):
            if train:
                out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
                    variables, x_nhwc
                )
            else:
                out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_nhwc)
        return np.asarray(out, np.float64)

    rows = {}
    for mode, train in (("eval", False), ("train", True)):
        ref = torch_logits(torch.float64, None, train)
        torch_bf16 = torch_logits(torch.float32, torch.bfloat16, train)
        jax_bf16 = jax_logits(jnp.bfloat16, train)
        rows[mode] = {
            "torch_float32_vs_float64": rel(torch_logits(torch.float32, None, train), ref),
            "torch_bf16_autocast_vs_float64": rel(torch_bf16, ref),
            "jax_float32_vs_torch_float64": rel(jax_logits(jnp.float32, train), ref),
            "jax_bf16_vs_torch_float64": rel(jax_bf16, ref),
            "jax_bf16_vs_torch_bf16_autocast": rel(jax_bf16, torch_bf16),
            "top1_agreement_jax_bf16_vs_float64": float(np.mean(jax_bf16.argmax(1) == ref.argmax(1))),
            "top1_agreement_torch_bf16_vs_float64": float(np.mean(torch_bf16.argmax(1) == ref.argmax(1))),
        }
    rows["ratio_jax_bf16_error_over_torch_bf16_error"] = {
        m: rows[m]["jax_bf16_vs_torch_float64"] / rows[m]["torch_bf16_autocast_vs_float64"]
        for m in ("eval", "train")
    }
    return {
        "benchmark": "bf16_numerics",
        "config": {
            "arch": args.arch,
            "batch": args.batch,
            "image_size": args.image_size,
            "num_classes": args.num_classes,
            "torch_model": source,
            "weights": "random, BatchNorm statistics randomised (resnet_jax.parity._randomize)",
            "metric": "||logits - reference|| / ||reference||, reference = PyTorch float64",
        },
        "environment": {
            **host_environment(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "jax_device": jax.devices()[0].device_kind,
        },
        "command": "python -m benchmarks.bf16_numerics " + " ".join(sys.argv[1:]),
        **rows,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bf16_numerics", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50", choices=sorted(resnet_jax.PRESETS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="FILE")
    args = p.parse_args(argv)
    skip_absent_tpu()  # libtpu installed but no TPU here: no TPU start-up attempt and warnings
    result = run(args)
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
