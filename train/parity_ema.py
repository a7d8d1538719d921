"""The EMA of ``python -m train.parity``'s PyTorch side (``train/ema.py`` is ours), as timm's and
torchvision's training scripts keep it:

* ``ema_every_steps=0``: timm's ``ModelEmaV3(model, decay=ema_decay, use_warmup=ema_warmup)``,
  ``update(model, step=n)`` after the n-th optimizer step, as timm's ``train.py`` calls it.
* ``ema_every_steps=N > 0``: torchvision's reference script's ``ExponentialMovingAverage``, which
  is ``torch.optim.swa_utils.AveragedModel`` with ``use_buffers=True`` and an exponential
  average (here torch's own ``get_ema_multi_avg_fn``): the decay adjusted as the script adjusts
  it (``alpha = min(1, (1 - decay) * batch_size * N / epochs)``), updated after batch ``i`` of
  an epoch when ``i % N == 0``, and ``n_averaged`` reset to 0 after the updates of the warm-up
  epochs (so those, and the first after them, copy the model).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from resnet_jax.torch_reference import import_reference


class TorchEma:
    """The PyTorch EMA of a config; ``after(n, model)`` after optimizer step ``n`` (1-based)."""

    def __init__(self, model: torch.nn.Module, config: Any, steps_per_epoch: int, total_steps: int):
        self.every, self.spe = int(config.ema_every_steps), steps_per_epoch
        self.warmup_epochs = float(config.warmup_epochs)
        if self.every == 0:
            self.ema = import_reference("timm.utils").ModelEmaV3(
                model, decay=float(config.ema_decay), use_warmup=bool(config.ema_warmup)
            )
            self.module = self.ema.module
        else:
            epochs = config.num_epochs if config.num_train_steps <= 0 else total_steps / steps_per_epoch
            alpha = min(1.0, (1.0 - float(config.ema_decay)) * config.batch_size * self.every / epochs)
            swa = torch.optim.swa_utils
            self.ema = swa.AveragedModel(
                model, multi_avg_fn=swa.get_ema_multi_avg_fn(1.0 - alpha), use_buffers=True
            )
            self.module = self.ema.module

    def after(self, n: int, model: torch.nn.Module) -> None:
        if self.every == 0:
            self.ema.update(model, step=n)
            return
        epoch, i = divmod(n - 1, self.spe)
        if i % self.every == 0:
            self.ema.update_parameters(model)
            if epoch < self.warmup_epochs:
                self.ema.n_averaged.fill_(0)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.module.state_dict().items()}


def make(model: torch.nn.Module, config: Any, steps_per_epoch: int, total_steps: int) -> TorchEma | None:
    """The config's EMA of ``model`` (a copy made now, from the initial weights), or None."""
    if not config.ema_decay:
        return None
    return TorchEma(model, config, steps_per_epoch, total_steps)
