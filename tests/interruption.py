"""Callbacks that interrupt a run the way clusters do (used by the end-to-end tests through ``--trainer.callbacks+``),
and faults injected into a run the same way (a NaN loss, a disk that fills up)."""

import errno
import os
import shutil
import signal
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch

from xvlm.checkpointing import AtomicCheckpointIO


class StopAfterEpochs(L.Callback):
    """Ends training after ``epochs`` epochs, whatever ``max_epochs`` says (its schedule stays that of the full run)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class SignalAtStep(L.Callback):
    """Sends ``signal`` (a name, e.g. ``SIGKILL``, ``SIGUSR1``) to this process when training step ``step`` (the
    global step about to run) starts, i.e. in the middle of the step as far as the loop is concerned; on every
    process, or only on global rank ``rank``."""

    def __init__(self, step: int, signal: str = "SIGKILL", rank: int | None = None) -> None:
        self.step, self.signal, self.rank = step, signal, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal))


class NaNWeightsAtStep(L.Callback):
    """Fills every parameter of the module with NaN when training step ``step`` (the global step about to run) starts,
    so that step's loss is NaN while every checkpoint before it holds finite weights."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))


class FullDiskAfterSaves(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` on a disk that fills up: the first ``saves`` checkpoints are written, every later write
    stops half-way with ``OSError(ENOSPC)`` (a ``trainer.plugins`` entry).

    Right before the first failing write, the checkpoints of the target's folder are copied to ``snapshot``: what the
    failure must leave intact, to compare with what is there after the run.
    """

    def __init__(self, saves: int, snapshot: str) -> None:
        super().__init__()
        self.saves, self.snapshot = saves, Path(snapshot)
        self.written = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if self.written == self.saves and not self.snapshot.exists():
            shutil.copytree(Path(path).parent, self.snapshot)
        super().save_checkpoint(checkpoint, path, storage_options)
        self.written += 1

    def write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        if self.written < self.saves:
            super().write(checkpoint, file)
            return
        file.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
