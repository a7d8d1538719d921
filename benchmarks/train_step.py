"""Training-step benchmark: ``python -m benchmarks.train_step --arch resnet50 --batch 256 --dtype bfloat16``.

Times the training program's own step (``train.steps.make_train_step`` compiled by
``train.steps.jit_train_step`` over a device mesh) on synthetic data generated on the device:
compile time (lowering + XLA compile, measured apart from the timed steps), then the median of
``--steps`` device-synchronised steps after ``--warmup`` untimed ones. Prints one JSON object.

* ``--compare-torch``: the same architecture, batch, loss (label-smoothed cross-entropy) and
  optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4 on conv/dense kernels) in PyTorch in
  the same process: channels_last, autocast to ``--dtype`` when it is not float32, and
  ``torch.compile`` on CUDA (eager if compiling fails; the mode that ran is reported).
* ``--compare-minimal``: a hand-written Flax ResNet (``benchmarks.minimal_resnet``) of the same
  architecture through the same step, to show what the library's structure costs.
* ``--compare-nnx``: the same model from ``resnet_jax.nnx`` trained with ``nnx.Optimizer``
  and the same loss, optimizer and metrics, to show what the NNX API costs over the Linen step:
  ``nnx`` compiles it as Flax advises for a hot loop (``nnx.split`` once, ``jax.jit`` of a pure
  merge-step-split function), ``nnx_jit`` with ``nnx.jit`` on the modules, as the tutorials do.
* ``--rounds R``: the contenders take turns R times (order reversed every round) and medians are
  over all rounds, so load changes on a shared machine hit them alike.
* ``--measure-cache``: runs the benchmark twice in fresh processes sharing an empty persistent
  compilation cache and reports the cold and the warm compile (and start-up) times.

FLOPs are counted analytically from the model's jaxpr (multiply-accumulates of every
convolution and dense layer for one image, x2 for FLOPs); a training step is counted as 3x the
forward pass (backward = 2x forward), the usual convention: 24.5 GFLOP per 224x224 image for
ResNet-50 (4.09 GMAC forward). XLA's own ``cost_analysis`` of the compiled step, which also
counts normalisation and element-wise work, is reported beside it. MFU divides the achieved model
FLOP/s by the device's dense peak from ``PEAK_TFLOPS`` (or ``--peak-tflops``); null when unknown.

Needs only jax, flax, optax and numpy (and torch for ``--compare-torch``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

_T0 = time.perf_counter()  # process start, near enough: for the time-to-first-step figure

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import resnet_jax  # noqa: E402
from benchmarks.minimal_resnet import minimal_resnet  # noqa: E402
from benchmarks.report import cpu_model, emit_json, host_environment  # noqa: E402
from train import compile_cache, optim, steps  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.1

# Dense (no sparsity) peak TFLOP/s per device by precision, from the vendors' data sheets.
# Matched against ``device.device_kind`` in order, first substring wins. float32 entries are
# TF32 tensor-core peaks (XLA and cuDNN use TF32 for float32 convolutions by default on these).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 418.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),  # SXM
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
]

OPTIMIZER_DESC = (
    f"SGD lr {LEARNING_RATE}, Nesterov momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} on "
    f"conv/dense kernels; cross-entropy with label smoothing {LABEL_SMOOTHING}"
)


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON result."""
    print(f"[benchmark {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# FLOPs.


def _jaxpr_types() -> tuple[type, type]:
    try:
        from jax.extend.core import ClosedJaxpr, Jaxpr
    except ImportError:  # older JAX
        from jax.core import ClosedJaxpr, Jaxpr
    return ClosedJaxpr, Jaxpr


def count_macs(jaxpr: Any) -> int:
    """Multiply-accumulates of every convolution and dot product in ``jaxpr`` (recursively).

    A convolution costs (output elements) x (kernel window x input channels per group); a
    ``dot_general`` costs (output elements) x (contracted size). Everything else is ignored.
    """
    closed_t, jaxpr_t = _jaxpr_types()
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
            window = int(np.prod([rhs[i] for i in rhs_spec[2:]], dtype=np.int64))
            total += int(np.prod(out, dtype=np.int64)) * window * int(rhs[rhs_spec[1]])
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            k = int(np.prod([lhs[i] for i in contract], dtype=np.int64))
            total += int(np.prod(out, dtype=np.int64)) * k
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, closed_t):
                    total += count_macs(sub.jaxpr)
                elif isinstance(sub, jaxpr_t):
                    total += count_macs(sub)
    return total


def forward_macs_per_image(model: Any, image_size: int, channels: int = 3) -> int:
    """Analytic MACs of one image's forward pass (abstract evaluation only: nothing runs)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False), x
    )
    # Eval mode: identical convolutions, and BatchNorm needs no batch statistics for batch 1.
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return count_macs(jaxpr.jaxpr)


def xla_flops(compiled: Any) -> float | None:
    """``flops`` of XLA's cost analysis of a compiled executable, when the backend gives one."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not implemented on every backend / version
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


# ----------------------------------------------------------------------------------------------
# Environment.


def environment() -> dict[str, Any]:
    import flax
    import jaxlib

    dev = jax.devices()[0]
    env = {
        **host_environment(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return env


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first device so far (None where the backend keeps no stats)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
    )
    return {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f)) for f in fields if hasattr(m, f)}


# ----------------------------------------------------------------------------------------------
# Contenders: something that can be prepared (built, compiled, warmed up) and then timed.


class Contender:
    name: str = ""

    def prepare(self) -> dict[str, Any]:
        raise NotImplementedError

    def timed_steps(self, n: int) -> list[float]:
        """Run ``n`` steps, each synchronised with the device; their wall times in seconds."""
        raise NotImplementedError

    def pipelined(self, n: int) -> float:
        """Mean step time of ``n`` steps issued back to back, synchronised once at the end."""
        raise NotImplementedError


def make_optimizer() -> optax.GradientTransformation:
    """The ImageNet recipe's optimizer at a constant learning rate (the schedule costs nothing)."""
    sgd = optax.sgd(LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
    return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY, mask=optim.decay_mask), sgd)


def synthetic_batch(args: argparse.Namespace, sharding: NamedSharding) -> dict[str, jax.Array]:
    """The timed batch, generated on the devices of ``sharding`` (the same for every JAX contender)."""

    @functools.partial(jax.jit, out_shardings=sharding)
    def make(key):
        k1, k2 = jax.random.split(key)
        size = args.image_size
        return {
            "image": jax.random.normal(k1, (args.batch, size, size, 3), jnp.float32),
            "label": jax.random.randint(k2, (args.batch,), 0, args.num_classes, jnp.int32),
        }

    return jax.block_until_ready(make(jax.random.key(args.seed + 1)))


class JaxContender(Contender):
    """The training program's step for ``model``, jitted over a mesh of all devices."""

    def __init__(self, name: str, model: Any, args: argparse.Namespace):
        self.name = name
        self.model = model
        self.args = args

    def prepare(self) -> dict[str, Any]:
        args = self.args
        size = args.image_size
        mesh = steps.make_mesh()
        if args.batch % mesh.size:
            raise SystemExit(f"--batch {args.batch} must divide by the {mesh.size} devices.")
        driver = steps.JitDriver(mesh)
        tx = make_optimizer()
        # rbg keys: the initial values do not matter here and threefry init compiles ~2x slower.
        create_fn = functools.partial(
            steps.create_train_state,
            jax.random.key(args.seed, impl="rbg"),
            self.model,
            tx,
            (1, size, size, 3),
            dynamic_scale=args.dtype == "float16",
        )
        t = time.perf_counter()
        self.state = driver.init_state(create_fn)
        jax.block_until_ready(self.state)
        init_s = time.perf_counter() - t

        data = NamedSharding(mesh, P(steps.DATA_AXIS))
        self.batch = synthetic_batch(args, data)

        train_step = steps.make_train_step(self.model, tx, label_smoothing=LABEL_SMOOTHING)
        if args.no_donate:
            replicated = NamedSharding(mesh, P())
            jitted = jax.jit(
                train_step, in_shardings=(replicated, data), out_shardings=(replicated, replicated)
            )
        else:
            jitted = steps.jit_train_step(train_step, mesh)

        cache_dir = jax.config.jax_compilation_cache_dir
        entries_before = compile_cache.cache_entries(cache_dir) if cache_dir else None
        t = time.perf_counter()
        lowered = jitted.lower(self.state, self.batch)
        t_lower = time.perf_counter()
        self.step = lowered.compile()
        t_compile = time.perf_counter()
        entries_after = compile_cache.cache_entries(cache_dir) if cache_dir else None

        first = time.perf_counter()
        self._run_one()
        first_step_s = time.perf_counter() - first
        self.first_step_done_s = time.perf_counter() - _T0
        for _ in range(max(args.warmup - 1, 0)):
            self._run_one()

        macs = forward_macs_per_image(self.model, size)
        info = {
            "init_time_s": init_s,
            "lower_time_s": t_lower - t,
            "xla_compile_time_s": t_compile - t_lower,
            "compile_time_s": t_compile - t,
            "first_step_time_s": first_step_s,
            "process_time_to_first_step_s": self.first_step_done_s,
            "donate_state": not args.no_donate,
            "forward_macs_per_image": macs,
            "xla_flops_per_step": xla_flops(self.step),
            "compiled_memory": compiled_memory(self.step),
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(self.state.params))),
        }
        if cache_dir:
            info["compilation_cache"] = {
                "dir": cache_dir,
                "entries_before_compile": entries_before,
                "entries_after_compile": entries_after,
                # New entries mean the step was compiled and written, i.e. a cache miss.
                "step_was_cached": entries_before is not None and entries_after == entries_before,
            }
        return info

    def _run_one(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t

    def timed_steps(self, n: int) -> list[float]:
        return [self._run_one() for _ in range(n)]

    def pipelined(self, n: int) -> float:
        """Mean step time of ``n`` steps dispatched back to back with one sync at the end."""
        jax.block_until_ready(self.state)
        t = time.perf_counter()
        for _ in range(n):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - t) / n


class NNXContender(Contender):
    """The same model from ``resnet_jax.nnx``, trained as NNX users write it: ``nnx.Optimizer``
    and a step with the same loss, optimizer and metrics as the training program's, state
    replicated over the same mesh. Two ways to compile it:

    * ``functional=False``: ``nnx.jit`` on ``(model, optimizer)`` (donated), the NNX tutorials'
      way. Every call flattens and unflattens the module graph in Python.
    * ``functional=True``: ``nnx.split`` once, then ``jax.jit`` of a pure function of the state
      that merges, steps and splits inside (Flax's advice for a hot loop): per call, a pytree.
    """

    def __init__(self, name: str, linen_model: Any, args: argparse.Namespace, functional: bool):
        self.name = name
        self.linen_model = linen_model
        self.args = args
        self.functional = functional

    def prepare(self) -> dict[str, Any]:
        from flax import nnx

        from resnet_jax import nnx as rnnx
        from resnet_jax import sharding

        args = self.args
        mesh = steps.make_mesh()
        t = time.perf_counter()
        model = rnnx.from_linen(self.linen_model, rngs=nnx.Rngs(jax.random.key(args.seed, impl="rbg")))
        optimizer = nnx.Optimizer(model, make_optimizer(), wrt=nnx.Param)
        nnx.update((model, optimizer), sharding.replicate(nnx.state((model, optimizer)), mesh))
        model.train()
        jax.block_until_ready(nnx.state(model))
        init_s = time.perf_counter() - t
        self.batch = synthetic_batch(args, NamedSharding(mesh, P(steps.DATA_AXIS)))

        def train_step(model, optimizer, batch):
            def loss_fn(model):
                logits = model(batch["image"])
                loss = jnp.mean(steps.cross_entropy(logits, batch["label"], LABEL_SMOOTHING))
                return loss, logits

            (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            optimizer.update(model, grads)
            return {
                "loss": loss,
                "accuracy": jnp.mean(steps.topk_correct(logits, batch["label"], 1)),
                "top5_accuracy": jnp.mean(steps.topk_correct(logits, batch["label"], 5)),
                "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
            }

        if self.functional:
            graphdef, self.state = nnx.split((model, optimizer))

            @functools.partial(jax.jit, donate_argnums=(0,))
            def pure_step(state, batch):
                model, optimizer = nnx.merge(graphdef, state)
                metrics = train_step(model, optimizer, batch)
                return nnx.state((model, optimizer)), metrics

            def call():
                self.state, metrics = pure_step(self.state, self.batch)
                return metrics

            desc = "nnx.split once; jax.jit(donate) of merge -> step -> split"
        else:
            jitted = nnx.jit(train_step, donate_argnums=(0, 1))

            def call():
                return jitted(model, optimizer, self.batch)

            desc = "nnx.jit(donate_argnums=(0, 1)) on (model, optimizer)"
        self.call = call
        t = time.perf_counter()
        self._run_one()  # both compile on the first call
        compile_and_first_step_s = time.perf_counter() - t
        for _ in range(max(args.warmup - 1, 0)):
            self._run_one()
        return {
            "init_time_s": init_s,
            "compile_and_first_step_time_s": compile_and_first_step_s,
            "step": "resnet_jax.nnx model, nnx.Optimizer(wrt=nnx.Param), " + desc,
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        }

    def _run_one(self) -> float:
        t = time.perf_counter()
        jax.block_until_ready(self.call())
        return time.perf_counter() - t

    def timed_steps(self, n: int) -> list[float]:
        return [self._run_one() for _ in range(n)]

    def pipelined(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            metrics = self.call()
        jax.block_until_ready(metrics)
        return (time.perf_counter() - t) / n


class TorchContender(Contender):
    """The same architecture and training step in PyTorch (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, jax_backend: str, compile_mode: str = "default"):
        self.args = args
        self.jax_backend = jax_backend
        self.compile_mode = compile_mode
        self.name = "torch" if compile_mode == "default" else f"torch_{compile_mode.replace('-', '_')}"

    def _model(self):
        args = self.args
        if not args.small_stem and not args.stage_sizes:
            try:
                import torchvision

                return getattr(torchvision.models, args.arch)(num_classes=args.num_classes), (
                    f"torchvision.models.{args.arch}"
                )
            except Exception:  # not installed, or no such preset there
                pass
        from resnet_jax.torch_reference import torch_resnet

        extra = {"stage_sizes": args.stage_sizes} if args.stage_sizes else {}
        model = torch_resnet(args.arch, args.num_classes, small_stem=args.small_stem, **extra)
        return model, "resnet_jax.torch_reference.torch_resnet"

    def prepare(self) -> dict[str, Any]:
        import torch

        args = self.args
        torch.manual_seed(args.seed)
        # Same kind of device as JAX: a CUDA torch beside CPU-only JAX would compare hardware.
        cuda = self.jax_backend == "gpu"
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("JAX runs on a GPU but this torch build has no CUDA; not comparing.")
        if self.jax_backend not in ("gpu", "cpu"):
            raise RuntimeError(f"no PyTorch comparison on JAX backend {self.jax_backend!r}.")
        self.device = torch.device("cuda" if cuda else "cpu")
        self.torch = torch
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its algorithms
            torch.cuda.reset_peak_memory_stats()  # each contender's own peak
        model, source = self._model()
        model = model.to(self.device, memory_format=torch.channels_last).train()
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt_kwargs = dict(lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
        optimizer_impl = "default"
        if cuda:
            try:
                self.opt = torch.optim.SGD(groups, fused=True, **opt_kwargs)
                optimizer_impl = "fused"
            except (TypeError, RuntimeError):
                self.opt = torch.optim.SGD(groups, **opt_kwargs)
        else:
            self.opt = torch.optim.SGD(groups, **opt_kwargs)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        size = args.image_size
        self.x = torch.randn(args.batch, 3, size, size, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        self.y = torch.randint(0, args.num_classes, (args.batch,), device=self.device)
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
        self.scaler = None
        if self.autocast_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

        want_compile = args.torch_compile == "on" or (args.torch_compile == "auto" and cuda)
        self.model = model
        mode, error = "eager", None
        t = time.perf_counter()
        if want_compile:
            try:
                with _time_limit(args.torch_compile_timeout):
                    self.model = torch.compile(model, mode=self.compile_mode)
                    for _ in range(max(args.warmup, 2)):  # forward and backward graphs compile here
                        self._run_one()
                mode = f"torch.compile(mode={self.compile_mode!r})"
            except Exception as e:  # no compiler toolchain, unsupported op, time limit, ...
                error = f"{type(e).__name__}: {e}"[:500]
                if self.compile_mode != "default":
                    raise RuntimeError(f"torch.compile(mode={self.compile_mode!r}) failed: {error}") from e
                log(f"torch.compile failed, timing eager mode instead: {error}")
                self.model = model
        if mode == "eager":
            for _ in range(max(args.warmup, 1)):
                self._run_one()
        prepare_s = time.perf_counter() - t
        info = {
            "model": source,
            "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name() if cuda else cpu_model(),
            "mode": mode,
            "compile_error": error,
            "channels_last": True,
            "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
            "optimizer_impl": optimizer_impl,
            "threads": torch.get_num_threads(),
            "warmup_and_compile_time_s": prepare_s,
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        }
        return info

    def _step(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            loss = self.loss_fn(self.model(self.x), self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return loss

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _run_one(self) -> float:
        self._sync()
        t = time.perf_counter()
        self._step()
        self._sync()
        return time.perf_counter() - t

    def timed_steps(self, n: int) -> list[float]:
        return [self._run_one() for _ in range(n)]

    def pipelined(self, n: int) -> float:
        """Mean step time of ``n`` steps issued back to back with one sync at the end."""
        self._sync()
        t = time.perf_counter()
        for _ in range(n):
            self._step()
        self._sync()
        return (time.perf_counter() - t) / n


class _time_limit:
    """Raise TimeoutError in the main thread after ``seconds`` (0: no limit; POSIX only)."""

    def __init__(self, seconds: float):
        self.seconds = int(seconds or 0)

    def __enter__(self):
        if self.seconds > 0 and hasattr(signal, "SIGALRM"):

            def expired(signum, frame):
                raise TimeoutError(f"still compiling after {self.seconds} s (--torch-compile-timeout)")

            self.previous = signal.signal(signal.SIGALRM, expired)
            signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc):
        if self.seconds > 0 and hasattr(signal, "SIGALRM"):
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


# ----------------------------------------------------------------------------------------------
# The run.


def summarize_times(times: Sequence[float], batch: int, flops_per_step: float | None, peak: float | None):
    median = statistics.median(times)
    out: dict[str, Any] = {
        "images_per_s": batch / median,
        "step_time_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "timed_steps": len(times),
    }
    if flops_per_step:
        tflops = flops_per_step / median / 1e12
        out["achieved_tflops"] = tflops
        out["mfu"] = tflops / peak if peak else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    env = environment()
    log(f"{env['backend']} x{env['device_count']} ({env['device_kind']}), load {env['load_average']}")
    peak = args.peak_tflops or peak_tflops(env["device_kind"], args.dtype)
    common = dict(num_classes=args.num_classes, small_stem=args.small_stem, dtype=dtype)

    if args.stage_sizes:
        common["stage_sizes"] = args.stage_sizes

    # Library-only options (experiments); the minimal ResNet gets the plain architecture.
    options: dict[str, Any] = {"bn_variance": args.bn_variance}
    if args.bn_recompute:
        options["bn_recompute"] = True
    if args.stem_pad_channels:
        options["stem_pad_channels"] = args.stem_pad_channels
    library = resnet_jax.get_model(args.arch, **common, **options)
    contenders: list[Contender] = [JaxContender("jax", library, args)]
    if args.compare_minimal:
        contenders.append(JaxContender("minimal", minimal_resnet(args.arch, **common), args))
    if args.compare_nnx:
        contenders.append(NNXContender("nnx", library, args, functional=True))
        contenders.append(NNXContender("nnx_jit", library, args, functional=False))
    if args.compare_bn_two_pass:
        two_pass = resnet_jax.get_model(args.arch, **common, **{**options, "bn_variance": "two_pass"})
        contenders.append(JaxContender("jax_bn_two_pass", two_pass, args))
    if args.compare_torch:
        for mode in args.torch_compile_mode.split(","):
            contenders.append(TorchContender(args, env["backend"], mode.strip()))

    result: dict[str, Any] = {
        "benchmark": "train_step",
        "config": {
            **_model_config(args),
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "step": "train.steps.make_train_step via train.steps.jit_train_step (mesh of all devices)",
            "optimizer": OPTIMIZER_DESC,
            "data": "synthetic, generated on device (float32 images, int32 labels)",
        },
        "environment": env,
        "command": "python -m benchmarks.train_step " + " ".join(sys.argv[1:]),
    }
    infos: dict[str, dict[str, Any]] = {}
    ready: list[Contender] = []
    for c in contenders:
        log(f"preparing {c.name} (build, compile, {args.warmup} warm-up steps)")
        try:
            infos[c.name] = c.prepare()
            ready.append(c)
        except Exception as e:
            if c.name == "jax":
                raise
            log(f"{c.name} failed: {type(e).__name__}: {e}")
            infos[c.name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if c.name == "jax":
            # Right after the library's compile and warm-up, before anything else allocates.
            infos["jax"]["peak_memory_bytes"] = peak_memory_bytes()
        elif isinstance(c, JaxContender) and c.name in infos:
            # JAX keeps no per-executable peak: the process peak so far bounds this one's.
            infos[c.name]["process_peak_memory_bytes_so_far"] = peak_memory_bytes()

    times: dict[str, list[float]] = {c.name: [] for c in ready}
    order = list(ready)
    for r in range(args.rounds):
        for c in order:
            log(f"round {r + 1}/{args.rounds}: timing {args.steps} steps of {c.name}")
            times[c.name] += c.timed_steps(args.steps)
        order.reverse()

    macs = infos["jax"]["forward_macs_per_image"]
    flops_img = 3 * 2 * macs
    result["flops"] = {
        "method": "analytic: conv + dense multiply-accumulates from the model's jaxpr; "
        "FLOPs = 2 x MACs; train step = 3 x forward",
        "forward_macs_per_image": macs,
        "forward_flops_per_image": 2 * macs,
        "train_flops_per_image": flops_img,
        "train_flops_per_step": flops_img * args.batch,
        "xla_cost_analysis_flops_per_step": infos["jax"].get("xla_flops_per_step"),
        "peak_tflops": peak,
        "peak_source": "--peak-tflops"
        if args.peak_tflops
        else ("PEAK_TFLOPS table" if peak else "unknown device: MFU is null"),
    }
    for c in contenders:
        entry = dict(infos[c.name])
        if c.name in times:
            entry.update(summarize_times(times[c.name], args.batch, flops_img * args.batch, peak))
            entry["step_times_s"] = times[c.name]
        if isinstance(c, TorchContender) and c.name in times and c.device.type == "cuda":
            entry["peak_memory_bytes"] = int(c.torch.cuda.max_memory_allocated())
        result[c.name] = entry

    if args.pipelined:
        for c in ready:
            if c.name in times:
                t = c.pipelined(args.steps)
                result[c.name]["pipelined_step_time_s"] = t
                result[c.name]["pipelined_images_per_s"] = args.batch / t

    def ratio(a: str, b: str) -> float | None:
        if a in times and b in times:
            return result[a]["images_per_s"] / result[b]["images_per_s"]
        return None

    torch_names = [c.name for c in ready if isinstance(c, TorchContender)]
    best_torch = max(torch_names, key=lambda n: result[n]["images_per_s"], default=None)
    result["ratios"] = {
        "jax_over_torch_images_per_s": ratio("jax", "torch") if args.compare_torch else None,
        "jax_over_best_torch_images_per_s": ratio("jax", best_torch) if best_torch else None,
        "best_torch": best_torch,
        "jax_over_best_torch_pipelined_images_per_s": (
            result["jax"]["pipelined_images_per_s"] / result[best_torch]["pipelined_images_per_s"]
        )
        if args.pipelined and best_torch and "pipelined_images_per_s" in result.get("jax", {})
        else None,
        "bn_shifted_over_two_pass_images_per_s": ratio("jax", "jax_bn_two_pass")
        if args.compare_bn_two_pass
        else None,
        "library_over_minimal_images_per_s": ratio("jax", "minimal") if args.compare_minimal else None,
        "nnx_over_linen_images_per_s": ratio("nnx", "jax") if args.compare_nnx else None,
        "nnx_jit_over_linen_images_per_s": ratio("nnx_jit", "jax") if args.compare_nnx else None,
        "note": "measured side by side in this one run"
        + (", contenders alternating" if args.rounds > 1 else ""),
    }
    if args.compare_torch and jax.device_count() > 1:
        # PyTorch runs on one device; compare like with like by hiding the others.
        result["ratios"]["warning"] = (
            f"JAX used {jax.device_count()} devices and PyTorch one; rerun with one visible device "
            "(e.g. CUDA_VISIBLE_DEVICES=0) for a per-device ratio"
        )

    if hasattr(os, "getloadavg"):
        result["environment"]["load_average_end"] = list(os.getloadavg())
    if args.profile:
        from benchmarks import profile_ops

        jax_c = ready[0]
        log(f"profiling 5 steps into {args.profile}")
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            jax_c.timed_steps(5)
        result["profile_dir"] = args.profile
        try:
            result["profile"] = profile_ops.summarize(args.profile, jax_c.step.as_text(), steps=5)
        except Exception as e:  # a trace format this parser does not know: keep the raw trace
            log(f"profile summary failed: {type(e).__name__}: {e}")
            result["profile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return result


# ----------------------------------------------------------------------------------------------
# Cold vs warm compilation cache, in two fresh processes.


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The model and batch being timed, as the JSON reports them."""
    return {
        "arch": args.arch,
        "batch": args.batch,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "num_classes": args.num_classes,
        "small_stem": args.small_stem,
        "stage_sizes": list(args.stage_sizes or resnet_jax.PRESETS[args.arch]["stage_sizes"]),
    }


def measure_cache(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Run this benchmark twice in new processes with one initially empty cache directory."""
    child_argv = _strip_flags(
        argv,
        valueless={
            "--measure-cache",
            "--compare-torch",
            "--compare-minimal",
            "--no-compilation-cache",
            "--pipelined",
            "--compare-bn-two-pass",
        },
        valued={
            "--compilation-cache",
            "--steps",
            "--warmup",
            "--rounds",
            "--output",
            "--profile",
            "--torch-compile-mode",
            "--torch-compile-timeout",
        },
    )
    tmp = None
    cache_dir = args.compilation_cache
    if not cache_dir or cache_dir.lower() in compile_cache.DISABLED or cache_dir == compile_cache.AUTO:
        tmp = tempfile.TemporaryDirectory(prefix="resnet_jax_cache_")
        cache_dir = tmp.name
    elif compile_cache.cache_entries(cache_dir):
        raise SystemExit(f"--measure-cache needs an empty cache directory; {cache_dir} has files.")
    runs = {}
    try:
        for label in ("cold", "warm"):
            cmd = [sys.executable, "-m", "benchmarks.train_step", *child_argv]
            cmd += [
                "--compilation-cache",
                cache_dir,
                "--steps",
                "2",
                "--warmup",
                "1",
                "--rounds",
                "1",
            ]
            log(f"{label} start: {' '.join(cmd[1:])}")
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{label} run failed:\n{proc.stderr[-3000:]}")
            child = json.loads(proc.stdout)
            j = child["jax"]
            runs[label] = {
                "process_wall_s": wall,
                "process_time_to_first_step_s": j["process_time_to_first_step_s"],
                "init_time_s": j["init_time_s"],
                "lower_time_s": j["lower_time_s"],
                "xla_compile_time_s": j["xla_compile_time_s"],
                "compile_time_s": j["compile_time_s"],
                "first_step_time_s": j["first_step_time_s"],
                "cache_entries_after": j.get("compilation_cache", {}).get("entries_after_compile"),
                "step_was_cached": j.get("compilation_cache", {}).get("step_was_cached"),
            }
            child_env = child["environment"]
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "benchmark": "compilation_cache",
        "config": {
            **_model_config(args),
            "cache_dir": cache_dir if tmp is None else "(temporary, removed afterwards)",
        },
        "environment": child_env,
        "command": "python -m benchmarks.train_step " + " ".join(argv),
        "cold": runs["cold"],
        "warm": runs["warm"],
        "compile_speedup": runs["cold"]["compile_time_s"] / runs["warm"]["compile_time_s"],
        "note": "compile_time_s = lowering + XLA compile of the train step (lowering is never "
        "cached); process_time_to_first_step_s counts from the benchmark module's import",
    }


def _strip_flags(argv: Sequence[str], valueless: set[str], valued: set[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in valueless:
            continue
        if name in valued:
            skip = "=" not in a
            continue
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# Command line.


def _int_tuple(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 3,4,6,3; got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description="Time the compiled training step on synthetic data (JSON on stdout).",
    )
    p.add_argument("--arch", default="resnet50", choices=sorted(resnet_jax.PRESETS))
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--small-stem", action="store_true", help="3x3 stem without max-pool (CIFAR)")
    p.add_argument(
        "--stage-sizes",
        type=_int_tuple,
        default=None,
        metavar="N,N,...",
        help="blocks per stage, replacing the preset's (e.g. 1,1 for a quick two-stage network)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--rounds", type=int, default=1, help="timing rounds, contenders alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-torch", action="store_true", help="also time PyTorch in this run")
    p.add_argument(
        "--torch-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile the PyTorch model (auto: on CUDA only)",
    )
    p.add_argument(
        "--torch-compile-mode",
        default="default",
        help="torch.compile mode; several, comma-separated (default,max-autotune), each timed",
    )
    p.add_argument(
        "--torch-compile-timeout",
        type=float,
        default=0,
        metavar="S",
        help="give up on a torch.compile mode after S seconds (0: no limit)",
    )
    p.add_argument(
        "--compare-bn-two-pass",
        action="store_true",
        help="also time the library with BatchNorm(variance='two_pass')",
    )
    p.add_argument("--compare-minimal", action="store_true", help="also time a minimal Flax ResNet")
    p.add_argument(
        "--compare-nnx",
        action="store_true",
        help="also time the resnet_jax.nnx model (split + jax.jit, and nnx.jit)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--compilation-cache",
        default=compile_cache.AUTO,
        metavar="DIR",
        help=f"persistent compilation cache directory (default: ${compile_cache.ENV_VAR} or "
        f"{compile_cache.DEFAULT_DIR})",
    )
    cache.add_argument("--no-compilation-cache", action="store_true")
    p.add_argument(
        "--measure-cache",
        action="store_true",
        help="report cold and warm compile times from two fresh processes sharing a new cache",
    )
    p.add_argument("--no-donate", action="store_true", help="do not donate the state (experiment)")
    p.add_argument(
        "--bn-variance",
        default="shifted",
        choices=("shifted", "two_pass"),
        help="the library's BatchNorm variance (default: shifted, as configs/imagenet_resnet50.py)",
    )
    p.add_argument("--bn-recompute", action="store_true", help="ResNet(bn_recompute=True) (experiment)")
    p.add_argument(
        "--stem-pad-channels", type=int, default=0, help="ResNet(stem_pad_channels=N) (experiment)"
    )
    p.add_argument("--pipelined", action="store_true", help="also time steps dispatched back to back")
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of 5 steps to DIR")
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    args = p.parse_args(argv)
    for name in ("batch", "image_size", "num_classes", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step is never timed)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.measure_cache:
        result = measure_cache(args, argv)
    else:
        if args.compare_torch:
            # JAX would otherwise reserve 75% of GPU memory up front and starve PyTorch.
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if not args.no_compilation_cache:
            compile_cache.enable_compilation_cache(args.compilation_cache)
        result = run(args)
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
