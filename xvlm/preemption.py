"""Pre-emption: on SIGTERM or SLURM's warning signal, save a resumable checkpoint at the next step boundary, requeue
the SLURM job, and stop.

Lightning's own SLURM handler saves from inside the signal handler, i.e. at whatever point of a training step the
signal arrives (possibly between the optimiser step and the progress counters), and keeps training; its SIGTERM
handler stops without saving. :class:`Preemption` only records the signal; after the current step
(``on_train_batch_end``, where the loop state is consistent) the ranks agree whether any of them was signalled,
the resume checkpoint callback writes ``last.ckpt`` (atomically, through the trainer's ``CheckpointIO``), rank 0
runs ``scontrol requeue $SLURM_JOB_ID`` when the run is a SLURM job (``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID``
for array tasks), and the run ends at once (Lightning's ``SIGTERMException``: exit status 0, no end-of-epoch
hooks that would write a checkpoint claiming the epoch complete). The requeued job runs the same command with
``--ckpt_path last`` and continues from that step. Use it with ``SLURMEnvironment(auto_requeue=False)`` (``configs/trainer/slurm.yaml``).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import FrameType

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["Preemption", "slurm_job_id"]


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job (``<array job>_<task>`` for array tasks), or None."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(Callback):
    """Checkpoint, requeue and stop after the step during which a pre-emption signal arrived (module docstring).

    Args:
        signals: names of the signals that mean "pre-empted" (``SIGUSR1`` is what ``sbatch --signal=SIGUSR1@90``
            sends; ``SIGTERM`` is what SLURM, Kubernetes and ``kill`` send before killing).
        requeue: run ``scontrol requeue`` on rank 0 when the process is a SLURM job.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True) -> None:
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"Preemption signals={list(signals)!r}: unknown {unknown} on this platform")
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        for signum in self.signals:  # Lightning registers its own after on_fit_start: ours replace them for training
            self._previous[signum] = signal.signal(signum, self._record)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        signalled = torch.tensor(self.received is not None, device=pl_module.device)
        if not trainer.strategy.reduce_boolean_decision(signalled, all=False):
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        path = self._save(trainer)
        rank_zero_info(f"Pre-empted ({name}) after global step {trainer.global_step}: saved {path}")
        job = slurm_job_id()
        if self.requeue and job is not None and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                rank_zero_info(f"Requeued SLURM job {job}")
            else:
                rank_zero_warn(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()}")
        self.received = None
        # not `should_stop`: that would end the epoch early, and its end-of-epoch hooks would overwrite last.ckpt with
        # a state that claims the epoch complete
        raise SIGTERMException

    @staticmethod
    def _save(trainer: L.Trainer) -> Path:
        """Write ``last.ckpt`` where the resume checkpoint callback keeps it (the run folder otherwise)."""
        resume = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
        folder = Path(resume[0].dirpath) if resume and resume[0].dirpath else Path(trainer.default_root_dir)
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)
        return path
