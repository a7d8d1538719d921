"""The PyTorch contender of ``python -m benchmarks.train_step --compare-torch``.

The same architecture, batch, loss (label-smoothed cross-entropy) and optimizer (SGD, Nesterov
momentum 0.9, weight decay on conv/dense kernels) as the JAX step, in the same process:
channels_last, autocast to ``--dtype`` when it is not float32, and ``torch.compile`` on CUDA
(eager if compiling fails; the mode that ran is reported). torch is imported only when a
contender is prepared, so the benchmark needs it only for ``--compare-torch``.
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from benchmarks.report import cpu_model
from benchmarks.step_common import LABEL_SMOOTHING, LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, Contender, log


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
        cuda = self._select_device(torch)
        model, source = self._model()
        model = model.to(self.device, memory_format=torch.channels_last).train()
        optimizer_impl = self._make_optimizer(model, cuda)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        self._make_batch()

        t = time.perf_counter()
        mode, error = self._compile_and_warm_up(model, cuda)
        prepare_s = time.perf_counter() - t
        return {
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

    def _select_device(self, torch: Any) -> bool:
        """Set ``self.device`` to JAX's kind of device; whether that is CUDA."""
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
        return cuda

    def _make_optimizer(self, model: Any, cuda: bool) -> str:
        """SGD with weight decay on the kernels only into ``self.opt``; which implementation."""
        torch = self.torch
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt_kwargs = dict(lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
        if cuda:
            try:
                self.opt = torch.optim.SGD(groups, fused=True, **opt_kwargs)
                return "fused"
            except (TypeError, RuntimeError):
                pass
        self.opt = torch.optim.SGD(groups, **opt_kwargs)
        return "default"

    def _make_batch(self) -> None:
        """The timed batch on the device, and the autocast dtype and loss scaler for ``--dtype``."""
        torch, args = self.torch, self.args
        size = args.image_size
        self.x = torch.randn(args.batch, 3, size, size, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        self.y = torch.randint(0, args.num_classes, (args.batch,), device=self.device)
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
        self.scaler = None
        if self.autocast_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

    def _compile_and_warm_up(self, model: Any, cuda: bool) -> tuple[str, str | None]:
        """``torch.compile`` where asked (eager if that fails) and run the warm-up steps.

        Returns the mode that ran and the compile error, if any.
        """
        args = self.args
        want_compile = args.torch_compile == "on" or (args.torch_compile == "auto" and cuda)
        self.model = model
        mode, error = "eager", None
        if want_compile:
            try:
                with _time_limit(args.torch_compile_timeout):
                    self.model = self.torch.compile(model, mode=self.compile_mode)
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
        return mode, error

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
