"""Numerical parity of resnet_jax against PyTorch: ``python -m resnet_jax.parity --arch NAME``.

Builds the PyTorch twin with random weights and non-trivial BatchNorm statistics, converts it
with :func:`resnet_jax.convert.torch_to_flax`, runs both frameworks on the same batches and prints
``||delta|| / ||ref||`` for eval logits, train-mode logits, every module's gradient, the updated
running statistics, and the loss (and final parameters) over SGD steps with momentum and weight
decay. Exits non-zero when a row is over its tolerance. float64 checks structural identity.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import numpy as np

BASE_ARCHS = ("resnetbase", "resnetbase_bottleneck")
TOLERANCES = {
    "float64": {"default": 1e-10},
    "float32": {"default": 1e-4, "eval logits": 1e-5},
}


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(a - ref)
    return float(diff / denom) if denom > 0 else float(diff)


def _build(arch: str, num_classes: int, conv_bias: bool, labml: bool, reference: str):
    """(flax module, torch module, number of output logits)."""
    import resnet_jax
    from resnet_jax import torch_reference

    if arch in BASE_ARCHS:
        bottleneck = arch.endswith("bottleneck")
        kw = dict(
            n_blocks=(2, 2, 2),
            n_channels=(16, 32, 64),
            bottlenecks=(8, 16, 32) if bottleneck else None,
            first_kernel_size=7,
            strides=(2, 1, 1) if labml else None,
            conv_bias=conv_bias or labml,
        )
        return resnet_jax.ResNetBase(**kw), torch_reference.TorchResNetBase(**kw), 64
    if reference == "torchvision":
        import torchvision

        if not hasattr(torchvision.models, arch):
            raise SystemExit(f"torchvision has no {arch}; use --reference local.")
        tm = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    else:
        tm = torch_reference.torch_resnet(arch, num_classes=num_classes)
    return resnet_jax.get_model(arch, num_classes=num_classes), tm, num_classes


def _randomize(model, gen, branch_gain: tuple[float, float]) -> None:
    """BatchNorm affine and statistics shaped like a trained network's, so eval differs from train.

    The last BatchNorm of each residual branch gets a small scale drawn from ``branch_gain``, as
    in trained torchvision ResNets (and zero_init_residual). With scales near 1 there, a deep
    train-mode ResNet at init is so ill-conditioned that PyTorch's own float32 gradients differ
    from its float64 ones by ~2e-2 (ResNet-50, see BENCHMARKS.md); parity would then measure
    rounding amplification, not the implementation.
    """
    import torch

    last_bns = set()
    for m in model.modules():
        if hasattr(m, "conv1") and hasattr(m, "bn2"):  # a residual block (ours or torchvision's)
            last_bns.add(id(getattr(m, "bn3", m.bn2)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                lo, hi = branch_gain if id(m) in last_bns else (0.8, 1.2)
                m.weight.uniform_(lo, hi, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)


def run_parity(
    arch: str,
    dtype: str = "float32",
    image_size: int = 64,
    batch: int = 4,
    steps: int = 10,
    num_classes: int = 10,
    conv_bias: bool = False,
    labml: bool = False,
    reference: str = "local",
    lr: float = 0.01,
    branch_gain: tuple[float, float] = (0.05, 0.25),
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the comparison; returns ``{'rows': {name: rel_error}, 'worst': {name: key}, ...}``."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from resnet_jax.convert import flax_to_torch, torch_to_flax

    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be float32 or float64; got {dtype!r}.")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 parity needs jax_enable_x64: set JAX_ENABLE_X64=1.")
    # Parity is a statement about the math, so no TF32 or bf16-pass matmuls on either side.
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tdtype = torch.float64 if dtype == "float64" else torch.float32

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fmodel, tmodel, n_out = _build(arch, num_classes, conv_bias, labml, reference)
    fmodel = fmodel.clone(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    tmodel = tmodel.to(tdtype)
    _randomize(tmodel, gen, branch_gain)

    xs = torch.randn(steps + 1, batch, 3, image_size, image_size, generator=gen, dtype=tdtype)
    ys = torch.randint(0, n_out, (steps, batch), generator=gen)
    variables = torch_to_flax(tmodel.state_dict(), fmodel)
    params = jax.tree.map(jnp.asarray, variables["params"])
    stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
    nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))  # noqa: E731

    # --- PyTorch ---
    tmodel.eval()
    with torch.no_grad():
        ref_eval = tmodel(xs[steps]).numpy()
    tmodel.train()
    opt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    ref_losses = []
    for i in range(steps):
        out = tmodel(xs[i])
        loss = torch.nn.functional.cross_entropy(out, ys[i])
        opt.zero_grad()
        loss.backward()
        if i == 0:
            ref_train = out.detach().numpy()
            ref_grads = {k: p.grad.numpy().copy() for k, p in tmodel.named_parameters()}
            ref_stats = {k: v.numpy().copy() for k, v in tmodel.state_dict().items() if "running" in k}
        opt.step()
        ref_losses.append(loss.item())
    ref_params = {k: p.detach().numpy() for k, p in tmodel.named_parameters()}

    # --- JAX ---
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum))

    def loss_fn(p, s, x, y):
        logits, upd = fmodel.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, upd["batch_stats"])

    @jax.jit
    def step(p, s, o, x, y):
        (loss, (logits, s)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, y)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), s, o, loss, logits, g

    eval_logits = jax.jit(lambda v, x: fmodel.apply(v, x, train=False))(
        {"params": params, "batch_stats": stats}, nhwc(xs[steps])
    )
    opt_state = tx.init(params)
    losses = []
    for i in range(steps):
        params, stats, opt_state, loss, logits, grads = step(
            params, stats, opt_state, nhwc(xs[i]), jnp.asarray(ys[i].numpy())
        )
        if i == 0:
            train_logits, grads0 = logits, flax_to_torch({"params": grads})
            stats0 = flax_to_torch({"batch_stats": stats})
        losses.append(float(loss))
    final = flax_to_torch({"params": params})

    # Gradients are compared per module (weight and bias as one vector). A bias that feeds a
    # train-mode BatchNorm through convolutions only (every conv bias, and the seed's stem BN
    # bias) has an exactly-zero gradient, so per tensor both sides are pure rounding noise.
    modules: dict[str, list[str]] = {}
    for k in ref_grads:
        modules.setdefault(k.rsplit(".", 1)[0], []).append(k)
    grad_err = {
        m: _rel(np.concatenate([grads0[k].ravel() for k in ks]),
                np.concatenate([ref_grads[k].ravel() for k in ks]))
        for m, ks in modules.items()
    }
    rows = {
        "eval logits": _rel(eval_logits, ref_eval),
        "train logits": _rel(train_logits, ref_train),
        "grads (max over modules)": max(grad_err.values()),
    }
    worst = {"grads (max over modules)": max(grad_err, key=grad_err.get)}
    stat_err = {k: _rel(stats0[k], ref_stats[k]) for k in ref_stats}
    rows["running stats after 1 step"] = max(stat_err.values())
    worst["running stats after 1 step"] = max(stat_err, key=stat_err.get)
    rows[f"loss over {steps} SGD steps (max)"] = max(
        abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)
    )
    param_err = {k: _rel(final[k], ref_params[k]) for k in ref_params}
    rows[f"params after {steps} SGD steps (max)"] = max(param_err.values())
    tol = TOLERANCES[dtype]
    tolerances = {k: tol.get(k, tol["default"]) for k in rows}
    return {
        "arch": arch,
        "dtype": dtype,
        "image_size": image_size,
        "batch": batch,
        "rows": rows,
        "tolerances": tolerances,
        "worst": worst,
        "losses": losses,
        "torch_losses": ref_losses,
        "ok": all(rows[k] <= tolerances[k] for k in rows),
    }


def main(argv: Optional[list[str]] = None) -> int:
    from resnet_jax.models import PRESETS

    parser = argparse.ArgumentParser(prog="python -m resnet_jax.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=list(PRESETS) + list(BASE_ARCHS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--image-size", type=int, default=None, help="default 64 (32 for resnetbase)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--conv-bias", action="store_true", help="resnetbase: biases on every conv")
    parser.add_argument("--labml", action="store_true",
                        help="resnetbase: the annotated PyTorch ResNet (conv biases, only the first block strided)")
    parser.add_argument("--reference", default="local", choices=["local", "torchvision"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    size = args.image_size or (32 if args.arch in BASE_ARCHS else 64)
    result = run_parity(
        args.arch, args.dtype, size, args.batch, args.steps, args.num_classes,
        args.conv_bias, args.labml, args.reference, seed=args.seed,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.arch}  {args.dtype}  batch {args.batch}  {size}x{size}  reference={args.reference}")
        print(f"{'check':<54}{'||d||/||ref||':>14}{'tolerance':>11}")
        for name, err in result["rows"].items():
            flag = "ok" if err <= result["tolerances"][name] else "FAIL"
            print(f"{name:<54}{err:>14.3e}{result['tolerances'][name]:>11.0e}  {flag}")
        print("PASS" if result["ok"] else "FAIL")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
