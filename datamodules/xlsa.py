"""The attribute zero-shot benchmarks CUB, AwA2 and SUN in the "Proposed Split" of Xian et al., "Zero-Shot
Learning - The Good, the Bad and the Ugly" (the ``xlsa17`` release), read from its MATLAB files with the images.

Files (every index in a ``.mat`` file is 1-based; they become 0-based here):

- ``split_root/res101.mat``: ``image_files`` (``n`` cell of str: absolute paths on the authors' machine) and
  ``labels`` (``n x 1`` class ids into ``allclasses_names``); ``features`` is not read.
- ``split_root/att_splits.mat``: ``allclasses_names`` (``C`` cell of str), ``att`` and ``original_att`` (``[K, C]``
  float: the L2-normalised and the raw class-attribute matrices), and the image lists ``train_loc``, ``val_loc``,
  ``trainval_loc``, ``test_seen_loc``, ``test_unseen_loc`` (rows of ``res101.mat``'s image list).
- ``image_root``: the folder holding the class folders. A path of ``res101.mat`` keeps what follows its dataset's
  anchor (:data:`PATH_ANCHORS`), joined onto ``image_root``: ``.../CUB_200_2011/images/<class>/<file>``,
  ``.../JPEGImages/<class>/<file>`` (AwA2), ``.../images/<letter>/<class>/<file>`` (SUN).
- ``attribute_names`` (optional): CUB's ``attributes.txt`` (``"<id> has_bill_shape::curved_(up_or_down)"``), AwA2's
  ``predicates.txt`` (``"<id>\\t<name>"``), SUN's ``attributes.mat`` (field ``attributes``, ``K`` cell of str). Names
  are cleaned into words for a text encoder (:func:`clean_attribute_name`); without the file they read
  ``attribute 1`` ... ``attribute K``.
- ``cub_root`` (optional, CUB only): the ``CUB_200_2011`` folder, whose ``images.txt`` (``<id> <path under
  images/>``) and ``bounding_boxes.txt`` (``<id> <x> <y> <w> <h>``, pixels) give every image its bird's box.

Protocols (``protocol``):

- ``validation`` (the default, the clean one): seen = the classes of ``train_loc``, unseen = those of ``val_loc``.
  Training reads ``train_loc`` less a seeded ``holdout_fraction`` of every seen class's images; validation and test
  both read those held-out seen images and all of ``val_loc``. No image of ``test_seen_loc`` or
  ``test_unseen_loc`` is ever read.
- ``test`` (the final run): seen = the classes of ``trainval_loc``, unseen = those of ``test_unseen_loc``; training
  reads ``trainval_loc``; validation and test both read ``test_seen_loc`` then ``test_unseen_loc``. Validation *is*
  the test set here (``task.extras["validates_on_test"]``), so a method must choose nothing on it: the calibration
  and the number of epochs come from the run under ``validation``.

``task.extras["attribute_groups"]`` partitions the attribute indices for a decorrelation loss: for CUB the names'
prefixes before ``::`` (28 groups, ``has_bill_shape::*`` ...); for AwA2 the 9 groups of APN (Xu et al., NeurIPS
2020, :data:`AWA2_GROUPS`).

Deliberate deviations:

- SUN's 4 APN groups (functions, materials, surface properties, spatial envelope; APN's ``attri_groups_4.json``)
  could not be found (the file ships with APN's data, not its code), so on SUN, and on CUB without
  ``attribute_names``, every attribute is its own group.
- The label space is the protocol's classes: all ``C`` under ``test``; under ``validation`` the classes of
  ``train_loc`` and ``val_loc`` only (labels renumbered in the order of ``allclasses_names``), so the GZSL argmax
  never picks a test class, as it would over all ``C``.
- Under ``validation``, an image that ``train_loc`` or ``val_loc`` shares with ``test_seen_loc`` or
  ``test_unseen_loc`` is left out (with a warning counting them), so that no test image is ever read.
- Missing image files are an error at construction (naming the first, before and after remapping); with
  ``on_bad_image: skip`` they are reported in a warning and their samples skipped when loaded.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.cifar import stratified_holdout
from datamodules.folder import _folder_name
from datamodules.loading import (
    ImageFiles,
    LabelledImages,
    Split,
    ZooDataModule,
    missing_images,
    read_rgb,
)
from datamodules.task import Task
from datamodules.transforms import (
    A,
    awa2_train_transform,
    cub_train_transform,
    resize_crop_eval_transform,
    sun_train_transform,
)

XlsaDataset = Literal["CUB", "AWA2", "SUN"]
Protocol = Literal["validation", "test"]

PATH_ANCHORS: dict[str, str] = {"CUB": "CUB_200_2011/images/", "AWA2": "JPEGImages/", "SUN": "images/"}
"""Per dataset, the end of the prefix that a path of ``res101.mat`` loses before it is joined onto ``image_root``."""
IMAGE_ROOTS = {"CUB": ".../CUB_200_2011/images", "AWA2": ".../Animals_with_Attributes2/JPEGImages",
               "SUN": ".../SUN/images (holding the letter folders a/, b/, ...)"}
"""What ``image_root`` should point at, for error messages."""
NAME_FILES = {"CUB": "attributes.txt", "AWA2": "predicates.txt", "SUN": "attributes.mat"}
"""The file of each dataset's attribute names."""
TRAIN_TRANSFORMS = {"CUB": cub_train_transform, "AWA2": awa2_train_transform, "SUN": sun_train_transform}
LOCS = ("train_loc", "val_loc", "trainval_loc", "test_seen_loc", "test_unseen_loc")
RELEASE = "the xlsa17 release of Xian et al. (Proposed Split)"

# APN (Xu et al., NeurIPS 2020, github.com/wenjiaXu/APN-ZSL): the 9 groups of AwA2's 85 predicates that APN loads
# from data/AWA2/attri_groups_9.json (0-based indices into predicates.txt). The file ships with APN's data, not its
# code; these lists are its content as reproduced in a comment of a derivative of APN's model/main.py, checked to
# cover the 85 indices once each. As published, "smelly" (33) is a character trait and "newworld" (62) nutrition.
AWA2_GROUPS: dict[str, tuple[int, ...]] = {
    "color": tuple(range(0, 8)),
    "texture": tuple(range(8, 14)),
    "shape": tuple(range(14, 18)),
    "body_parts": (*range(18, 33), 44, 45),
    "behaviour": tuple(range(46, 51)),
    "nutrition": tuple(range(51, 63)),
    "activity": tuple(range(34, 44)),
    "habitat": tuple(range(63, 78)),
    "character": (33, *range(78, 85)),
}


# --------------------------------------------------------------------------------------------- the .mat files
def _load_mat(path: Path, fields: Sequence[str], origin: str, source: str) -> dict[str, np.ndarray]:
    """The given variables of a MATLAB (v5) file; a missing file or variable is an error naming both and
    ``origin``, where the file comes from."""
    if not path.is_file():
        raise ValueError(f"{source}: {path} not found; expected the file of {origin}")
    try:
        content = scipy.io.loadmat(path, variable_names=list(fields))
    except (ValueError, NotImplementedError, OSError) as error:
        raise ValueError(f"{source}: cannot read {path} as a MATLAB v5 file ({error}); get it again from "
                         f"{origin}") from None
    missing = [field for field in fields if field not in content]
    if missing:
        raise ValueError(f"{source}: {path} has no field {missing}; expected the fields {list(fields)} of {origin}")
    return {field: content[field] for field in fields}


def _strings(value: np.ndarray, path: Path, field: str, source: str) -> list[str]:
    """The strings of a MATLAB cell array of str (or char matrix), in order."""
    if value.dtype.kind == "U":
        return [str(text).rstrip() for text in value.ravel()]
    if value.dtype != object:
        raise ValueError(f"{source}: field {field} of {path} holds {value.dtype} values; expected a cell array of str")
    strings = []
    for item in value.ravel():
        item = np.asarray(item)
        if item.dtype.kind != "U" or item.size > 1:
            raise ValueError(f"{source}: field {field} of {path} holds {item!r}; expected a cell array of str")
        strings.append(str(item.item()) if item.size else "")
    return strings


def _rows(value: np.ndarray, count: int, path: Path, field: str, source: str) -> np.ndarray:
    """0-based ``[m]`` int64 of a MATLAB vector of 1-based indices into ``count`` items."""
    flat = value.ravel()
    if np.squeeze(value).ndim > 1 or flat.dtype.kind not in "iuf":
        raise ValueError(f"{source}: field {field} of {path} has shape {value.shape} ({value.dtype}); expected a "
                         f"vector of 1-based indices")
    rows = flat.astype(np.int64)
    if not np.array_equal(rows, flat) or (rows.size and (rows.min() < 1 or rows.max() > count)):
        raise ValueError(f"{source}: field {field} of {path} must hold whole numbers from 1 to {count} (1-based "
                         f"indices); it holds values in [{flat.min()}, {flat.max()}]")
    return rows - 1


@dataclass(frozen=True)
class Xlsa:
    """The content of ``res101.mat`` and ``att_splits.mat``, with 0-based indices.

    Attributes:
        files: ``n`` image paths as written in ``res101.mat`` (the authors' machine).
        labels: ``[n]`` class index of every image.
        classes: ``C`` raw class names (``allclasses_names``).
        attributes: ``[K, C]`` float class-attribute matrix (``att`` or ``original_att``).
        locs: per field of :data:`LOCS`, ``[m]`` indices into ``files``.
    """

    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    attributes: np.ndarray
    locs: dict[str, np.ndarray]

    def classes_of(self, field: str) -> tuple[int, ...]:
        """The sorted classes of the images of split field ``field``."""
        return tuple(np.unique(self.labels[self.locs[field]]).tolist())


def read_xlsa(split_root: str, attribute_source: str, source: str) -> Xlsa:
    """Read and check ``res101.mat`` and ``att_splits.mat`` in ``split_root``.

    Raises:
        ValueError: naming the file and field when a file or field is missing, a field has the wrong shape, or
            the splits contradict each other (seen and unseen classes shared).
    """
    res_path, split_path = Path(split_root, "res101.mat"), Path(split_root, "att_splits.mat")
    origin = f"{RELEASE} (split_root holds it)"
    res = _load_mat(res_path, ("image_files", "labels"), origin, source)
    splits = _load_mat(split_path, ("allclasses_names", attribute_source, *LOCS), origin, source)
    files = _strings(res["image_files"], res_path, "image_files", source)
    classes = _strings(splits["allclasses_names"], split_path, "allclasses_names", source)
    if res["labels"].size != len(files):
        raise ValueError(f"{source}: field labels of {res_path} has {res['labels'].size} entries but image_files "
                         f"has {len(files)}; expected one label per image")
    labels = _rows(res["labels"], len(classes), res_path, "labels", source)
    attributes = np.asarray(splits[attribute_source])
    if attributes.ndim != 2 or attributes.shape[1] != len(classes) or attributes.dtype.kind not in "iuf":
        raise ValueError(f"{source}: field {attribute_source} of {split_path} has shape {attributes.shape} "
                         f"({attributes.dtype}); expected [K, {len(classes)}] numbers (one column per class of "
                         f"allclasses_names)")
    locs = {field: _rows(splits[field], len(files), split_path, field, source) for field in LOCS}
    xlsa = Xlsa(tuple(files), labels, tuple(classes), attributes.astype(np.float32), locs)
    for seen, unseen in (("train_loc", "val_loc"), ("trainval_loc", "test_unseen_loc")):
        shared = sorted(set(xlsa.classes_of(seen)) & set(xlsa.classes_of(unseen)))
        if shared:
            raise ValueError(f"{source}: fields {seen} and {unseen} of {split_path} share the classes "
                             f"{[classes[c] for c in shared]}; seen and unseen classes must be disjoint: get "
                             f"att_splits.mat again from {RELEASE}")
    return xlsa


# --------------------------------------------------------------------------------------------- names and groups
def readable_class_name(raw: str) -> str:
    """A class name for prompts: no numeric ``NNN.`` prefix, no SUN letter folder, ``_ / +`` turned into spaces.

    >>> [readable_class_name(n) for n in ("001.Black_footed_Albatross", "grizzly+bear", "b/bakery/shop")]
    ['Black footed Albatross', 'grizzly bear', 'bakery shop']
    """
    return " ".join(re.split(r"[\s_/+]+", re.sub(r"^[a-z]/", "", _folder_name(raw)))).strip()


def clean_attribute_name(raw: str, dataset: str) -> str:
    """Words of an attribute name for a text encoder.

    CUB: split at ``::``, ``_``, ``-`` and parentheses, without the word "has"; AwA2 and SUN: ``_`` turned into
    spaces and ``/`` into " or ".

    >>> clean_attribute_name("has_bill_shape::curved_(up_or_down)", "CUB")
    'bill shape curved up or down'
    >>> clean_attribute_name("sailing/ boating", "SUN")
    'sailing or boating'
    """
    if dataset == "CUB":
        return " ".join(word for word in re.split(r"::|[\s_\-()]+", raw) if word and word != "has")
    return " ".join(re.split(r"[\s_]+", raw.replace("/", " or "))).strip()


def _raw_attribute_names(path: Path, dataset: str, source: str) -> list[str]:
    """The names in the attribute-name file: SUN's ``attributes`` field, else ``<id> <name>`` lines."""
    if not path.is_file():
        raise ValueError(f"{source}: attribute_names file {path} not found; pass {NAME_FILES[dataset]} of the "
                         f"dataset or None")
    if dataset == "SUN":
        names = _load_mat(path, ("attributes",), "the SUN attribute database", source)["attributes"]
        return _strings(names, path, "attributes", source)
    lines = [line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    malformed = [number for number, parts in enumerate(lines, 1) if len(parts) != 2]
    if malformed:
        raise ValueError(f"{source}: attribute_names file {path}: line {malformed[0]} is not '<id> <name>'")
    return [name.strip() for _, name in lines]


def read_attribute_names(path: str | None, dataset: str, count: int,
                         source: str) -> tuple[list[str], list[str] | None]:
    """``(clean names, raw names or None)`` of the ``count`` attributes, from the ``attribute_names`` file."""
    if path is None:
        return [f"attribute {k + 1}" for k in range(count)], None
    raw = _raw_attribute_names(Path(path), dataset, source)
    if len(raw) != count:
        raise ValueError(f"{source}: attribute_names file {path} names {len(raw)} attributes but the attribute "
                         f"matrix has {count}; pass {NAME_FILES[dataset]} of the same dataset")
    return [clean_attribute_name(name, dataset) for name in raw], raw


def attribute_groups(dataset: str, raw_names: list[str] | None, count: int,
                     source: str) -> tuple[tuple[int, ...], ...]:
    """A partition of the ``count`` attribute indices: CUB by the names' prefix before ``::`` (in order of first
    appearance), AwA2 by :data:`AWA2_GROUPS`; otherwise (SUN, CUB without names) one group per attribute."""
    if dataset == "AWA2":
        if count != sum(map(len, AWA2_GROUPS.values())):
            raise ValueError(f"{source}: AwA2's attribute matrix has {count} attributes; APN's groups need the 85 "
                             f"predicates of {RELEASE}")
        return tuple(AWA2_GROUPS.values())
    if dataset != "CUB" or raw_names is None:
        return tuple((k,) for k in range(count))
    groups: dict[str, list[int]] = {}
    for k, name in enumerate(raw_names):
        groups.setdefault(name.split("::")[0], []).append(k)
    return tuple(tuple(members) for members in groups.values())


# --------------------------------------------------------------------------------------------- images
def remap(path: str, dataset: str, image_root: str, source: str) -> tuple[str, Path]:
    """``(path under image_root, file)`` of a ``res101.mat`` path: what follows the last ``PATH_ANCHORS[dataset]``
    that starts a path segment, joined onto ``image_root``."""
    anchor = PATH_ANCHORS[dataset]
    _, found, relative = ("/" + path.replace("\\", "/")).rpartition("/" + anchor)
    if not found:
        raise ValueError(f"{source}: image path {path} of res101.mat has no '{anchor}' in it, as {dataset}'s do; "
                         f"is dataset={dataset!r} the dataset of split_root?")
    relative = relative.lstrip("/")
    return relative, Path(image_root, relative)


def check_images(files: Sequence[Path], originals: Sequence[str], rows: np.ndarray, image_root: str, dataset: str,
                 skip: bool, source: str) -> None:
    """Report how many of the images ``rows`` exist; a missing one is an error naming the first (or, with
    ``skip``, a warning: its sample is dropped when loaded)."""
    missing = [row for row in rows.tolist() if not files[row].is_file()]
    rank_zero_info(f"{source}: found {len(rows) - len(missing)} of the {len(rows)} images of the protocol under "
                   f"image_root {image_root}")
    if not missing:
        return
    first = missing[0]
    message = (f"{source}: {len(missing)} of {len(rows)} images are missing under image_root={image_root!r}; the "
               f"first, {originals[first]} in res101.mat, was looked for at {files[first]}. Point image_root at the "
               f"folder holding {dataset}'s class folders ({IMAGE_ROOTS[dataset]})")
    missing_images(message, skip)


def read_cub_boxes(cub_root: str, relatives: Sequence[str], source: str) -> np.ndarray:
    """``[n, 4]`` float box ``(x, y, w, h)`` in pixels of each image, given by its path under ``images/``, from
    ``images.txt`` and ``bounding_boxes.txt`` of ``cub_root``."""
    tables = {}
    for name, width in (("images.txt", 2), ("bounding_boxes.txt", 5)):
        path = Path(cub_root, name)
        if not path.is_file():
            raise ValueError(f"{source}: {path} not found; cub_root must be the CUB_200_2011 folder (holding "
                             f"images.txt and bounding_boxes.txt) or None")
        rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        malformed = [number for number, row in enumerate(rows, 1) if len(row) != width]
        if malformed:
            raise ValueError(f"{source}: {path}: line {malformed[0]} does not hold {width} fields")
        tables[name] = {row[0]: row[1:] for row in rows}
    ids = {path: image_id for image_id, (path,) in tables["images.txt"].items()}
    unknown = [relative for relative in relatives if relative not in ids or ids[relative] not in
               tables["bounding_boxes.txt"]]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} images of res101.mat have no box in {cub_root} (images.txt and "
                         f"bounding_boxes.txt), e.g. {unknown[0]}; is cub_root the CUB_200_2011 folder?")
    return np.array([tables["bounding_boxes.txt"][ids[relative]] for relative in relatives], dtype=np.float64)


def _box_span(start: float, length: float, size: int) -> slice:
    """The pixels ``[lo, hi)`` along one axis whose centres lie in ``[start, start + length)``, clipped to
    ``size`` and at least one pixel wide."""
    lo = min(max(int(np.ceil(start - 0.5)), 0), size - 1)
    return slice(lo, min(max(int(np.ceil(start + length - 0.5)), lo + 1), size))


def box_window(box: np.ndarray, height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of an ``[H, W]`` image inside ``box`` ``(x, y, w, h)`` (pixel centres inside)."""
    x, y, w, h = box.tolist()
    return _box_span(y, h, height), _box_span(x, w, width)


class BoxedImageFiles(ImageFiles):
    """Image files with one box each: item ``i`` is ``[H, W, 3]`` uint8 RGB of ``paths[i]``, cropped to its box when
    ``crop`` (so the originals a datamodule serves are the crops too).

    Args:
        paths: ``N`` image files.
        boxes: ``[N, 4]`` box ``(x, y, w, h)`` in pixels of each.
        crop: crop each image to its box.
    """

    def __init__(self, paths: Sequence[Path], boxes: np.ndarray, crop: bool) -> None:
        super().__init__(paths)
        self.boxes, self.crop = boxes, crop

    def __getitem__(self, index: int) -> np.ndarray:
        image = read_rgb(self.paths[index])
        return image[box_window(self.boxes[index], *image.shape[:2])] if self.crop else image

    def mask(self, index: int, height: int, width: int) -> np.ndarray:
        """``[H, W]`` uint8, 1 inside item ``index``'s box (everywhere for a crop), for its ``[H, W]`` image."""
        if self.crop:
            return np.ones((height, width), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[box_window(self.boxes[index], height, width)] = 1
        return mask


class BoxedImages(LabelledImages):
    """:class:`LabelledImages` over :class:`BoxedImageFiles`; items also carry ``mask`` ``[S, S]`` bool, the box,
    transformed together with the image (nearest neighbour). Keys, seeds and unreadable files as in the base."""

    images: BoxedImageFiles

    def targets(self, index: int, image: np.ndarray) -> dict[str, np.ndarray]:
        """The box of item ``index`` as a ``mask`` of its decoded ``image``."""
        return {"mask": self.images.mask(index, *image.shape[:2])}


# --------------------------------------------------------------------------------------------- protocols
def _without(rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """``rows`` less those in ``excluded``, in order."""
    return rows[~np.isin(rows, excluded)]


def protocol_rows(xlsa: Xlsa, protocol: str, fraction: float, seed: int,
                  source: str) -> tuple[dict[str, np.ndarray], tuple[int, ...], tuple[int, ...]]:
    """The images of each split (indices into ``xlsa.files``) and the seen and unseen classes of ``protocol``
    (module docstring).

    Returns:
        ``({"train": rows, "val": rows, "test": rows}, seen, unseen)``; val and test are the same images.
    """
    locs = xlsa.locs
    tests = np.concatenate([locs["test_seen_loc"], locs["test_unseen_loc"]])
    if protocol == "test":
        splits = {"train": locs["trainval_loc"], "val": tests, "test": tests}
        return splits, xlsa.classes_of("trainval_loc"), xlsa.classes_of("test_unseen_loc")
    train, val = _without(locs["train_loc"], tests), _without(locs["val_loc"], tests)
    dropped = len(locs["train_loc"]) + len(locs["val_loc"]) - len(train) - len(val)
    if dropped:
        warnings.warn(f"{source}: {dropped} images of train_loc/val_loc are also in test_seen_loc/test_unseen_loc of "
                      f"att_splits.mat; protocol 'validation' leaves them out")
    kept, held = stratified_holdout(xlsa.labels[train], fraction, seed)
    seen = xlsa.classes_of("train_loc")
    emptied = sorted(set(seen) - set(xlsa.labels[train[kept]].tolist()))
    if emptied:
        raise ValueError(f"{source}: holdout_fraction={fraction} leaves the seen classes "
                         f"{[xlsa.classes[c] for c in emptied]} no training image; lower it")
    evaluation = np.concatenate([train[held], val])
    return {"train": train[kept], "val": evaluation, "test": evaluation}, seen, xlsa.classes_of("val_loc")


class XianDataModule(ZooDataModule):
    """CUB, AwA2 or SUN in the xlsa17 "Proposed Split" as a DataModule; ``self.task`` is ready after ``__init__``
    (see the module docstring for the files, the protocols and the deviations).

    Train batches hold seen classes only; validation and test batches hold seen and unseen classes, flagged by
    ``seen``. Items: ``image`` ``[3, S, S]`` float (CLIP-normalised), ``label``, ``index`` (position in the split's
    dataset) and ``seen``; on CUB with ``cub_root`` also ``mask`` ``[S, S]`` bool, the bird's box. The task carries
    ``attributes`` ``[C, K]``, ``attribute_names`` and ``extras`` ``attribute_groups`` (a partition of the ``K``
    indices) and ``validates_on_test``. ``original_image(split, index)`` is the sample's file decoded at its own
    size (cropped to the box with ``cub_bbox_crop``).

    Under ``protocol: test`` validation reads the test images: a method must then choose nothing on validation
    (no checkpoint by best score, no calibration search); take the calibration and the number of epochs from the
    run under ``protocol: validation``.

    Args:
        dataset: ``CUB``, ``AWA2`` or ``SUN``.
        split_root: folder holding ``res101.mat`` and ``att_splits.mat`` of the dataset.
        image_root: folder holding the class folders (``.../CUB_200_2011/images``, ``.../JPEGImages``,
            ``.../SUN/images``).
        protocol: ``validation`` (train on ``train_loc``, validate on ``val_loc`` classes) or ``test`` (train on
            ``trainval_loc``, validate and test on the test images).
        image_size: side ``S`` of the square images.
        batch_size: samples per batch.
        num_workers: data loader workers.
        holdout_fraction: under ``validation``, share of every seen class's ``train_loc`` images validated on
            instead of trained on.
        holdout_seed: seed of that choice.
        attribute_source: ``original_att`` (raw class attributes) or ``att`` (L2-normalised).
        attribute_names: the dataset's attribute-name file (``attributes.txt``, ``predicates.txt``,
            ``attributes.mat``), or None for ``attribute 1`` ... ``attribute K``.
        cub_root: CUB only: the ``CUB_200_2011`` folder, for the birds' boxes (batches then carry ``mask``).
        cub_bbox_crop: crop every image to its box before the transform (needs ``cub_root``).
        augment: apply the dataset's random training pipeline (SVIP's recipe); otherwise train on the evaluation
            pipeline (shorter side to ``S * 256 / 224``, centre crop).
        on_bad_image: ``error`` (stop at a missing or unreadable image, naming it) or ``skip`` (warn and drop its
            sample from the batch, counted in ``batch["skipped_images"]``).
    """

    def __init__(self, dataset: XlsaDataset, split_root: str, image_root: str, protocol: Protocol = "validation",
                 image_size: int = 224, batch_size: int = 64, num_workers: int = 4, holdout_fraction: float = 0.2,
                 holdout_seed: int = 0, attribute_source: Literal["original_att", "att"] = "original_att",
                 attribute_names: str | None = None, cub_root: str | None = None, cub_bbox_crop: bool = False,
                 augment: bool = True, on_bad_image: Literal["error", "skip"] = "error") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = f"XianDataModule(dataset={dataset!r}, split_root={str(split_root)!r})"
        self._check_options()
        xlsa = read_xlsa(split_root, attribute_source, self.source)
        self.rows, seen, unseen = protocol_rows(xlsa, protocol, holdout_fraction, holdout_seed, self.source)
        remapped = [remap(path, dataset, image_root, self.source) for path in xlsa.files]
        self.files = [file for _, file in remapped]
        space = np.array(sorted({*seen, *unseen}))  # the protocol's classes; the others are not in its label space
        position = np.full(len(xlsa.classes), -1)
        position[space] = np.arange(len(space))
        self.labels = position[xlsa.labels]
        seen, unseen = tuple(int(position[c]) for c in seen), tuple(int(position[c]) for c in unseen)
        used = np.unique(np.concatenate(list(self.rows.values())))
        check_images(self.files, xlsa.files, used, image_root, dataset, on_bad_image == "skip", self.source)
        self.boxes = None
        if cub_root is not None:
            self.boxes = np.zeros((len(self.files), 4))
            self.boxes[used] = read_cub_boxes(cub_root, [remapped[row][0] for row in used.tolist()], self.source)
        names, raw = read_attribute_names(attribute_names, dataset, xlsa.attributes.shape[0], self.source)
        groups = attribute_groups(dataset, raw, xlsa.attributes.shape[0], self.source)
        self.task = Task(source=self.source, class_names=tuple(readable_class_name(xlsa.classes[c]) for c in space),
                         seen=seen, unseen=unseen,
                         attributes=torch.from_numpy(np.ascontiguousarray(xlsa.attributes[:, space].T)),
                         attribute_names=tuple(names),
                         extras={"attribute_groups": groups, "validates_on_test": protocol == "test"})

    def _check_options(self) -> None:
        """Refuse option values outside their choices and combinations that cannot work."""
        hp = self.hparams
        choices = {"dataset": ("CUB", "AWA2", "SUN"), "protocol": ("validation", "test"),
                   "attribute_source": ("original_att", "att"), "on_bad_image": ("error", "skip")}
        for option, allowed in choices.items():
            if hp[option] not in allowed:
                raise ValueError(f"{self.source}: {option}={hp[option]!r}; choose one of {list(allowed)}")
        if not 0 <= hp.holdout_fraction < 1:
            raise ValueError(f"{self.source}: holdout_fraction={hp.holdout_fraction} must lie in [0, 1)")
        if hp.cub_root is not None and hp.dataset != "CUB":
            raise ValueError(f"{self.source}: cub_root is for dataset CUB only; set it to None")
        if hp.cub_bbox_crop and hp.cub_root is None:
            raise ValueError(f"{self.source}: cub_bbox_crop needs the boxes of cub_root (the CUB_200_2011 folder)")

    def build_dataset(self, split: Split) -> LabelledImages:
        """The images of ``split`` (module docstring), with their boxes on CUB with ``cub_root``."""
        hp, rows = self.hparams, self.rows[split]
        random = split == "train" and hp.augment
        transform: A.Compose = (TRAIN_TRANSFORMS[hp.dataset] if random else resize_crop_eval_transform)(hp.image_size)
        paths = [self.files[row] for row in rows.tolist()]
        options = dict(labels=self.labels[rows], seen=self.task.seen, transform=transform, random_transform=random,
                       skip_unreadable=hp.on_bad_image == "skip")
        if self.boxes is None:
            return LabelledImages(ImageFiles(paths), **options)
        return BoxedImages(BoxedImageFiles(paths, self.boxes[rows], hp.cub_bbox_crop), **options)
