"""Small callbacks of the training loop that are not methods or evaluations of their own."""

from __future__ import annotations

import lightning as L
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
