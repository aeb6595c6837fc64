"""What the DataModules of the zoo share: reading images, labelled image datasets and the split loaders.

A datamodule whose split datasets read image files (:class:`LabelledImages` over :class:`ImageFiles`, e.g.
``ImageFolderDataModule``) also serves each sample's **original** decoded image by its dataset ``index``
(:meth:`ZooDataModule.original_image`), before the evaluation transform resized and centre-cropped it: LaZSL cuts
its crops from it (``xvlm.contracts.OriginalImages``). Datasets held as arrays (Shapes, CIFAR) serve none.

An image file that cannot be read (missing, empty, truncated, not an image) raises :class:`BadImageError` naming it,
or, in a dataset built with ``skip_unreadable`` (the ``on_bad_image: skip`` option of ``ImageFolderDataModule``), is
dropped from its batch by :meth:`LabelledImages.collate_readable`, which counts the drops in
``batch["skipped_images"]`` (``xvlm.callbacks.SkippedImages`` logs them per epoch).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.sampling import EpochSampler, ResumableLoader, SampleKey, split_key
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


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
"""The start-of-image and end-of-image markers of a JPEG file."""
JPEG_SCAN = 0xDA
"""The start-of-scan marker's code: compressed data follow its header, up to the end-of-image marker."""
PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
"""The PNG signature and the final ``IEND`` chunk's type and CRC (the same in every PNG file)."""
SKIP_HINT = ", or drop unreadable samples with the datamodule option on_bad_image: skip"


def missing_images(message: str, skip: bool, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message + SKIP_HINT)`` about images found missing when a datamodule is built, or with ``skip``
    (``on_bad_image: skip``) warn that their samples are skipped."""
    if not skip:
        raise error(message + SKIP_HINT)
    warnings.warn(message + "; their samples are skipped (on_bad_image: skip)")


class BadImageError(ValueError):
    """An image file that cannot be read or decoded; the message names it and says how to fix it.

    Args:
        message: what is wrong with which file.
        path: the file; None when a loader worker re-raised the error (PyTorch rebuilds it from its message).
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def _jpeg_cut(data: bytes) -> bool:
    """Whether the JPEG file ``data`` ends before the end-of-image marker FF D9 of its image.

    Walks the header segments by their lengths (so a thumbnail inside an ``APPn`` segment, with its own markers, is
    skipped) to the first scan, then looks for FF D9 after it: compressed data stuff every FF byte, so the marker
    cannot occur inside them. Whatever follows the image's end (the video of a "motion photo", a second image) is
    ignored. A header that is not a run of segments is left to the decoder.
    """
    position = len(JPEG_START)
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
        elif marker == JPEG_SCAN:
            return data.find(JPEG_END, position) < 0
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return True


def _truncation(data: bytes) -> str | None:
    """Why the whole file ``data`` is a cut-off JPEG or PNG (:func:`_jpeg_cut`; a PNG ends with the ``IEND``
    chunk), or None: complete, or another format."""
    if data.startswith(JPEG_START) and _jpeg_cut(data):
        return "it is truncated (no JPEG end-of-image marker FF D9 after its first scan)"
    if data.startswith(PNG_START) and data.rfind(PNG_END) < 0:
        return "it is truncated (no PNG IEND chunk)"
    return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file (any format OpenCV reads, grey or with alpha) into ``[H, W, 3]`` uint8 RGB.

    A truncated JPEG or PNG is an error too: OpenCV 4 decodes a cut-off JPEG into a partly grey image with only a
    "Premature end of JPEG file" warning on stderr, so the file's end is checked first (:func:`_truncation`: a walk
    over a few header segments and a byte search of the data already read, far cheaper than decoding). Other formats
    rely on the decoder.

    Raises:
        BadImageError: naming the file when it cannot be read (missing, a folder, no permission), is empty,
            truncated or cannot be decoded.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise BadImageError(f"cannot read image file {path}: {error.strerror or error}; restore or replace it"
                            f"{SKIP_HINT}", path) from None
    problem = "it is empty" if not data else _truncation(data)
    image = None if problem else cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        detail = f": {problem}" if problem else ""
        raise BadImageError(f"cannot decode image file {path}{detail}; replace or remove it{SKIP_HINT}", path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageFiles(Sequence):
    """Image files read on access: item ``i`` is ``[H, W, 3]`` uint8 RGB of ``paths[i]``."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_rgb(self.paths[index])


@dataclass(frozen=True)
class Unreadable:
    """What a ``skip_unreadable`` :class:`LabelledImages` returns for item ``index`` whose file cannot be read;
    :meth:`LabelledImages.collate_readable` drops it from its batch."""

    index: int


class LabelledImages(Dataset):
    """Images with one class label each, as batch-ready dicts.

    Items: ``image`` ``[3, S, S]`` float (CLIP-normalised), ``label`` and ``index`` (the item's position in this
    dataset) long, ``seen`` bool (the label is a seen class). Keys are indices or the ``(index, seed)`` pairs of
    the training sampler (``datamodules.sampling``); a random ``transform`` is reseeded per item by that seed (see
    :func:`~datamodules.transforms.apply_transform`).

    An item whose file cannot be read raises :class:`BadImageError`, or with ``skip_unreadable`` warns (naming the
    file, once per process) and returns :class:`Unreadable`; loaders of such a dataset batch with
    :meth:`collate_readable`.

    Args:
        images: ``N`` images, each ``[H, W, 3]`` uint8 RGB (an array ``[N, H, W, 3]`` or :class:`ImageFiles`).
        labels: ``[N]`` class indices.
        seen: indices of the seen classes.
        transform: pipeline from uint8 image to normalised tensor.
        random_transform: whether ``transform`` draws random numbers.
        skip_unreadable: return :class:`Unreadable` for an unreadable file instead of raising.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[int], seen: Sequence[int],
                 transform: A.Compose, random_transform: bool, skip_unreadable: bool = False) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.seen = torch.isin(self.labels, torch.as_tensor(list(seen), dtype=torch.long))
        self.transform, self.random_transform = transform, random_transform
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor] | Unreadable:
        index, seed = split_key(key)
        try:
            image = self.images[index]
        except BadImageError as error:
            if not self.skip_unreadable:
                raise
            warnings.warn(f"skipped a sample (on_bad_image: skip): {error}")
            return Unreadable(index)
        out = apply_transform(self.transform, self.random_transform, seed, image=image,
                              **self.targets(index, image))
        item = dict(image=out["image"], label=self.labels[index], index=torch.tensor(index), seen=self.seen[index])
        if "mask" in out:
            item["mask"] = out["mask"].bool()
        return item

    def targets(self, index: int, image: np.ndarray) -> dict[str, np.ndarray]:
        """Hook: the targets transformed together with item ``index``'s decoded ``image`` ``[H, W, 3]``; a
        ``mask`` ``[H, W]`` uint8 becomes the item's ``mask`` ``[S, S]`` bool. None here."""
        return {}

    def collate_readable(self, samples: list[dict[str, torch.Tensor] | Unreadable]) -> dict[str, torch.Tensor]:
        """Batch the readable ``samples``, dropping the :class:`Unreadable` ones, and count the drops.

        Runs in the loader's worker, so the count travels in the batch: ``skipped_images``, an int64 scalar tensor
        (0 when nothing was dropped). When no sample of the batch is readable, the batch holds one sample instead:
        the first readable one after the batch's highest ``index`` in dataset order (wrapping round to 0), a
        genuine sample with its own image, ``label`` and ``index``, so the step needs no special case; the epoch
        then sees that sample twice (metrics count it twice, never a made-up sample), and ``skipped_images`` counts
        every sample of the batch.

        Returns:
            The :func:`~torch.utils.data.default_collate` of the kept samples (``image`` ``[B', 3, S, S]``, ...)
            and ``skipped_images``.

        Raises:
            ValueError: when no item of the dataset is readable.
        """
        readable = [sample for sample in samples if not isinstance(sample, Unreadable)]
        skipped = len(samples) - len(readable)
        if not readable:
            readable = [self._readable_after(max(sample.index for sample in samples))]
        return default_collate(readable) | {"skipped_images": torch.tensor(skipped, dtype=torch.long)}

    def _readable_after(self, index: int) -> dict[str, torch.Tensor]:
        """The first readable item after the unreadable item ``index``, in dataset order, wrapping round to 0."""
        for step in range(1, len(self)):
            sample = self[(index + step) % len(self)]
            if not isinstance(sample, Unreadable):
                return sample
        raise ValueError(f"none of the {len(self)} image files of this split can be read (the warnings name them); "
                         f"replace or remove them")

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
    ``batch_size`` and ``num_workers`` as hyper-parameters. The train loader shuffles; the others keep order. The
    loaders of a ``skip_unreadable`` :class:`LabelledImages` drop unreadable samples and add ``skipped_images`` to
    every batch (:meth:`LabelledImages.collate_readable`). Orders, shards and augmentation seeds come from
    ``datamodules.sampling``, so a run resumes mid-epoch exactly and no evaluation sample is counted twice under DDP.
    """

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}
        self.sampling_seed = torch.initial_seed()
        """Seed of the epoch orders and training augmentations (``datamodules.sampling``): torch's seed when the
        datamodule is built, i.e. ``seed_everything``'s in the CLI (the same on every rank and on resume)."""

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
            BadImageError: naming the file when it cannot be read or decoded (also with ``on_bad_image: skip``,
                whose batches never hold such a sample).
        """
        dataset = self.dataset(split)
        return dataset.original(index) if isinstance(dataset, LabelledImages) else None

    def loader(self, split: Split, sharded: bool = True) -> DataLoader:
        """The loader of ``split`` by an :class:`~datamodules.sampling.EpochSampler`: training shuffled per epoch,
        padded shares, per-sample augmentation seeds, a :class:`ResumableLoader`; otherwise in order, unpadded.

        Batches hold ``batch_size`` samples, evaluation batches ``eval_batch_size`` when the datamodule has that
        hyper-parameter and it is set. ``sharded``: this rank's share under the trainer's DDP (what
        ``<split>_dataloader()`` serve), else the whole
        split (what callbacks that must see the same samples on every rank read, ``xvlm.contracts.WholeSplits``).
        """
        dataset, workers = self.dataset(split), self.hparams.num_workers
        skipping = isinstance(dataset, LabelledImages) and dataset.skip_unreadable
        train = split == "train"
        rank, world = ((self.trainer.global_rank, self.trainer.world_size) if sharded and self.trainer is not None
                       else (0, 1))
        sampler = EpochSampler(dataset, shuffle=train, seed=self.sampling_seed, rank=rank, world_size=world,
                               even=train, keyed=train)
        batch_size = (self.hparams.get("eval_batch_size") if not train else None) or self.hparams.batch_size
        options = dict(batch_size=batch_size, sampler=sampler, num_workers=workers,
                       persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                       collate_fn=dataset.collate_readable if skipping else None,
                       generator=torch.Generator().manual_seed(self.sampling_seed))
        if train:
            return ResumableLoader(dataset, progress=self._train_progress, **options)
        return DataLoader(dataset, **options)

    def _train_progress(self) -> tuple[int, int]:
        """``(training batches of this epoch finished, batches per epoch)`` of the trainer's fit loop."""
        if self.trainer is None:
            return 0, 1
        finished = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return finished, int(min(self.trainer.num_training_batches, 2**62))

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")
