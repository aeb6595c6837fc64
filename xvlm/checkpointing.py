"""Checkpoint helpers shared by every module and the CLI: class identity, RNG state, loading weights from other
runs, atomic writes and finding the newest checkpoint that loads.

- :class:`AtomicCheckpointIO` (the CLI's default ``CheckpointIO``) writes every checkpoint to a temporary file in the
  target's folder, flushes and fsyncs it, and ``os.replace``-s it over the target: a kill or a full disk mid-write
  leaves the previous file as it was, never a truncated one.
- :class:`ResumeCheckpoint` is Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` every
  ``every_n_train_steps`` steps *and* at every epoch end (Lightning 2.6 writes it at epoch end only when the
  periodic trigger fires in the same step).
- :func:`newest_loadable_checkpoint` resolves ``--ckpt_path last``: the newest ``*.ckpt`` of a run folder that
  loads (``last.ckpt`` first when it is as new as any), skipping truncated or foreign files with a warning that
  names them; nothing is deleted.
"""

from __future__ import annotations

import errno
import importlib
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import lightning as L
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

CLASS_KEY = "xvlm_class_path"
RNG_KEY = "xvlm_rng_state"


def class_path(obj_or_cls: object) -> str:
    """Importable dotted path of a class (or of an instance's class)."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical_class_path(dotted: str) -> str:
    """The defining module's path of the class ``dotted`` names (``xvlm.methods.CLIPFineTune`` ->
    ``xvlm.methods.clip.CLIPFineTune``); ``dotted`` itself if it cannot be imported."""
    module_name, _, name = dotted.rpartition(".")
    try:
        return class_path(getattr(importlib.import_module(module_name), name))
    except (ImportError, AttributeError, ValueError):
        return dotted


def checkpoint_class_path(checkpoint: dict[str, Any]) -> str | None:
    """The module class a checkpoint was written by, if recorded (by xvlm or by the Lightning CLI)."""
    if CLASS_KEY in checkpoint:
        return checkpoint[CLASS_KEY]
    return checkpoint.get("hyper_parameters", {}).get("_class_path")


def check_checkpoint_class(checkpoint: dict[str, Any], expected: str, source: str = "checkpoint") -> None:
    """Raise if ``checkpoint`` was written by a module class other than ``expected``."""
    found = checkpoint_class_path(checkpoint)
    if found is None:
        return
    found, expected = canonical_class_path(found), canonical_class_path(expected)
    if found != expected:
        raise ValueError(
            f"{source} was written by {found}, but the configured model is {expected}. Resume with the same "
            f"model class, or start from its weights with `--model.init_args.init_weights {source}`."
        )


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, for exact resumption.

    Only tensors and plain Python values, so checkpoints stay loadable with ``torch.load(weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(module: nn.Module, path: str | Path, prefixes: tuple[str, ...] = ("", "backbone.clip.")) -> None:
    """Load the tensors of ``path`` whose names match ``module``'s parameters (start from other weights).

    ``path`` is a Lightning checkpoint (``state_dict`` key) or a plain state dict, read with ``weights_only=True``.
    Names are tried with each of ``prefixes`` prepended (a bare open_clip state dict maps onto
    ``backbone.clip.*``). Fails if no tensor matches or a matching name has another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights: file '{path}' does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = module.state_dict()
    matched: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        for key, value in state.items():
            name = prefix + key
            if name in own and name not in matched:
                if own[name].shape != value.shape:
                    raise ValueError(f"init_weights '{path}': '{key}' has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(own[name].shape)}")
                matched[name] = value
    if not matched:
        raise ValueError(f"init_weights '{path}': no tensor name matches this model; is it an xvlm or open_clip "
                         "checkpoint of the same architecture?")
    module.load_state_dict(matched, strict=False)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the message names it and says the previous file is intact)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic: temporary file in the target's folder, flush, ``fsync``,
    ``os.replace`` (then the folder is fsynced so the rename survives a power cut).

    A failed write (``OSError``, e.g. a full disk) removes the temporary file and raises
    :class:`CheckpointWriteError` naming the target and saying that the previous checkpoint there is intact. The
    file gets the permissions of any new file (``0o666`` less the umask), as ``open`` would give it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                self.write(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0o600
            os.replace(temporary, target)
        except BaseException as error:
            Path(temporary).unlink(missing_ok=True)
            if isinstance(error, OSError):
                reason = "the disk is full" if error.errno == errno.ENOSPC else str(error)
                raise CheckpointWriteError(error.errno, f"could not write checkpoint {target}: {reason}; the previous file there "
                                           "(if any) is intact. Free space or move --checkpoint_dir, then resume "
                                           "with --ckpt_path last") from error
            raise
        _fsync_folder(target.parent)

    def write(self, checkpoint: dict[str, Any], file: Any) -> None:
        """Serialise ``checkpoint`` into the open binary ``file`` (``torch.save``)."""
        torch.save(checkpoint, file)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Persist a rename in ``folder`` (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True, mmap=True)`` on the CPU (tensors stay on disk until read), with errors
    that name the file and say why.

    Raises:
        ValueError: if the file is truncated, not a torch checkpoint, or needs full unpickling.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        raise ValueError(f"checkpoint {path} cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0]}); "
                         "it is truncated or not a checkpoint written by xvlm/Lightning") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def newest_loadable_checkpoint(folder: str | Path, expected_class: str | None = None,
                               report: Callable[[str], None] = warnings.warn) -> Path | None:
    """The newest ``*.ckpt`` in ``folder`` that loads (and, given ``expected_class``, was written by that module
    class), or None if there is none.

    Newest = latest modification time; ``last.ckpt`` wins ties (it is written right after the periodic checkpoint
    it copies). Every skipped file is named, with the reason, through ``report`` (a warning by default; the CLI
    prints to stderr, which no warning filter hides); no file is moved or deleted.
    """
    candidates = sorted(Path(folder).glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"),
                        reverse=True)
    for path in candidates:
        try:
            checkpoint = load_checkpoint_file(path)
            if expected_class is not None:
                check_checkpoint_class(checkpoint, expected_class, source=str(path))
        except ValueError as error:
            report(f"--ckpt_path last: skipping {path}: {error}")
            continue
        return path
    return None


class ResumeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (no monitor, ``save_last``) whose ``last.ckpt`` is also written at every epoch end.

    With ``every_n_train_steps`` set, Lightning 2.6 writes ``last.ckpt`` at an epoch end only when the step trigger
    fires in that very step, so a run pre-empted after validation would redo part of the epoch and its validation;
    here the end-of-epoch state (after validation, or at the training epoch end when there is none) is always the
    newest ``last.ckpt``.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_at_epoch_end(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_at_epoch_end(trainer)

    def _save_last_at_epoch_end(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
