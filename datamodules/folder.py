"""Images in class folders, torchvision ``ImageFolder`` style: ``root/<split>/<class folder>/<image files>``.

The classes are the sorted folder names of the train split; labels follow that order. Validation and test
folders must be a subset of them. Image files (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``, any case) are
found recursively inside each class folder; other files are ignored. Side information comes from small files:

- ``class_names``: JSON ``{folder: readable name}`` (e.g. ImageNet synset ``"n01440764": "tench"``); without it
  the readable name is the folder name without a numeric ``NNN.`` prefix and with ``_`` turned into spaces
  (CUB's ``001.Black_footed_Albatross`` reads "Black footed Albatross");
- ``descriptors``: JSON ``{readable name: [phrases]}`` (DCLIP style), published as ``Task.descriptors``. A class
  whose readable name is not a key takes the key that spells the same name up to case, punctuation and a possessive
  ``'s`` (:func:`class_name_key`), and that key becomes its readable name: CUB's folders take the names of DCLIP's
  file ("Black-footed Albatross", "Brewer's Blackbird" for ``Brewer_Blackbird``);
- ``unseen_classes``: class names held out of training (readable or folder names), given as a list, a ``.json``
  file holding a list, or a text file with one name per line (blank lines and ``#`` comments are skipped).

``predict_dir`` names a folder of images without labels (found recursively, any size): ``xvlm predict`` then
classifies these instead of the test split; their items carry ``path`` (the file) instead of a label.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import DataLoader

from datamodules.loading import ImageFiles, LabelledImages, Split, Unreadable, ZooDataModule, hold_out_classes
from datamodules.task import Task
from datamodules.transforms import natural_eval_transform, natural_train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _read_json(path: str, option: str, source: str) -> object:
    """The parsed JSON file ``path`` given as ``option``; errors name both."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{source}: {option} file {path} not found; pass an existing JSON file or None") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: {option} file {path} is not valid JSON ({error})") from None


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``split_dir``."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, in sorted path order."""
    found = [Path(parent, name) for parent, _, names in os.walk(folder, followlinks=True) for name in names
             if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _folder_name(folder: str) -> str:
    """``folder`` without a numeric ``NNN.`` prefix, ``_`` turned into spaces."""
    return re.sub(r"^\d+\.(?=\D)", "", folder).replace("_", " ")


def class_name_key(name: str) -> str:
    """The form in which class names are matched to descriptor keys: no numeric ``NNN.`` prefix, no possessive
    ``'s``, lower case, every run of other characters than letters and digits one space.

    >>> class_name_key("001.Black_footed_Albatross") == class_name_key("Black-footed Albatross")
    True
    >>> class_name_key("Brewer_Blackbird") == class_name_key("Brewer's Blackbird") == "brewer blackbird"
    True
    """
    name = re.sub(r"'s\b", "", re.sub(r"^\d+\.(?=\D)", "", name))
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower()).split())


def _readable_names(folders: list[str], path: str | None, source: str) -> tuple[str, ...]:
    """Readable class name per folder, from the ``class_names`` JSON map or from the folder name."""
    if path is None:
        return tuple(_folder_name(folder) for folder in folders)
    mapping = _read_json(path, "class_names", source)
    if not isinstance(mapping, dict) or not all(isinstance(name, str) for name in mapping.values()):
        raise ValueError(f"{source}: class_names file {path} must hold a JSON object {{folder: readable name}}")
    missing = [folder for folder in folders if folder not in mapping]
    if missing:
        raise ValueError(f"{source}: class_names file {path} has no name for the class folders {missing}; "
                         f"add them to the file")
    names = tuple(mapping[folder] for folder in folders)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{source}: class_names file {path} gives several folders the same names {repeated}; "
                         f"class names must be unique")
    return names


def _descriptors(path: str | None, names: tuple[str, ...],
                 source: str) -> tuple[tuple[str, ...], dict[str, list[str]] | None]:
    """The class names, each replaced by the descriptor key it matches (:func:`class_name_key`) when it is not a key
    itself, and the DCLIP descriptors of every class, read from the ``descriptors`` JSON file."""
    if path is None:
        return names, None
    table = _read_json(path, "descriptors", source)
    if not isinstance(table, dict) or not all(_is_str_list(phrases) for phrases in table.values()):
        raise ValueError(f"{source}: descriptors file {path} must hold a JSON object {{class name: [phrases]}}")
    by_key: dict[str, list[str]] = {}
    for key in table:
        by_key.setdefault(class_name_key(key), []).append(key)
    matched = tuple(name if name in table else next(iter(by_key.get(class_name_key(name), [])), None)
                    for name in names)
    missing = [name for name, key in zip(names, matched) if key is None]
    if missing:
        raise ValueError(f"{source}: descriptors file {path} has no entry for the classes {missing}; "
                         f"add them to the file (keys are readable class names)")
    ambiguous = {name: by_key[class_name_key(name)] for name in names
                 if name not in table and len(by_key[class_name_key(name)]) > 1}
    if ambiguous:
        raise ValueError(f"{source}: descriptors file {path} has several keys for the classes {ambiguous}; "
                         "keep one key per class or name the classes exactly with a class_names file")
    return matched, {key: list(table[key]) for key in matched}


def _unseen_names(spec: str | list[str], source: str) -> list[str]:
    """The names listed by ``unseen_classes``: the list itself, a JSON list file or a text file."""
    if not isinstance(spec, str):
        return list(spec)
    if not Path(spec).is_file():
        raise ValueError(f"{source}: unseen_classes file {spec} not found; pass a list of class names or the path "
                         f"of a text file (one name per line) or a .json file holding a list")
    if spec.lower().endswith(".json"):
        names = _read_json(spec, "unseen_classes", source)
        if not _is_str_list(names):
            raise ValueError(f"{source}: unseen_classes file {spec} must hold a JSON list of class names")
        return names
    lines = (line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class UnlabelledImages(LabelledImages):
    """Image files without labels (``predict_dir``): items hold ``image`` ``[3, S, S]``, ``index`` and ``path``
    (the file, a string); unreadable files as in :class:`~datamodules.loading.LabelledImages`."""

    def __init__(self, files: ImageFiles, transform: Any, skip_unreadable: bool) -> None:
        super().__init__(files, [-1] * len(files), (), transform, random_transform=False,
                         skip_unreadable=skip_unreadable)

    def __getitem__(self, key: Any) -> dict[str, Any] | Unreadable:
        item = super().__getitem__(key)
        if isinstance(item, Unreadable):
            return item
        return {"image": item["image"], "index": item["index"], "path": str(self.images.paths[int(item["index"])])}


class ImageFolderDataModule(ZooDataModule):
    """Class folders on disk as a DataModule; ``self.task`` is ready after ``__init__`` (see the module docstring).

    Train batches hold seen classes only; validation and test batches hold every class, flagged by ``seen``.
    Items: ``image`` ``[3, S, S]`` float (CLIP-normalised), ``label``, ``index`` (position in the split's dataset)
    and ``seen``. ``original_image(split, index)`` is the sample's file decoded at its own size, ``[3, H, W]`` uint8
    (LaZSL cuts its crops from it, :meth:`~datamodules.loading.ZooDataModule.original_image`).

    An image file that cannot be read (deleted after the scan, empty, truncated, not an image) stops the run with a
    ``BadImageError`` naming it (``on_bad_image: error``), or with ``on_bad_image: skip`` is left out of its batch
    with a warning naming it, and every batch carries ``skipped_images``, the int64 count of samples it left out
    (``xvlm.callbacks.SkippedImages`` logs the sums per epoch). A batch none of whose files can be read holds
    instead the first readable sample after it in the split (see
    :meth:`~datamodules.loading.LabelledImages.collate_readable`): never a made-up sample, but one the epoch sees
    twice.

    Args:
        root: folder holding one sub-folder per split.
        image_size: side ``S`` of the square images (random resized crop in training, shorter side resized and
            centre crop otherwise).
        batch_size: samples per batch.
        num_workers: data loader workers.
        train_split: folder name of the training split; its class folders define the classes.
        val_split: folder name of the validation split.
        test_split: folder name of the test split; None tests on the validation split.
        class_names: JSON file ``{folder: readable name}``.
        descriptors: JSON file ``{readable name: [phrases]}``.
        unseen_classes: classes held out of training: a list of names or the path of a text or ``.json`` file.
        augment: apply the random training augmentation.
        on_bad_image: ``error`` (stop at an unreadable image file, naming it) or ``skip`` (drop its sample from the
            batch and count it in ``batch["skipped_images"]``).
        predict_dir: a folder of unlabelled images that the predict stage reads instead of the test split (module
            docstring); None predicts the test split.
    """

    def __init__(self, root: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4,
                 train_split: str = "train", val_split: str = "val", test_split: str | None = None,
                 class_names: str | None = None, descriptors: str | None = None,
                 unseen_classes: str | list[str] | None = None, augment: bool = True,
                 on_bad_image: Literal["error", "skip"] = "error", predict_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = f"ImageFolderDataModule(root={str(root)!r})"
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"{self.source}: on_bad_image={on_bad_image!r}; choose 'error' or 'skip'")
        self.folders = _class_folders(self._split_dir("train"))
        if not self.folders:
            raise ValueError(f"{self.source}: no class folders in {self._split_dir('train')}; "
                             f"expected root/<train_split>/<class>/<images>")
        for split in ("val", "test"):
            extra = sorted(set(_class_folders(self._split_dir(split))) - set(self.folders))
            if extra:
                raise ValueError(f"{self.source}: class folders {extra} of {self._split_dir(split)} are not in the "
                                 f"train split {self._split_dir('train')}; add a train folder for each or remove them")
        names, table = _descriptors(descriptors, _readable_names(self.folders, class_names, self.source),
                                    self.source)
        requested = [] if unseen_classes is None else _unseen_names(unseen_classes, self.source)
        seen, unseen = hold_out_classes(requested, names, self.folders, self.source)
        self.task = Task(source=self.source, class_names=names, seen=seen, unseen=unseen, descriptors=table)

    def _split_dir(self, split: Split) -> Path:
        """The folder of ``split`` (the validation folder for the test split when ``test_split`` is None)."""
        option = f"{split}_split" if split != "test" or self.hparams.test_split is not None else "val_split"
        path = Path(self.hparams.root, self.hparams[option])
        if not path.is_dir():
            raise ValueError(f"{self.source}: split folder {path} not found ({option}={self.hparams[option]!r}); "
                             f"expected root/<{option}>/<class>/<images>")
        return path

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` reads: the ``predict_dir`` images for ``predict`` when it is set."""
        if stage == "predict" and self.hparams.predict_dir is not None:
            self.dataset("predict")
        else:
            super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict") if self.hparams.predict_dir is not None else super().predict_dataloader()

    def build_dataset(self, split: Split) -> LabelledImages:
        """Scan the split folder; training keeps seen classes only and needs images of every one of them."""
        if split == "predict":
            return self._predict_dataset()
        split_dir = self._split_dir(split)
        classes = self.task.seen if split == "train" else range(self.task.num_classes)
        files = {c: _image_files(split_dir / self.folders[c]) for c in classes}
        if split == "train":
            empty = [self.folders[c] for c in classes if not files.get(c)]
            if empty:
                raise ValueError(f"{self.source}: seen class folders {empty} of {split_dir} hold no images "
                                 f"{IMAGE_EXTENSIONS}; add images or list the classes in unseen_classes")
        paths = [path for c in files for path in files[c]]
        if not paths:
            raise ValueError(f"{self.source}: no images {IMAGE_EXTENSIONS} in the class folders of {split_dir}; "
                             f"expected {split_dir}/<class>/<images>")
        labels = [c for c in files for _ in files[c]]
        random = split == "train" and self.hparams.augment
        size = self.hparams.image_size
        transform = natural_train_transform(size) if random else natural_eval_transform(size)
        return LabelledImages(ImageFiles(paths), labels, self.task.seen, transform, random_transform=random,
                              skip_unreadable=self.hparams.on_bad_image == "skip")

    def _predict_dataset(self) -> UnlabelledImages:
        """The images anywhere below ``predict_dir``, in sorted path order, at the evaluation transform."""
        folder = Path(self.hparams.predict_dir)
        if not folder.is_dir():
            raise ValueError(f"{self.source}: predict_dir {folder} is not a folder; pass a folder of images")
        paths = _image_files(folder)
        if not paths:
            raise ValueError(f"{self.source}: predict_dir {folder} holds no images {IMAGE_EXTENSIONS}")
        return UnlabelledImages(ImageFiles(paths), natural_eval_transform(self.hparams.image_size),
                                skip_unreadable=self.hparams.on_bad_image == "skip")
