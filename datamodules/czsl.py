"""Compositional zero-shot learning (CZSL) on MIT-States, UT-Zappos and C-GQA in the "compositional-split-natural"
layout of Purushwalkam et al. (2019), as distributed by ExplainableML/czsl and used by CSP, Troika and MSCI.

Files under ``root`` (the dataset folder, e.g. ``data/mit-states``); ``split`` and ``metadata`` name the last two:

- ``images/<...>/<file>``: the images; a metadata record's ``image`` is its path below ``images/``.
- ``compositional-split-natural/{train,val,test}_pairs.txt``: one ``"<state> <object>"`` pair per line (exactly two
  whitespace-separated tokens; blank lines are skipped).
- ``metadata_compositional-split-natural.t7``: a ``torch.save``\\ d list of dicts, one per image, with str fields
  ``image``, ``attr`` (the state), ``obj`` and ``set`` (``train``, ``val``, ``test`` or ``NA``); UT-Zappos records
  also hold ``_image`` (the original path, not read). It is loaded with ``torch.load(weights_only=True)``; a file
  that needs full unpickling is refused unless ``allow_pickle`` (unpickling can run arbitrary code).
- ``feasibility_<dataset>.pt`` (optional, shipped by CSP/Troika/MSCI): ``{'feasibility': Tensor[|A|·|O|]}``, the
  open-world feasibility score of every pair, in the order of ``task.pairs``; published as
  ``task.extras["feasibility"]``.

The label space (``task``):

- ``states`` / ``objects``: the sorted unions of the raw tokens of the three pair files, published as readable
  names: every run of ``.``, ``_`` and whitespace becomes one space, case is kept (UT-Zappos ``Faux.Fur`` reads
  "Faux Fur", C-GQA ``traffic_light`` "traffic light"). Methods build prompts from them (lower-casing, if they
  want it, is theirs). The raw tokens are ``task.extras["raw_states"]`` / ``["raw_objects"]``.
- ``pairs``: the open world, ``product(states, objects)`` in that order (the order of the feasibility vector);
  pair ``(a, o)`` has label ``a · |O| + o`` in every split; ``class_names`` are ``"<state> <object>"``.
- ``train_pairs`` / ``val_pairs`` / ``test_pairs``: the sorted labels of each pair file's pairs; ``seen`` = the
  train pairs; ``unseen`` = (val ∪ test pairs) − train pairs.

Records (as the reference ``get_split_info``): a record with ``attr == 'NA'``, ``set == 'NA'`` or a pair listed in
no pair file is dropped (counted in an info line). Training reads the ``set == 'train'`` records, validation the
``val`` ones, test the ``test`` ones, each in metadata order. Batches carry ``image`` ``[B, 3, S, S]``, ``label``,
``index``, ``seen`` and ``state`` / ``object`` (indices into ``task.states`` / ``task.objects``).

Augmentation (MSCI/Troika recipe, spec §4): training resizes the shorter side to ``image_size`` (bicubic), crops the
centre square, flips horizontally (p 0.5), applies a random perspective (p 0.5) and a rotation of at most 5°;
evaluation only resizes and centre-crops. Both end in CLIP normalisation.

Deliberate deviations from the reference:

- **Readable primitive names.** The reference prompts with the raw tokens after ``.`` → space and lower-casing, so
  C-GQA's underscores reach the tokenizer; here ``_`` also becomes a space (raw tokens stay in ``extras``).
- **Consistency checks.** A training record whose pair is not a train pair (CSP/Troika look training labels up
  among the train pairs, so such a record cannot train there) and a pair file line without images of its split
  (silently accepted by the reference) are errors here, naming the file and the record or line.
  Missing image files are an error at construction (or, with ``on_bad_image: skip``, a warning and skipped samples).
- **Perspective.** torchvision's ``RandomPerspective()`` (defaults: distortion 0.5, p 0.5) moves every corner
  inward by U(0, ¼ side) per axis and shrinks the image into that quad; here albumentations' ``Perspective`` with
  ``fit_output`` keeps the whole image in a quad whose corners move by ``|N(0, σ)|`` (σ = 0.157: the same mean
  shift, ⅛ side), black outside as there. Rotation and perspective interpolate bilinearly (torchvision's rotation:
  nearest), and OpenCV's bicubic resize does not antialias as PIL's does.
"""

from __future__ import annotations

import math
import pickle
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import product
from pathlib import Path
from typing import Literal

import cv2
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.loading import ImageFiles, LabelledImages, Split, Unreadable, ZooDataModule, missing_images
from datamodules.sampling import SampleKey
from datamodules.task import Task
from datamodules.transforms import A, _to_clip_tensor

DEFAULT_SPLIT = "compositional-split-natural"
SPLITS: tuple[Split, ...] = ("train", "val", "test")
RECORD_FIELDS = ("image", "attr", "obj", "set")
SETS = ("train", "val", "test", "NA")
NA = "NA"
LAYOUT = ("<root>/images/<image of each record>, <root>/<split>/{train,val,test}_pairs.txt and "
          "<root>/metadata_<split>.t7 (the CZSL release of MIT-States, UT-Zappos or C-GQA)")
"""The expected layout, for error messages."""
PERSPECTIVE_SIGMA = 0.125 * math.sqrt(math.pi / 2)
"""σ of albumentations' corner shifts ``|N(0, σ)|``: mean shift ⅛ of the side, torchvision's U(0, ¼) mean."""
MAX_ROTATION = 5.0
"""Largest training rotation, in degrees."""


# --------------------------------------------------------------------------------------------- transforms
def czsl_train_transform(image_size: int) -> A.Compose:
    """The MSCI training pipeline: shorter side to ``image_size`` (bicubic), centre crop, horizontal flip (p 0.5),
    random perspective (p 0.5), rotation up to 5° (black fill), CLIP normalisation.

    Args:
        image_size: output side ``S``; images ``[H, W, 3]`` uint8 of any size become ``[3, S, S]`` float.
    """
    return A.Compose([
        A.SmallestMaxSize(max_size=image_size, interpolation=cv2.INTER_CUBIC),
        A.CenterCrop(image_size, image_size),
        A.HorizontalFlip(p=0.5),
        A.Perspective(scale=(PERSPECTIVE_SIGMA, PERSPECTIVE_SIGMA), fit_output=True, fill=0, p=0.5),
        A.Rotate(limit=MAX_ROTATION, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
        *_to_clip_tensor(),
    ])


def czsl_eval_transform(image_size: int) -> A.Compose:
    """The MSCI evaluation pipeline: shorter side to ``image_size`` (bicubic), centre crop, CLIP normalisation;
    deterministic.

    Args:
        image_size: output side ``S``; images ``[H, W, 3]`` uint8 of any size become ``[3, S, S]`` float.
    """
    return A.Compose([
        A.SmallestMaxSize(max_size=image_size, interpolation=cv2.INTER_CUBIC),
        A.CenterCrop(image_size, image_size),
        *_to_clip_tensor(),
    ])


# --------------------------------------------------------------------------------------------- files
def load_torch_file(path: Path, allow_pickle: bool, source: str) -> object:
    """``torch.load`` of ``path`` on the CPU, with ``weights_only=True`` unless ``allow_pickle``.

    Raises:
        ValueError: naming the file when the weights-only loader refuses it (saying which class it needs, and that
            ``allow_pickle: true`` loads it, for trusted files only), or when it cannot be read at all.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for damaged files
        if not allow_pickle and isinstance(error, pickle.UnpicklingError):
            raise ValueError(_weights_only_refusal(path, str(error), source)) from None
        raise ValueError(f"{source}: cannot read {path} as a torch.save file ({type(error).__name__}: {error}); "
                         f"get it again from the dataset's release") from error


def _weights_only_refusal(path: Path, message: str, source: str) -> str:
    """The error message for a file that ``torch.load(weights_only=True)`` refused with ``message``."""
    needed = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    opt_in = ("If you trust the file (e.g. it comes from the dataset's official release), set allow_pickle: true "
              "to load it with full unpickling.")
    if needed:
        return (f"{source}: {path} was not loaded: it holds objects beyond plain lists, dicts, tensors and strings "
                f"(it needs {needed.group(1)} to be unpickled), and unpickling them can run arbitrary code. {opt_in}")
    reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\s*\nCheck|$)", message, re.DOTALL)
    detail = " ".join(reason.group(1).split()) if reason else message.splitlines()[0]
    return (f"{source}: {path} cannot be read by torch's weights-only loader ({detail}): it is damaged, not a "
            f"torch.save file, or uses pickle features that loader lacks. Get it again, or: {opt_in}")


@dataclass(frozen=True)
class PairFile:
    """The pairs of one ``<split>_pairs.txt``.

    Attributes:
        path: the file.
        pairs: ``(state, object)`` raw tokens per non-blank line, in file order.
        lines: the 1-based line number of each pair.
    """

    path: Path
    pairs: tuple[tuple[str, str], ...]
    lines: tuple[int, ...]


def read_pair_file(path: Path, source: str) -> PairFile:
    """Read ``"<state> <object>"`` lines; blank lines are skipped.

    Raises:
        FileNotFoundError: when ``path`` is missing (naming the expected layout).
        ValueError: naming the file and line when a line does not hold exactly two tokens, or the file no pair.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{source}: pair file {path} not found; expected {LAYOUT}. Point root at the dataset "
                                f"folder, or set split to the folder holding the pair files")
    pairs, lines = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2:
            raise ValueError(f"{source}: {path}: line {number} holds {len(tokens)} tokens ({line.strip()!r}); "
                             f"expected exactly two, '<state> <object>' (multi-word names join their words with "
                             f"'.' or '_'). Fix the line or get the file again")
        pairs.append((tokens[0], tokens[1]))
        lines.append(number)
    if not pairs:
        raise ValueError(f"{source}: {path} lists no pair; expected one '<state> <object>' per line")
    return PairFile(path, tuple(pairs), tuple(lines))


@dataclass(frozen=True)
class Record:
    """One metadata record.

    Attributes:
        index: its position in the metadata list (0-based), for error messages.
        image: path below ``<root>/images``.
        state / object: raw tokens (``attr`` / ``obj``).
        split: ``set``: ``train``, ``val``, ``test`` or ``NA``.
    """

    index: int
    image: str
    state: str
    object: str
    split: str


def read_metadata(path: Path, allow_pickle: bool, source: str) -> list[Record]:
    """Every record of the metadata file, checked (NA records included).

    Raises:
        FileNotFoundError: when ``path`` is missing (naming the expected layout).
        ValueError: naming the file (and record index) when it is not a list of dicts with str fields ``image``,
            ``attr``, ``obj`` and ``set``, or a ``set`` is not one of ``train``, ``val``, ``test``, ``NA``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{source}: metadata file {path} not found; expected {LAYOUT}. Point root at the "
                                f"dataset folder, or set metadata to the file's name")
    content = load_torch_file(path, allow_pickle, source)
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{source}: {path} holds a {type(content).__name__}; expected a list of dicts with fields "
                         f"{list(RECORD_FIELDS)} (the CZSL metadata format)")
    return [_record(index, entry, path, source) for index, entry in enumerate(content)]


def _record(index: int, entry: object, path: Path, source: str) -> Record:
    """Record ``index`` of the metadata file ``path``, checked."""
    where = f"{source}: record {index} (0-based) of {path}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}; expected a dict with fields {list(RECORD_FIELDS)}")
    missing = [name for name in RECORD_FIELDS if name not in entry]
    if missing:
        raise ValueError(f"{where} lacks the fields {missing} (it has {sorted(map(str, entry))}); every record needs "
                         f"{list(RECORD_FIELDS)}: get the metadata file again")
    wrong = [name for name in RECORD_FIELDS if not isinstance(entry[name], str)]
    if wrong:
        raise ValueError(f"{where} has non-str fields {[(name, entry[name]) for name in wrong]}; expected str values")
    if entry["set"] not in SETS:
        raise ValueError(f"{where} has set={entry['set']!r}; expected one of {list(SETS)}")
    return Record(index, entry["image"], entry["attr"], entry["obj"], entry["set"])


def find_feasibility(root: Path, spec: str | None, source: str) -> Path | None:
    """The feasibility file named by the ``feasibility`` option.

    Args:
        root: the dataset folder.
        spec: None (no file), ``"auto"`` (the single ``feasibility_*.pt`` in ``root``, or none when there is none)
            or a path (as given, else below ``root``).

    Raises:
        FileNotFoundError: when a named file exists neither as given nor below ``root``.
        ValueError: when ``auto`` finds several files.
    """
    if spec is None:
        return None
    if spec == "auto":
        found = sorted(root.glob("feasibility_*.pt"))
        if len(found) > 1:
            raise ValueError(f"{source}: feasibility: auto found several files {[str(f) for f in found]}; name one")
        if not found:
            rank_zero_info(f"{source}: feasibility: auto found no {root}/feasibility_*.pt; no feasibility scores")
        return found[0] if found else None
    for path in (Path(spec), root / spec):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{source}: feasibility file {spec} not found (nor {root / spec}); pass the "
                            f"feasibility_<dataset>.pt of CSP/Troika/MSCI, 'auto' or None")


def read_feasibility(path: Path, num_states: int, num_objects: int, allow_pickle: bool,
                     source: str) -> torch.Tensor:
    """The ``[|A|·|O|]`` float32 feasibility vector of ``{'feasibility': Tensor}`` (a ``[|A|, |O|]`` matrix is
    flattened row-major, i.e. in the order of ``task.pairs``).

    Raises:
        ValueError: naming the file when it is not such a dict or the tensor has the wrong size.
    """
    content = load_torch_file(path, allow_pickle, source)
    if not isinstance(content, dict) or "feasibility" not in content:
        keys = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{source}: feasibility file {path} holds {keys}; expected a dict with the key "
                         f"'feasibility' (a tensor of |A|·|O| scores), as CSP/Troika/MSCI ship it")
    try:
        scores = torch.as_tensor(content["feasibility"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{source}: the 'feasibility' entry of {path} is not numbers ({error}); expected a tensor "
                         f"of |A|·|O| scores") from None
    if scores.shape not in ((num_states * num_objects,), (num_states, num_objects)):
        raise ValueError(f"{source}: feasibility file {path} holds a tensor of shape {tuple(scores.shape)}; expected "
                         f"[{num_states * num_objects}] (|A| = {num_states} states x |O| = {num_objects} objects of "
                         f"the pair files): is it the file of this dataset and split?")
    return scores.reshape(-1).contiguous()


# --------------------------------------------------------------------------------------------- label space
def readable_name(raw: str) -> str:
    """A primitive's name for prompts: every run of ``.``, ``_`` and whitespace becomes one space.

    >>> [readable_name(name) for name in ("Faux.Fur", "traffic_light", "ancient")]
    ['Faux Fur', 'traffic light', 'ancient']
    """
    return " ".join(re.split(r"[._\s]+", raw)).strip() or raw


def _readable(raws: Sequence[str], kind: str, source: str) -> tuple[str, ...]:
    """Readable names of the raw tokens ``raws``; two tokens that read the same are an error."""
    names = tuple(readable_name(raw) for raw in raws)
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"{source}: the {kind} tokens {[r for r in raws if readable_name(r) in clashes]} of the pair "
                         f"files read the same once '.' and '_' become spaces; rename one of them in the pair files "
                         f"and the metadata")
    return names


@dataclass(frozen=True)
class Vocabulary:
    """The primitives of the three pair files and the open-world pair labels.

    Attributes:
        states / objects: sorted raw tokens (``|A|``, ``|O|``).
        files: the pair file of each split.
    """

    states: tuple[str, ...]
    objects: tuple[str, ...]
    files: dict[str, PairFile]

    @classmethod
    def of(cls, files: dict[str, PairFile]) -> Vocabulary:
        pairs = [pair for file in files.values() for pair in file.pairs]
        return cls(tuple(sorted({s for s, _ in pairs})), tuple(sorted({o for _, o in pairs})), files)

    def label(self, state: str, obj: str) -> int:
        """The label ``a · |O| + o`` of the raw pair ``(state, obj)``, which must be in the vocabulary."""
        return self._state_index[state] * len(self.objects) + self._object_index[obj]

    @cached_property
    def _state_index(self) -> dict[str, int]:
        return {state: a for a, state in enumerate(self.states)}

    @cached_property
    def _object_index(self) -> dict[str, int]:
        return {obj: o for o, obj in enumerate(self.objects)}

    def labels(self, split: str) -> tuple[int, ...]:
        """The sorted labels of the pairs of ``split``'s pair file."""
        return tuple(sorted({self.label(*pair) for pair in self.files[split].pairs}))


def select_records(records: list[Record], vocabulary: Vocabulary) -> tuple[dict[str, list[Record]], Counter]:
    """The records each split reads, and how many were dropped per reason (module docstring)."""
    listed = {pair for file in vocabulary.files.values() for pair in file.pairs}
    kept: dict[str, list[Record]] = {split: [] for split in SPLITS}
    dropped: Counter = Counter()
    for record in records:
        if record.state == NA:
            dropped["attr NA"] += 1
        elif record.split == NA:
            dropped["set NA"] += 1
        elif (record.state, record.object) not in listed:
            dropped["pair in no pair file"] += 1
        else:
            kept[record.split].append(record)
    return kept, dropped


def check_records(kept: dict[str, list[Record]], vocabulary: Vocabulary, metadata: Path, source: str) -> None:
    """Every training record holds a train pair, and every pair of a pair file has images of its split.

    Raises:
        ValueError: naming the metadata record, or the pair file and line, and how to fix it.
    """
    train = set(vocabulary.files["train"].pairs)
    stray = [record for record in kept["train"] if (record.state, record.object) not in train]
    if stray:
        first = stray[0]
        raise ValueError(f"{source}: {len(stray)} training records of {metadata} hold pairs missing from "
                         f"{vocabulary.files['train'].path}; the first, record {first.index} (image {first.image!r}), "
                         f"is {first.state} {first.object}. The pair files and the metadata must come from the same "
                         f"release: get them again")
    for split in SPLITS:
        file, imaged = vocabulary.files[split], {(r.state, r.object) for r in kept[split]}
        empty = [(line, pair) for line, pair in zip(file.lines, file.pairs) if pair not in imaged]
        if empty:
            line, (state, obj) = empty[0]
            raise ValueError(f"{source}: {file.path}: line {line} lists the pair '{state} {obj}', but {metadata} has "
                             f"no {split} image of it (no record with attr={state!r}, obj={obj!r}, set={split!r}; "
                             f"{len(empty)} such lines in all). Remove the line, or use the pair files and the "
                             f"metadata of the same release")


def check_images(kept: dict[str, list[Record]], image_root: Path, metadata: Path, skip: bool, source: str) -> None:
    """A missing image file is an error naming its path and record (with ``skip``, a warning: its samples are
    skipped when loaded).

    Raises:
        FileNotFoundError: naming the first missing file, its metadata record and the expected layout.
    """
    records = [record for split in SPLITS for record in kept[split]]
    missing = [record for record in records if not (image_root / record.image).is_file()]
    if not missing:
        return
    first = missing[0]
    message = (f"{source}: {len(missing)} of the {len(records)} images of {metadata} are missing; the first, record "
               f"{first.index} (image {first.image!r}, set {first.split!r}), was looked for at "
               f"{image_root / first.image}. Expected {LAYOUT}: point root at the dataset folder holding images/")
    missing_images(message, skip, FileNotFoundError)


# --------------------------------------------------------------------------------------------- torch side
class CompositionImages(LabelledImages):
    """:class:`LabelledImages` whose items also carry ``state`` and ``object`` (long scalars), the primitives of
    their ``label`` = ``state · |O| + object``. Keys, seeds and unreadable files as in the base.

    Args:
        num_objects: ``|O|``.
        args / kwargs: those of :class:`LabelledImages`.
    """

    def __init__(self, *args: object, num_objects: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.num_objects = num_objects

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor] | Unreadable:
        item = super().__getitem__(key)
        if isinstance(item, Unreadable):
            return item
        state, obj = divmod(int(item["label"]), self.num_objects)
        return item | {"state": torch.tensor(state), "object": torch.tensor(obj)}


class CZSLDataModule(ZooDataModule):
    """MIT-States, UT-Zappos or C-GQA in the CZSL layout as a DataModule; ``self.task`` is ready after ``__init__``
    (see the module docstring for the files, the label space and the deviations).

    Training batches hold the ``set == 'train'`` records (train pairs only); validation and test batches hold their
    split's records, flagged ``seen`` when the pair is a train pair. Items: ``image`` ``[3, S, S]`` float
    (CLIP-normalised), ``label`` (index into ``task.pairs``), ``index`` (position in the split's dataset), ``seen``,
    ``state`` and ``object``. ``original_image(split, index)`` is the sample's file decoded at its own size.

    Args:
        root: the dataset folder (holding ``images/``, the split folder and the metadata file).
        image_size: side ``S`` of the square images.
        batch_size: samples per training batch (and evaluation batch without ``eval_batch_size``).
        eval_batch_size: samples per validation/test/predict batch (the recipes' 32 or 64); None: ``batch_size``.
        num_workers: data loader workers.
        split: the folder below ``root`` holding ``{train,val,test}_pairs.txt``.
        metadata: the metadata file, below ``root`` unless absolute; None: ``metadata_<split>.t7``.
        feasibility: the open-world feasibility file (``feasibility_<dataset>.pt``): a path (as given, else below
            ``root``), ``auto`` (the single ``<root>/feasibility_*.pt`` if there is one) or None.
        allow_pickle: load the metadata and feasibility files with full unpickling when the weights-only loader
            refuses them. Unpickling can run arbitrary code: only for files you trust.
        augment: apply the random training pipeline; otherwise train on the evaluation pipeline.
        on_bad_image: ``error`` (stop at a missing or unreadable image, naming it) or ``skip`` (warn and drop its
            sample from the batch, counted in ``batch["skipped_images"]``).
    """

    def __init__(self, root: str, image_size: int = 224, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 4, split: str = DEFAULT_SPLIT, metadata: str | None = None,
                 feasibility: str | None = None,
                 allow_pickle: bool = False, augment: bool = True,
                 on_bad_image: Literal["error", "skip"] = "error") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = f"CZSLDataModule(root={str(root)!r})"
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"{self.source}: on_bad_image={on_bad_image!r}; choose 'error' or 'skip'")
        folder = Path(root)
        self.image_root = folder / "images"
        self.vocabulary = Vocabulary.of({s: read_pair_file(folder / split / f"{s}_pairs.txt", self.source)
                                         for s in SPLITS})
        metadata_path = folder / (metadata or f"metadata_{split}.t7")
        self.records, dropped = select_records(read_metadata(metadata_path, allow_pickle, self.source),
                                               self.vocabulary)
        check_records(self.records, self.vocabulary, metadata_path, self.source)
        check_images(self.records, self.image_root, metadata_path, on_bad_image == "skip", self.source)
        rank_zero_info(f"{self.source}: {', '.join(f'{len(self.records[s])} {s}' for s in SPLITS)} images; dropped "
                       f"{sum(dropped.values())} records of {metadata_path.name} ({dict(dropped)})")
        self.task = self._task(find_feasibility(folder, feasibility, self.source))

    def _task(self, feasibility: Path | None) -> Task:
        """The open-world label space of the pair files (module docstring)."""
        vocabulary = self.vocabulary
        states = _readable(vocabulary.states, "state", self.source)
        objects = _readable(vocabulary.objects, "object", self.source)
        train, val, test = (vocabulary.labels(split) for split in SPLITS)
        extras: dict = {"raw_states": vocabulary.states, "raw_objects": vocabulary.objects}
        if feasibility is not None:
            extras["feasibility"] = read_feasibility(feasibility, len(states), len(objects),
                                                     self.hparams.allow_pickle, self.source)
        pairs = tuple(product(states, objects))
        return Task(source=self.source, class_names=tuple(f"{s} {o}" for s, o in pairs), seen=train,
                    unseen=tuple(sorted((set(val) | set(test)) - set(train))), states=states, objects=objects,
                    pairs=pairs, train_pairs=train, val_pairs=val, test_pairs=test, extras=extras)

    def build_dataset(self, split: Split) -> CompositionImages:
        """The ``set == split`` records, in metadata order."""
        hp, records = self.hparams, self.records[split]
        random = split == "train" and hp.augment
        transform = (czsl_train_transform if random else czsl_eval_transform)(hp.image_size)
        labels = [self.vocabulary.label(record.state, record.object) for record in records]
        return CompositionImages(ImageFiles([self.image_root / record.image for record in records]), labels,
                                 self.task.seen, transform, random_transform=random,
                                 skip_unreadable=hp.on_bad_image == "skip", num_objects=len(self.task.objects))
