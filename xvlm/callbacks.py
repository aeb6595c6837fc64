"""Small callbacks of the training loop that are not methods or evaluations of their own."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

SUMMARY_PREFIXES = ("val/", "lazsl/", "saliency/")


def format_metrics(metrics: dict[str, float], prefixes: tuple[str, ...] = SUMMARY_PREFIXES) -> str:
    """``"val/S 0.912 | val/U 0.634 | ..."`` for the metrics whose names start with one of ``prefixes``."""
    keys = sorted(k for k in metrics if k.startswith(prefixes))
    return " | ".join(f"{k} {float(metrics[k]):.3f}" for k in keys)


class EpochSummary(Callback):
    """Prints one line per validation epoch with the evaluation metrics (seen/unseen accuracy, H, LaZSL, ...)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        line = format_metrics(trainer.callback_metrics)
        if line:
            trainer.print(f"\nepoch {trainer.current_epoch}: {line}")


class SkippedImages(Callback):
    """Logs per epoch how many samples the datamodule dropped for unreadable image files (``on_bad_image: skip``).

    Sums the batches' ``skipped_images`` (:meth:`datamodules.loading.LabelledImages.collate_readable`) over an
    epoch's train, validation or test batches and logs the sum once at the epoch's end as
    ``data/skipped_{train,val,test}_images``, added up over DDP ranks (each counts its own shard; the distributed
    sampler's padding repeats a few samples, which may count a bad file twice). Each epoch starts from zero; the
    sanity check's sum is dropped with its other logs. Batches without the key (other datamodules,
    ``on_bad_image: error``) are ignored; an epoch without such batches logs nothing.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def _add(self, stage: str, batch: Any) -> None:
        if isinstance(batch, dict) and "skipped_images" in batch:
            self._sums[stage] = self._sums.get(stage, 0) + batch["skipped_images"]

    def _log(self, stage: str, pl_module: L.LightningModule) -> None:
        total = self._sums.pop(stage, None)
        if total is not None:
            pl_module.log(f"data/skipped_{stage}_images", total.float(), reduce_fx="sum", sync_dist=True,
                          on_step=False, on_epoch=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums.pop("train", None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._add("train", batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log("train", pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums.pop("val", None)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._add("val", batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log("val", pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums.pop("test", None)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._add("test", batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log("test", pl_module)
