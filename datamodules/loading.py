"""What the DataModules of the zoo share: reading images, labelled image datasets and the split loaders.

A datamodule whose split datasets read image files (:class:`LabelledImages` over :class:`ImageFiles`, e.g.
``ImageFolderDataModule``) also serves each sample's **original** decoded image by its dataset ``index``
(:meth:`ZooDataModule.original_image`), before the evaluation transform resized and centre-cropped it: LaZSL cuts
its crops from it (``xvlm.contracts.OriginalImages``). Datasets held as arrays (Shapes, CIFAR) serve none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.transforms import A, apply_transform

Split = Literal["train", "val", "test"]
STAGE_SPLITS: dict[str | None, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}
"""The splits each Lightning stage reads (``predict`` reads the test split)."""


def hold_out_classes(requested: Sequence[str], class_names: Sequence[str], aliases: Sequence[str],
                     source: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split the classes into seen and unseen, the unseen ones named by the ``unseen_classes`` option.

    Args:
        requested: names of the unseen classes, each a class name or an alias.
        class_names: name of every class, in label order.
        aliases: another name of every class (a folder name, the raw name in a metadata file).
        source: the datamodule, for error messages.

    Returns:
        Sorted class indices ``(seen, unseen)``.
    """
    index = {name: c for c, pair in enumerate(zip(aliases, class_names)) for name in pair}
    unknown = [name for name in requested if name not in index]
    if unknown:
        raise ValueError(f"{source}: unseen_classes lists unknown classes {unknown}; choose from {list(class_names)}")
    unseen = tuple(sorted({index[name] for name in requested}))
    if len(unseen) == len(class_names):
        raise ValueError(f"{source}: unseen_classes holds out every class; keep at least one class for training")
    return tuple(c for c in range(len(class_names)) if c not in unseen), unseen


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file (any format OpenCV reads, grey or with alpha) into ``[H, W, 3]`` uint8 RGB.

    Raises:
        ValueError: naming the file when it is empty or cannot be decoded.
    """
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"cannot decode image file {path}: it is empty; replace or remove it")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image file {path}; replace or remove it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageFiles(Sequence):
    """Image files read on access: item ``i`` is ``[H, W, 3]`` uint8 RGB of ``paths[i]``."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_rgb(self.paths[index])


class LabelledImages(Dataset):
    """Images with one class label each, as batch-ready dicts.

    Items: ``image`` ``[3, S, S]`` float (CLIP-normalised), ``label`` and ``index`` (the item's position in this
    dataset) long, ``seen`` bool (the label is a seen class). A random ``transform`` is reseeded per item from
    torch's generator (see :func:`~datamodules.transforms.apply_transform`).

    Args:
        images: ``N`` images, each ``[H, W, 3]`` uint8 RGB (an array ``[N, H, W, 3]`` or :class:`ImageFiles`).
        labels: ``[N]`` class indices.
        seen: indices of the seen classes.
        transform: pipeline from uint8 image to normalised tensor.
        random_transform: whether ``transform`` draws random numbers.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[int], seen: Sequence[int],
                 transform: A.Compose, random_transform: bool) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.seen = torch.isin(self.labels, torch.as_tensor(list(seen), dtype=torch.long))
        self.transform, self.random_transform = transform, random_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        out = apply_transform(self.transform, self.random_transform, image=self.images[index])
        return dict(image=out["image"], label=self.labels[index], index=torch.tensor(index), seen=self.seen[index])

    def original(self, index: int) -> torch.Tensor | None:
        """Item ``index``'s image as decoded from its file, ``[3, H, W]`` uint8 RGB, before any transform; None when
        the images are in-memory arrays (CIFAR) rather than :class:`ImageFiles`."""
        if not isinstance(self.images, ImageFiles):
            return None
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous()


class ZooDataModule(L.LightningDataModule):
    """Base of the zoo: serves ``self.datasets[split]`` through the train/val/test/predict loaders.

    ``setup(stage)`` builds the splits the stage reads; a loader of any other split builds its dataset on first
    use, so callbacks may read every split in every stage. Subclasses implement :meth:`build_dataset` and save
    ``batch_size`` and ``num_workers`` as hyper-parameters. The train loader shuffles; the others keep order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    def build_dataset(self, split: Split) -> Dataset:
        """The dataset of ``split`` (called once per split)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of the splits ``stage`` reads (see :data:`STAGE_SPLITS`)."""
        for split in STAGE_SPLITS[stage]:
            self.dataset(split)

    def dataset(self, split: Split) -> Dataset:
        """The dataset of ``split``, built on first use."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]

    def original_image(self, split: Split, index: int) -> torch.Tensor | None:
        """The original decoded image of sample ``index`` of ``split``: ``[3, H, W]`` uint8 RGB at the file's size.

        It is the image before the split's transform (the evaluation transform resizes the short side and crops the
        centre), so LaZSL can cut crops anywhere in it (``xvlm.contracts.OriginalImages``). None when the split's
        dataset holds no image files (arrays already at their final size, e.g. Shapes and CIFAR).

        Raises:
            ValueError: naming the file when it is empty or cannot be decoded.
        """
        dataset = self.dataset(split)
        return dataset.original(index) if isinstance(dataset, LabelledImages) else None

    def _loader(self, split: Split) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.dataset(split), batch_size=self.hparams.batch_size, shuffle=split == "train",
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
