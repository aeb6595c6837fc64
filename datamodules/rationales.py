"""Images labelled with a category and a visual rationale: DROR's "doubly right" benchmark and a generic CSV form.

Two DataModules publish the same label space and batches (spec ``methods/ecor.md`` §2.5, §5):

- :class:`DRORDataModule` reads the layout of DROR's web-collected sets (Mao et al., CVPR 2023)::

      <root>/<train_split>/<category>/<rationale>/<query index>/<image>     (train_split: "train")
      <root>/<test_split>/<category>/<rationale>/<query index>/<image>      (test_split: "test")

  The nesting below the rationale folder is not fixed: its images are found recursively. Folder names are read as
  DROR's own code reads them: ``__`` stands for ``/`` (SUN's ``apartment_building__outdoor``), then the
  normalisation below. A rationale holding ``/`` that was written as two nested folders (``black and/white fur``
  becomes ``black and/`` + ``white fur/``; DROR's evaluator joins such folders) is recognised: a rationale folder
  whose name is not one of its class's rationales is joined with each of its sub-folders, at most
  :data:`MAX_SPLIT_DEPTH` times. Image files (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``, any case) directly
  in a category folder are an error (they have no rationale); other files are ignored.
- :class:`RationaleFolderDataModule` reads images below ``root`` listed by CSV files (``train_csv``, ``val_csv``,
  ``test_csv``) with the header ``path,category,rationale`` (``path`` relative to ``root``; further columns are
  ignored).

Both read the rationale file: JSON ``{class: [rationale, ...]}``, e.g. one of DROR's six
(:data:`DROR_RATIONALE_FILES`), whose strings may carry GPT's ``"- "`` bullets.

**Normalisation** (:func:`normalise_rationale`, spec §5): ``_`` and ``-`` become spaces, ``/`` becomes ``" or "``,
lower case, runs of whitespace one space (a leading ``"- "`` bullet disappears with it). Class names, rationales,
folder names and CSV fields all pass through it, so ``sea_lion``, ``Sea Lion`` and ``sea-lion`` name one class.

**Label space** (``task``):

- ``class_names``: the normalised JSON keys, in file order, without the classes that have no rationale (spec §8.6:
  they are left out and named in a warning when the module is built); ``seen`` = every class, ``unseen`` = ().
- ``rationale_vocab``: the ``R`` sorted unique normalised rationales of all classes (shared ones once).
- ``rationales`` and ``descriptors``: ``{class name: [normalised rationale, ...]}`` (duplicates within a class
  dropped, file order kept), so descriptor-based zero-shot scoring (DCLIP, LaZSL) runs on them too.
- ``extras``: ``rationale_table`` ``[C, R]`` bool (True where the rationale belongs to the class),
  ``excluded_classes`` (JSON keys left out) and ``raw_class_names`` (the JSON key of every class).

**Splits.** Test reads the test folder (CSV: ``test_csv``). Validation is ``val_csv`` when given, otherwise a seeded
hold-out of the training images stratified by (category, rationale) (:func:`stratified_hold_out`): of a group of
``n`` images, ``round(val_fraction · n)`` go to validation, at most ``n − 1``, so training keeps every pair. Each
split is read when a stage first needs it, so a test-only run (zero-shot transfer) needs no training folder.

**Batches**: ``image`` ``[B, 3, S, S]`` (CLIP-normalised), ``label`` and ``index`` ``[B]`` long, ``seen`` ``[B]``
bool, ``rationale`` ``[B]`` long (the image's ground-truth rationale, an index into ``rationale_vocab``) and
``rationales`` ``[B, R]`` bool (every rationale true for the image: here the one-hot of ``rationale``).
``original_image(split, index)`` is the file decoded at its own size (LaZSL crops). Transforms are the zoo's
natural-photo pipelines (``ImageFolderDataModule``'s): random resized crop and flip in training, shorter side resized
and centre crop otherwise. Unreadable files follow the zoo's ``on_bad_image`` policy
(:mod:`datamodules.loading`).

Deliberate deviations from DROR's code:

- **Validation.** DROR validates on the test split; validation here is held out of train (spec §8.2).
- **Strict folder names.** DROR lower-cases what it finds and compares strings by substring at evaluation; here
  every category and rationale folder must name a class of the JSON file and one of that class's rationales, or
  the module stops with an error naming the folder, the file and close matches.
- **Fixed dataset.** DROR's training loader draws a random category, rationale and image per step from an
  endless stream; here the training images form a dataset shuffled per epoch (``datamodules.sampling``).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.folder import IMAGE_EXTENSIONS, _class_folders, _image_files
from datamodules.loading import ImageFiles, LabelledImages, Split, Unreadable, ZooDataModule, missing_images
from datamodules.sampling import SampleKey
from datamodules.task import Task
from datamodules.transforms import natural_eval_transform, natural_train_transform

DROR_RATIONALE_FILES = ("cifar10_text.json", "cifar100_text.json", "caltech101_text.json", "food101_text.json",
                        "SUN_text.json", "Our_ImageNet_attribute.json")
"""DROR's rationale files (``GPT3/`` of cvlab-columbia/DoubleRight)."""
MAX_SPLIT_DEPTH = 2
"""How many times a rationale folder is joined with a sub-folder (``a/`` + ``b/`` reads ``a/b``), as in DROR."""
CSV_COLUMNS = ("path", "category", "rationale")
"""The columns a rationale CSV file must have."""
DROR_LAYOUT = "<root>/<split>/<category>/<rationale>/.../<images>"


def normalise_rationale(text: str) -> str:
    """The normal form of a class name or rationale (spec §5).

    ``_`` and ``-`` become spaces, ``/`` becomes ``" or "``, letters are lower-cased and whitespace runs collapse to
    one space (so GPT's ``"- "`` bullet vanishes).

    >>> normalise_rationale("- Black/white_fur")
    'black or white fur'
    """
    text = text.replace("_", " ").replace("-", " ").replace("/", " or ")
    return " ".join(text.lower().split())


def folder_key(name: str) -> str:
    """The normal form of a folder name or CSV field: DROR writes ``/`` as ``__`` in folder names.

    >>> folder_key("apartment_building__outdoor")
    'apartment building or outdoor'
    """
    return normalise_rationale(name.replace("__", "/"))


def _close(key: str, candidates: Sequence[str]) -> str:
    """``"; close matches: [...]"`` for ``key`` among ``candidates``, or an empty string."""
    matches = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    return f" (close matches: {matches})" if matches else ""


def _resolve(path: str | Path, root: str | Path) -> Path:
    """``path`` as given when it exists, else below ``root``."""
    given = Path(path)
    return given if given.exists() or given.is_absolute() else Path(root) / given


# --------------------------------------------------------------------------------------------- rationale table
@dataclass(frozen=True)
class RationaleTable:
    """The category–rationale table of a rationale file.

    Attributes:
        path: the JSON file.
        class_names: normalised names of the classes with rationales, in file order (``C``).
        raw_names: their JSON keys.
        rationales: per class name, its normalised rationales (file order, no duplicates).
        vocab: the ``R`` sorted unique rationales.
        excluded: JSON keys of the classes without rationales.
    """

    path: Path
    class_names: tuple[str, ...]
    raw_names: tuple[str, ...]
    rationales: dict[str, list[str]]
    vocab: tuple[str, ...]
    excluded: tuple[str, ...]

    def matrix(self) -> torch.Tensor:
        """``[C, R]`` bool: True where rationale ``r`` belongs to class ``c``."""
        table = torch.zeros(len(self.class_names), len(self.vocab), dtype=torch.bool)
        for c, name in enumerate(self.class_names):
            table[c, [self.index[rationale] for rationale in self.rationales[name]]] = True
        return table

    def task(self, source: str) -> Task:
        """The published label space (module docstring)."""
        return Task(source=source, class_names=self.class_names, seen=tuple(range(len(self.class_names))),
                    descriptors=self.rationales, rationales=self.rationales, rationale_vocab=self.vocab,
                    extras={"rationale_table": self.matrix(), "excluded_classes": self.excluded,
                            "raw_class_names": self.raw_names})

    @cached_property
    def index(self) -> dict[str, int]:
        """Vocabulary index of every rationale."""
        return {rationale: r for r, rationale in enumerate(self.vocab)}

    @cached_property
    def _labels(self) -> dict[str, int]:
        return {name: c for c, name in enumerate(self.class_names)}

    def class_of(self, name: str, where: str, source: str) -> int | None:
        """The label of the class that a folder name or CSV field ``name`` names (:func:`folder_key`); None for a
        class of the file without rationales.

        Raises:
            ValueError: naming ``where``, the file and close matches when ``name`` is no class of the file.
        """
        key = folder_key(name)
        if key in self._labels:
            return self._labels[key]
        if key in {normalise_rationale(raw) for raw in self.excluded}:
            return None
        raise ValueError(f"{source}: {where} names the class {name!r} (read as {key!r}), which is not a key of the "
                         f"rationale file {self.path}{_close(key, self.class_names)}; add the class to the file or "
                         f"remove its images")

    def rationale_of(self, label: int, name: str) -> int | None:
        """The vocabulary index of the rationale that ``name`` names (:func:`folder_key`) when it is one of class
        ``label``'s, else None."""
        key = folder_key(name)
        return self.index[key] if key in self.rationales[self.class_names[label]] else None

    def unknown_rationale(self, label: int, name: str, where: str, source: str) -> ValueError:
        """The error for a rationale ``name`` that is not one of class ``label``'s, naming ``where`` and the file."""
        key, class_name = folder_key(name), self.class_names[label]
        return ValueError(f"{source}: {where} names the rationale {name!r} (read as {key!r}), which is not among the "
                          f"rationales of class {class_name!r} in {self.path}"
                          f"{_close(key, self.rationales[class_name])}; rename it to one of "
                          f"{self.rationales[class_name]} (names read '_' and '-' as spaces, '/' and '__' as 'or') or "
                          f"add it to the class in the file")


def _check_entries(content: object, path: Path, source: str) -> dict[str, list[str]]:
    """``content`` as ``{class: [rationale]}``, or a ``ValueError`` naming the file and the offending entry."""
    expected = 'expected a JSON object {"class": ["rationale", ...]} (DROR\'s format)'
    if not isinstance(content, dict):
        raise ValueError(f"{source}: rationale file {path} holds a {type(content).__name__}; {expected}")
    for key, value in content.items():
        if not isinstance(value, list):
            raise ValueError(f"{source}: rationale file {path}: entry {key!r} is a {type(value).__name__} "
                             f"({value!r}); {expected}")
        wrong = [(k, item) for k, item in enumerate(value) if not isinstance(item, str)]
        if wrong:
            raise ValueError(f"{source}: rationale file {path}: entry {key!r} holds non-strings at positions "
                             f"{[k for k, _ in wrong]} ({wrong[0][1]!r}); {expected}")
    return content


def read_rationale_table(path: Path, source: str) -> RationaleTable:
    """Read and normalise a rationale file (module docstring); warn naming the classes without rationales.

    Raises:
        ValueError: naming the file when it is missing, not JSON or not ``{class: [str]}`` (and the entry), when two
            keys normalise to one class name, or when no class has a rationale.
    """
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{source}: rationale file {path} not found; pass the JSON file {{class: [rationales]}}, "
                         f"e.g. one of DROR's {list(DROR_RATIONALE_FILES)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: rationale file {path} is not valid JSON ({error})") from None
    table = _check_entries(content, path, source)
    by_name: dict[str, str] = {}
    for key in table:
        name = normalise_rationale(key)
        if name in by_name:
            raise ValueError(f"{source}: rationale file {path}: the keys {by_name[name]!r} and {key!r} both read "
                             f"{name!r}; merge them into one entry")
        by_name[name] = key
    rationales = {name: list(dict.fromkeys(filter(None, map(normalise_rationale, table[key]))))
                  for name, key in by_name.items()}
    kept = tuple(name for name in by_name if rationales[name])
    excluded = tuple(by_name[name] for name in by_name if not rationales[name])
    if not kept:
        raise ValueError(f"{source}: rationale file {path} gives no class a rationale; expected "
                         f"{{class: [rationales]}}")
    if excluded:
        rank_zero_warn(f"{source}: {len(excluded)} classes of {path} have no rationales and are left out of the label "
                       f"space (their images are not read): {list(excluded)}")
    vocab = tuple(sorted({rationale for name in kept for rationale in rationales[name]}))
    return RationaleTable(path, kept, tuple(by_name[name] for name in kept), {name: rationales[name] for name in kept},
                          vocab, excluded)


# --------------------------------------------------------------------------------------------- samples and splits
@dataclass(frozen=True)
class Sample:
    """One image of a split.

    Attributes:
        path: the image file.
        label: class index.
        rationale: index into the rationale vocabulary.
        line: the CSV line that listed it (0 for a folder scan).
    """

    path: Path
    label: int
    rationale: int
    line: int = 0


def stratified_hold_out(groups: Sequence[tuple[int, ...]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split positions into training and validation, stratified by group.

    Of a group's ``n`` positions, ``round(fraction · n)`` (half rounded up), at most ``n − 1``, are held out, drawn
    by a generator seeded by ``(seed, *group)``: the choice within a group depends on nothing else.

    Args:
        groups: the group of every position, e.g. ``(label, rationale)`` (non-negative ints).
        fraction: share held out, in ``(0, 1)``.
        seed: non-negative seed.

    Returns:
        ``(train, val)`` positions, each in increasing order.
    """
    members: dict[tuple[int, ...], list[int]] = {}
    for position, group in enumerate(groups):
        members.setdefault(tuple(group), []).append(position)
    held: set[int] = set()
    for group, positions in members.items():
        count = min(math.floor(fraction * len(positions) + 0.5), len(positions) - 1)
        order = np.random.default_rng(np.random.SeedSequence((seed, *group))).permutation(len(positions))
        held.update(positions[k] for k in order[:count])
    return [p for p in range(len(groups)) if p not in held], sorted(held)


def _rationale_folders(folder: Path, name: str, allowed: dict[str, int],
                       depth: int = 0) -> list[tuple[Path, int]] | None:
    """The folders holding the images of each rationale that the rationale folder ``folder`` stands for.

    ``name`` is what ``folder`` reads so far (``a/b`` after a join). When it is not in ``allowed`` (the class's
    rationales by normal form, with their vocabulary indices), every sub-folder is joined to it, at most
    :data:`MAX_SPLIT_DEPTH` times. None when that does not account for every sub-folder.
    """
    key = folder_key(name)
    if key in allowed:
        return [(folder, allowed[key])]
    subfolders = _class_folders(folder) if depth < MAX_SPLIT_DEPTH else []
    found = [_rationale_folders(folder / sub, f"{name}/{sub}", allowed, depth + 1) for sub in subfolders]
    if not found or any(result is None for result in found):
        return None
    return [pair for result in found for pair in result]


def scan_dror_split(split_dir: Path, table: RationaleTable, source: str) -> list[Sample]:
    """The images of a DROR split folder, in sorted path order within class (label order) and rationale.

    Raises:
        ValueError: naming the folder (and the rationale file) when it is missing or empty, when a category folder
            is no class of the file, a rationale folder no rationale of its class, or a category folder holds images
            directly.
    """
    if not split_dir.is_dir():
        raise ValueError(f"{source}: split folder {split_dir} not found; expected {DROR_LAYOUT}")
    by_label: dict[int, list[Sample]] = {}
    for category in _class_folders(split_dir):
        category_dir = split_dir / category
        label = table.class_of(category, f"category folder {category_dir}", source)
        if label is None:
            continue
        loose = sorted(entry.name for entry in os.scandir(category_dir)
                       if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        if loose:
            raise ValueError(f"{source}: category folder {category_dir} holds images directly ({loose[:3]}); "
                             f"expected {DROR_LAYOUT}: move each image into the folder of its rationale")
        allowed = {rationale: table.index[rationale] for rationale in table.rationales[table.class_names[label]]}
        samples = by_label.setdefault(label, [])
        for name in _class_folders(category_dir):
            folders = _rationale_folders(category_dir / name, name, allowed)
            if folders is None:
                raise table.unknown_rationale(label, name, f"rationale folder {category_dir / name}", source)
            samples += [Sample(path, label, r) for folder, r in folders for path in _image_files(folder)]
    found = [sample for label in sorted(by_label) for sample in by_label[label]]
    if not found:
        raise ValueError(f"{source}: no images {IMAGE_EXTENSIONS} in {split_dir}; expected {DROR_LAYOUT}")
    return found


def read_rationale_csv(path: Path, root: Path, table: RationaleTable, skip: bool, source: str) -> list[Sample]:
    """The samples a ``path,category,rationale`` CSV file lists, in file order.

    Raises:
        ValueError: naming the file (and line) when it is missing, lacks a column, lists nothing, or a line has an
            empty field, an unknown category or a rationale that is not its category's.
        FileNotFoundError: naming the file, line and path of the first missing image (with ``skip``: a warning,
            and the samples are skipped when loaded).
    """
    if not path.is_file():
        raise ValueError(f"{source}: CSV file {path} not found; pass a file with the header "
                         f"'{','.join(CSV_COLUMNS)}' (paths relative to root), as given or below root")
    samples = []
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        header = [name.strip() for name in reader.fieldnames or []]
        lacking = [column for column in CSV_COLUMNS if column not in header]
        if lacking:
            raise ValueError(f"{source}: {path}: line 1 (the header {header}) lacks the columns {lacking}; expected "
                             f"the header '{','.join(CSV_COLUMNS)}'")
        reader.fieldnames = header
        for row in reader:
            samples.append(_csv_sample(row, path, reader.line_num, root, table, source))
    if not samples:
        raise ValueError(f"{source}: {path} lists no image; expected lines '<path>,<category>,<rationale>'")
    _check_csv_images(samples, path, skip, source)
    return samples


def _csv_sample(row: dict[str, str | None], path: Path, line: int, root: Path, table: RationaleTable,
                source: str) -> Sample:
    """The sample of one CSV line (see :func:`read_rationale_csv`)."""
    where = f"{path}: line {line}"
    values = {column: (row.get(column) or "").strip() for column in CSV_COLUMNS}
    empty = [column for column, value in values.items() if not value]
    if empty:
        raise ValueError(f"{source}: {where} has empty fields {empty}; every line needs "
                         f"'<path>,<category>,<rationale>'")
    label = table.class_of(values["category"], where, source)
    if label is None:
        raise ValueError(f"{source}: {where} names the class {values['category']!r}, which has no rationales in "
                         f"{table.path} and is left out of the label space; give it rationales or drop the line")
    rationale = table.rationale_of(label, values["rationale"])
    if rationale is None:
        raise table.unknown_rationale(label, values["rationale"], where, source)
    return Sample(root / values["path"], label, rationale, line)


def _check_csv_images(samples: list[Sample], path: Path, skip: bool, source: str) -> None:
    """A missing image is an error naming its CSV line (with ``skip``, a warning: its samples are skipped)."""
    missing = [sample for sample in samples if not sample.path.is_file()]
    if missing:
        first = missing[0]
        missing_images(f"{source}: {len(missing)} of the {len(samples)} images listed by {path} are missing; the "
                       f"first, {path}: line {first.line}, was looked for at {first.path} (paths are relative to "
                       f"root)", skip, FileNotFoundError)


# --------------------------------------------------------------------------------------------- torch side
class RationaleImages(LabelledImages):
    """:class:`LabelledImages` whose items also carry ``rationale`` (long scalar, index into the vocabulary) and
    ``rationales`` (``[R]`` bool, its one-hot). Keys, seeds and unreadable files as in the base.

    Args:
        rationale_ids: ``[N]`` vocabulary index of every image's rationale.
        num_rationales: ``R``.
        args / kwargs: those of :class:`LabelledImages`.
    """

    def __init__(self, *args: object, rationale_ids: Sequence[int], num_rationales: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.rationale_ids = torch.as_tensor(list(rationale_ids), dtype=torch.long)
        self.num_rationales = num_rationales

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor] | Unreadable:
        item = super().__getitem__(key)
        if isinstance(item, Unreadable):
            return item
        rationale = self.rationale_ids[int(item["index"])]
        one_hot = torch.zeros(self.num_rationales, dtype=torch.bool)
        one_hot[rationale] = True
        return item | {"rationale": rationale, "rationales": one_hot}


class _RationaleDataModule(ZooDataModule):
    """What both rationale DataModules share: options, the rationale table, the hold-out and the datasets.

    Subclasses save their hyper-parameters, call :meth:`_prepare` and implement :meth:`_read`.
    """

    source: str
    table: RationaleTable

    def _prepare(self, name: str) -> None:
        """Check the shared options and read the rationale file into ``self.table`` and ``self.task``."""
        hp = self.hparams
        self.source = f"{name}(root={str(hp.root)!r})"
        if hp.on_bad_image not in ("error", "skip"):
            raise ValueError(f"{self.source}: on_bad_image={hp.on_bad_image!r}; choose 'error' or 'skip'")
        if not 0.0 < hp.val_fraction < 1.0:
            raise ValueError(f"{self.source}: val_fraction={hp.val_fraction}; choose a share in (0, 1)")
        if hp.seed < 0:
            raise ValueError(f"{self.source}: seed={hp.seed}; choose a non-negative seed")
        self.table = read_rationale_table(_resolve(hp.rationales, hp.root), self.source)
        self.task: Task = self.table.task(self.source)
        self._read_cache: dict[str, list[Sample] | None] = {}

    def _read(self, split: Split) -> list[Sample] | None:
        """The samples the files list for ``split``; None for ``val`` without a validation source (hold-out)."""
        raise NotImplementedError

    def _samples(self, split: Split) -> list[Sample] | None:
        """:meth:`_read`, each split read once."""
        if split not in self._read_cache:
            self._read_cache[split] = self._read(split)
        return self._read_cache[split]

    def split_samples(self, split: Split) -> list[Sample]:
        """The samples of ``split``: training minus the stratified hold-out when there is no validation source."""
        if split == "test" or self._samples("val") is not None:
            return self._samples(split)
        train = self._samples("train")
        kept, held = stratified_hold_out([(s.label, s.rationale) for s in train], self.hparams.val_fraction,
                                         self.hparams.seed)
        return [train[p] for p in (kept if split == "train" else held)]

    def build_dataset(self, split: Split) -> RationaleImages:
        """The dataset of ``split``'s samples, with the natural-photo pipelines."""
        hp, samples = self.hparams, self.split_samples(split)
        if not samples:
            raise ValueError(f"{self.source}: the {split} split holds no images (val_fraction={hp.val_fraction} of "
                             f"too few training images?); add images or a validation source")
        rank_zero_info(f"{self.source}: {split}: {len(samples)} images of {len({s.label for s in samples})} classes "
                       f"and {len({s.rationale for s in samples})} rationales")
        random = split == "train" and hp.augment
        transform = (natural_train_transform if random else natural_eval_transform)(hp.image_size)
        return RationaleImages(ImageFiles([s.path for s in samples]), [s.label for s in samples], self.task.seen,
                               transform, random_transform=random, skip_unreadable=hp.on_bad_image == "skip",
                               rationale_ids=[s.rationale for s in samples],
                               num_rationales=len(self.task.rationale_vocab))


class DRORDataModule(_RationaleDataModule):
    """DROR's category/rationale image folders as a DataModule; ``self.task`` is ready after ``__init__`` (see the
    module docstring for the layout, the label space, the batches and the deviations).

    Args:
        root: the dataset folder holding the split folders (DROR's ``<ds>_dr``).
        rationales: the rationale JSON ``{class: [rationales]}`` (as given, else below ``root``), e.g.
            ``cifar10_text.json``.
        image_size: side ``S`` of the square images.
        batch_size: samples per training batch (and evaluation batch without ``eval_batch_size``).
        eval_batch_size: samples per validation/test/predict batch; None: ``batch_size``.
        num_workers: data loader workers.
        val_fraction: share of each (category, rationale) group's training images held out for validation.
        seed: seed of the hold-out.
        train_split: folder name of the training split (training and validation images).
        test_split: folder name of the test split.
        augment: apply the random training augmentation.
        on_bad_image: ``error`` (stop at an unreadable image, naming it) or ``skip`` (drop its sample from the batch,
            counted in ``batch["skipped_images"]``).
    """

    def __init__(self, root: str, rationales: str, image_size: int = 224, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 4, val_fraction: float = 0.1, seed: int = 0,
                 train_split: str = "train", test_split: str = "test", augment: bool = True,
                 on_bad_image: Literal["error", "skip"] = "error") -> None:
        super().__init__()
        self.save_hyperparameters()
        self._prepare("DRORDataModule")

    def _read(self, split: Split) -> list[Sample] | None:
        if split == "val":
            return None
        folder = self.hparams.train_split if split == "train" else self.hparams.test_split
        return scan_dror_split(Path(self.hparams.root, folder), self.table, self.source)


class RationaleFolderDataModule(_RationaleDataModule):
    """Images below ``root`` listed by ``path,category,rationale`` CSV files, with a rationale JSON file, as a
    DataModule; the label space, batches and transforms are :class:`DRORDataModule`'s (module docstring).

    Each CSV file is read (and its images checked) when a stage first needs its split, so a test-only run needs only
    ``test_csv``.

    Args:
        root: the folder the CSV paths are relative to.
        rationales: the rationale JSON ``{class: [rationales]}`` (as given, else below ``root``).
        train_csv: the training images (as given, else below ``root``).
        val_csv: the validation images; None holds out ``val_fraction`` of the training images, stratified by
            (category, rationale).
        test_csv: the test images.
        image_size: side ``S`` of the square images.
        batch_size: samples per training batch (and evaluation batch without ``eval_batch_size``).
        eval_batch_size: samples per validation/test/predict batch; None: ``batch_size``.
        num_workers: data loader workers.
        val_fraction: share of each group's training images held out when there is no ``val_csv``.
        seed: seed of the hold-out.
        augment: apply the random training augmentation.
        on_bad_image: ``error`` (a missing or unreadable image stops the run, naming it and its CSV line) or ``skip``
            (warn, and drop its sample from the batch, counted in ``batch["skipped_images"]``).
    """

    def __init__(self, root: str, rationales: str, train_csv: str | None = None, val_csv: str | None = None,
                 test_csv: str | None = None, image_size: int = 224, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 4, val_fraction: float = 0.1, seed: int = 0,
                 augment: bool = True, on_bad_image: Literal["error", "skip"] = "error") -> None:
        super().__init__()
        self.save_hyperparameters()
        self._prepare("RationaleFolderDataModule")

    def _read(self, split: Split) -> list[Sample] | None:
        hp = self.hparams
        spec = hp[f"{split}_csv"]
        if spec is None:
            if split == "val":
                return None
            needs = "the train split (and, without val_csv, the validation hold-out)" if split == "train" else \
                f"the {split} split"
            raise ValueError(f"{self.source}: {needs} needs {split}_csv, a CSV file with the header "
                             f"'{','.join(CSV_COLUMNS)}'")
        return read_rationale_csv(_resolve(spec, hp.root), Path(hp.root), self.table, hp.on_bad_image == "skip",
                                  self.source)
