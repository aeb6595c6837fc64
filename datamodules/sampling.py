"""Sampling that resumes mid-epoch exactly, on one process or many.

An epoch's order is a pure function of ``(seed, epoch)`` and each training sample's augmentation of
``(seed, epoch, index)``, so nothing depends on which process, worker or restart produced a batch:

- :class:`EpochSampler` (a ``DistributedSampler``, so Lightning uses it as is under DDP instead of wrapping it)
  yields this rank's share of the split. For training (``keyed=True``) every item is ``(index, sample_seed)``
  (:func:`sample_seed`), which the datasets use to seed their random transform; shares are padded to equal length as
  ``DistributedSampler`` does, so every rank runs the same number of steps. For evaluation (``even=False``) the
  shares are ``indices[rank::world_size]`` without padding, so no sample is counted twice in a reduced metric.
- :class:`ResumableLoader` is the training ``DataLoader``: its ``state_dict()`` (saved by Lightning in every
  checkpoint) holds the epoch and how many samples of its order the ranks have consumed, and ``load_state_dict``
  makes the next iteration skip exactly those, by index (nothing skipped is decoded), on any number of processes. Its own ``generator`` draws the
  worker base seed, so building an iterator never moves the global torch generator whose state checkpoints restore.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

__all__ = ["EpochSampler", "ResumableLoader", "SampleKey", "sample_seed", "split_key"]

SampleKey = int | tuple[int, int]
"""A dataset key: an index, or ``(index, augmentation seed)`` from a keyed :class:`EpochSampler`."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 31-bit seed of one sample's augmentation in one epoch, mixed by numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1)[0] >> 1)


def split_key(key: SampleKey) -> tuple[int, int | None]:
    """``(index, seed)`` of a dataset key: a plain index (no seed: evaluation, or a loader of one's own) or the
    ``(index, sample_seed)`` pair of a keyed :class:`EpochSampler`."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


class EpochSampler(DistributedSampler):
    """This rank's indices of a dataset for the current epoch (module docstring).

    The epoch's order is ``randperm(n)`` seeded by ``seed + epoch`` (``arange(n)`` without ``shuffle``), padded by
    repeating its start to a multiple of ``world_size`` when ``even``; rank ``r`` takes positions
    ``r, r + world_size, ...``. A resume (:meth:`resume`) drops the first positions of that order, the samples the
    ranks had consumed together, and shards the rest; on another number of processes the rest is then cut or
    extended (from the start of the order) to the steps the loop still expects of the epoch in the new layout, so
    the epoch ends, validates and checkpoints where the loop expects it, each remaining sample seen at least once
    when the rest fits.
    Args:
        dataset: anything with ``len``.
        shuffle: a new permutation per epoch, else dataset order.
        seed: the permutation and augmentation seed (the same on every rank).
        rank: this process's rank.
        world_size: number of processes.
        even: pad the shares to equal length (training) instead of leaving them unequal (evaluation).
        keyed: yield ``(index, sample_seed(seed, epoch, index))`` instead of ``index``.
    """

    def __init__(self, dataset: Sized, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 even: bool = True, keyed: bool = False) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.even, self.keyed = even, keyed
        if not even:
            self.num_samples = max(0, math.ceil((len(dataset) - rank) / world_size))
        self._resume: tuple[int, int] | None = None

    def resume(self, samples: int, items: int) -> None:
        """Make the next iteration (only) continue the epoch after its first ``samples`` positions, which all ranks
        together consumed, each rank having yielded ``items`` of its share."""
        self._resume = (samples, items)

    def __iter__(self) -> Iterator[SampleKey]:
        order = (torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(len(self.dataset))).tolist()
        order = self._padded(order)
        if self._resume is not None:
            (samples, items), self._resume = self._resume, None
            wanted = max(0, self.num_samples - items) * self.num_replicas
            rest = order[samples:]
            order = (rest + order * math.ceil(max(0, wanted - len(rest)) / max(1, len(order))))[:wanted]
        for index in order[self.rank :: self.num_replicas]:
            yield (index, sample_seed(self.seed, self.epoch, index)) if self.keyed else index

    def _padded(self, order: list[int]) -> list[int]:
        """``order`` repeated from its start up to a multiple of ``world_size`` (unchanged unless ``even``)."""
        if not self.even or not order:
            return order
        missing = -len(order) % self.num_replicas
        return order + (order * math.ceil(missing / len(order)))[:missing]


class ResumableLoader(DataLoader):
    """Training ``DataLoader`` over an :class:`EpochSampler` whose position Lightning checkpoints (module docstring).

    Args:
        *args, **kwargs: those of ``DataLoader``; ``sampler`` must be an :class:`EpochSampler`.
        progress: ``() -> (batches of this epoch the loop has finished, batches per epoch)``, read when Lightning
            saves a checkpoint (the datamodule reads them from its trainer).
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError(f"ResumableLoader needs an EpochSampler, got {type(self.sampler).__name__}")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": k, "samples": s}``: the next step is batch ``k`` of epoch ``e``, whose first
        ``s = k × batch_size × world_size`` positions the ranks have consumed together."""
        done, per_epoch = self.progress() if self.progress is not None else (0, len(self))
        if done >= per_epoch:
            return {"epoch": self.sampler.epoch + 1, "batches": 0, "samples": 0}
        batch = self.batch_size or 1
        return {"epoch": self.sampler.epoch, "batches": done, "samples": done * batch * self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at batch ``state["batches"]`` of epoch ``state["epoch"]`` on the next iteration."""
        self.sampler.set_epoch(state["epoch"])
        self.sampler.resume(state["samples"], state["batches"] * (self.batch_size or 1))
