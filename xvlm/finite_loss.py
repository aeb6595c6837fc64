"""Stop on a non-finite loss before it reaches the weights or a checkpoint.

A NaN or infinite loss trains on silently in plain Lightning: its gradients poison the weights, and the next
periodic checkpoint overwrites the last good ``last.ckpt`` with a broken model. :class:`FiniteLoss` checks the loss
before the optimizer step; a non-finite one raises :class:`NonFiniteLossError` naming the global step, the epoch
and batch, and the values of the loss terms the module logged for this step, so nothing after the last good step
is written (the newest checkpoint stays the last good one) and the run can be resumed from it after the fix.

The check reads the loss back from the device once per optimizer step, after the backward pass has been queued
(the host then waits only for work already launched, and launches the optimizer step next), not before the
backward pass, where the device would idle while the host launches the whole backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["FiniteLoss", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite (message: step, batch and the logged loss terms)."""


class FiniteLoss(Callback):
    """Raise :class:`NonFiniteLossError` before the optimizer step after a non-finite loss (module docstring)."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        if not losses:
            return
        finite = torch.stack([torch.isfinite(loss).all() for loss in losses])
        if bool(finite.all()):
            return
        loss = losses[int((~finite).nonzero()[0])]
        terms = {name: float(value) for name, value in trainer.callback_metrics.items()
                 if name.startswith("train/") and isinstance(value, torch.Tensor) and value.numel() == 1}
        listed = ", ".join(f"{name} {value:.6g}" for name, value in sorted(terms.items())) or "none logged"
        epoch_loop = trainer.fit_loop.epoch_loop
        raise NonFiniteLossError(
            f"loss is {float(loss.float().sum()) if loss.numel() == 1 else 'non-finite'} at global step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}, batch {epoch_loop.batch_progress.current.ready - 1}); "
            f"loss terms of this step: {listed}; non-finite terms: "
            f"{[name for name, value in terms.items() if not math.isfinite(value)] or 'none logged'}. Nothing of "
            "this step was saved: the newest checkpoint is the last good one. Lower the learning rate or check the "
            "inputs of this batch, then resume with --ckpt_path last."
        )
