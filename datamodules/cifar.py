"""CIFAR-10 and CIFAR-100 read from the python-pickle batches of https://www.cs.toronto.edu/~kriz/cifar.html.

Expected files (``root`` may be their parent folder or the batches folder itself; nothing is downloaded):

- CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and
  ``batches.meta`` (``label_names``);
- CIFAR-100: ``cifar-100-python/`` with ``train``, ``test`` and ``meta`` (``fine_label_names``); labels are the
  ``fine_labels``.

Each batch holds ``data`` ``[n, 3072]`` uint8 (per image the red, green and blue 32 x 32 planes, rows in order)
and the labels. The pickles come from Python 2, so their keys load as bytes; str keys are accepted too. They are
unpickled, which runs code: read only files from the official archive.

Class names are the meta names in label order (``_`` turned into spaces, never sorted). Validation is a seeded
hold-out of ``val_fraction`` of every class of the training set, so model selection never sees the test batch.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules.loading import LabelledImages, Split, ZooDataModule, hold_out_classes
from datamodules.task import Task
from datamodules.transforms import CIFAR_SIZE, cifar_train_transform, eval_transform

Variant = Literal["cifar10", "cifar100"]
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant keeps its data.

    Attributes:
        folder: name of the extracted batches folder.
        archive: name of the archive on the CIFAR page that holds it.
        train: training batch files.
        test: test batch file.
        meta: metadata file.
        names_key: metadata key of the class names.
        labels_key: batch key of the labels.
    """

    folder: str
    archive: str
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: str
    labels_key: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


LAYOUTS: dict[str, Layout] = {
    "cifar10": Layout("cifar-10-batches-py", "cifar-10-python.tar.gz", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      "test_batch", "batches.meta", "label_names", "labels"),
    "cifar100": Layout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "meta",
                       "fine_label_names", "fine_labels"),
}


def _batches_folder(root: str, layout: Layout, source: str) -> Path:
    """The folder holding every file of ``layout``: ``root`` itself or ``root/<layout.folder>``."""
    for folder in (Path(root), Path(root, layout.folder)):
        if (folder / layout.meta).is_file():
            missing = [name for name in layout.files if not (folder / name).is_file()]
            if missing:
                raise ValueError(f"{source}: {missing} missing from {folder}; extract {layout.archive} from {URL} "
                                 f"again")
            return folder
    raise ValueError(f"{source}: no CIFAR files found; expected {Path(root, layout.folder)}/ with "
                     f"{', '.join(layout.files)} (or root pointing at that folder). Download {layout.archive} "
                     f"from {URL} and extract it into root")


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict:
    """The given entries of a CIFAR pickle, under str keys whether the file stores bytes or str keys."""
    with open(path, "rb") as file:
        content = pickle.load(file, encoding="bytes")
    content = {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}
    missing = [key for key in keys if key not in content]
    if missing:
        raise ValueError(f"{path} has no {missing}; is it a CIFAR python batch? Get the files from {URL}")
    return {key: content[key] for key in keys}


def _read_batches(folder: Path, names: tuple[str, ...], labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 32, 32, 3]`` uint8 RGB and labels ``[N]`` of the given batch files, concatenated."""
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name, ("data", labels_key))
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIZE**2:
            raise ValueError(f"{folder / name}: data has shape {data.shape}, expected [n, {3 * CIFAR_SIZE**2}]")
        images.append(data.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[labels_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into kept and held-out parts with ``fraction`` of every class held out.

    Each class holds out ``round(fraction * n_c)`` of its ``n_c`` samples (halves round up), chosen by a
    generator seeded with ``seed``.

    Args:
        labels: ``[N]`` class index per sample.
        fraction: share of each class to hold out.
        seed: seed of the choice.

    Returns:
        Sorted indices ``(kept, held_out)`` into ``labels``.
    """
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        held_out.append(rng.permutation(members)[: int(fraction * len(members) + 0.5)])
    held = np.sort(np.concatenate(held_out))
    return np.setdiff1d(np.arange(len(labels)), held), held


class CIFARDataModule(ZooDataModule):
    """CIFAR-10/100 as a DataModule; ``self.task`` is ready after ``__init__`` (see the module docstring).

    Train batches hold seen classes only; validation (held out of the training set) and test batches hold every
    class, flagged by ``seen``. Items: ``image`` ``[3, S, S]`` float (CLIP-normalised), ``label``, ``index``
    (position in the split's dataset) and ``seen``.

    Args:
        root: folder holding the extracted batches folder, or that folder itself.
        variant: ``cifar10`` or ``cifar100``.
        image_size: side ``S`` of the images (resized from 32 when different).
        batch_size: samples per batch.
        num_workers: data loader workers.
        val_fraction: share of every training class held out for validation.
        unseen_classes: class names held out of training (as in ``Task.class_names`` or as in the meta file).
        augment: apply the LICO training augmentation (pad 4, random crop, horizontal flip).
        seed: seed of the validation hold-out.
    """

    def __init__(self, root: str, variant: Variant = "cifar10", image_size: int = 32, batch_size: int = 128,
                 num_workers: int = 4, val_fraction: float = 0.1, unseen_classes: list[str] | None = None,
                 augment: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        source = f"CIFARDataModule(root={str(root)!r}, variant={variant!r})"
        if variant not in LAYOUTS:
            raise ValueError(f"{source}: unknown variant; choose one of {list(LAYOUTS)}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"{source}: val_fraction={val_fraction} must lie strictly between 0 and 1")
        self.layout = LAYOUTS[variant]
        self.folder = _batches_folder(root, self.layout, source)
        raw = _unpickle(self.folder / self.layout.meta, (self.layout.names_key,))[self.layout.names_key]
        raw = [name.decode() if isinstance(name, bytes) else name for name in raw]
        names = tuple(name.replace("_", " ") for name in raw)
        seen, unseen = hold_out_classes(unseen_classes or [], names, raw, source)
        self.task = Task(source=source, class_names=names, seen=seen, unseen=unseen)

    @cached_property
    def _holdout(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Images and labels of the train (seen classes only) and val parts of the training batches."""
        images, labels = _read_batches(self.folder, self.layout.train, self.layout.labels_key)
        kept, held = stratified_holdout(labels, self.hparams.val_fraction, self.hparams.seed)
        kept = kept[np.isin(labels[kept], self.task.seen)]
        return {"train": (images[kept], labels[kept]), "val": (images[held], labels[held])}

    def build_dataset(self, split: Split) -> LabelledImages:
        """The train or val part of the training batches, or the test batch."""
        if split == "test":
            images, labels = _read_batches(self.folder, (self.layout.test,), self.layout.labels_key)
        else:
            images, labels = self._holdout[split]
        random = split == "train" and self.hparams.augment
        size = self.hparams.image_size
        transform = cifar_train_transform(size) if random else eval_transform(size)
        return LabelledImages(images, labels, self.task.seen, transform, random_transform=random)
