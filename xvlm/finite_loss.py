"""Stop on a non-finite loss before it reaches the weights or a checkpoint.

A NaN or infinite loss trains on silently in plain Lightning: its gradients poison the weights, and the next
periodic checkpoint overwrites the last good ``last.ckpt`` with a broken model. :class:`FiniteLoss` checks the loss
before the backward pass; a non-finite one raises :class:`NonFiniteLossError` naming the global step, the epoch
and batch, and the values of the loss terms the module logged for this step, so nothing after the last good step
is written (the newest checkpoint stays the last good one) and the run can be resumed from it after the fix.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["FiniteLoss", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite (message: step, batch and the logged loss terms)."""


class FiniteLoss(Callback):
    """Raise :class:`NonFiniteLossError` before the backward pass of a non-finite loss (module docstring)."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        terms = {name: float(value) for name, value in trainer.callback_metrics.items()
                 if name.startswith("train/") and isinstance(value, torch.Tensor) and value.numel() == 1}
        listed = ", ".join(f"{name} {value:.6g}" for name, value in sorted(terms.items())) or "none logged"
        epoch_loop = trainer.fit_loop.epoch_loop
        raise NonFiniteLossError(
            f"loss is {float(loss.detach().float().sum()) if loss.numel() == 1 else 'non-finite'} at global step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}, batch {epoch_loop.batch_progress.current.ready - 1}); "
            f"loss terms of this step: {listed}; non-finite terms: "
            f"{[name for name, value in terms.items() if not math.isfinite(value)] or 'none logged'}. Nothing of "
            "this step was saved: the newest checkpoint is the last good one. Lower the learning rate or check the "
            "inputs of this batch, then resume with --ckpt_path last."
        )
