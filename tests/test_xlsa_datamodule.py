"""XianDataModule: xlsa17 files of CUB, AwA2 and SUN, protocols, path remapping, boxes, names, groups and errors.

Fixtures are tiny copies of the real formats: ``res101.mat`` and ``att_splits.mat`` written by ``scipy.io.savemat``
(cells as numpy object arrays, 1-based indices) whose image paths carry the authors' absolute prefixes, and
37 x 23 JPEG images under a local ``image_root``.
"""

import logging
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch

from datamodules import XianDataModule
from datamodules.loading import read_rgb
from datamodules.transforms import CLIP_MEAN, CLIP_STD, resize_crop_eval_transform
from datamodules.xlsa import AWA2_GROUPS

PREFIXES = {"CUB": "/BS/Deep_Fragments/work/MSc/CUB_200_2011/CUB_200_2011/images/",
            "AWA2": "/BS/xian/work/data/Animals_with_Attributes2//JPEGImages/",
            "SUN": "/BS/Deep_Fragments/work/MSc/data/SUN/images/"}
"""The absolute prefixes of the image paths in the real res101.mat files (another machine's)."""
CLASSES = {
    "CUB": ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani",
            "005.Crested_Auklet", "006.Least_Auklet"),
    "AWA2": ("antelope", "grizzly+bear", "killer+whale", "beaver", "dalmatian", "persian+cat"),
    "SUN": ("a/abbey", "b/bakery/shop", "a/airport_terminal", "c/campus", "d/dining_room", "b/beach"),
}
READABLE = {
    "CUB": ("Black footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove billed Ani", "Crested Auklet",
            "Least Auklet"),
    "AWA2": ("antelope", "grizzly bear", "killer whale", "beaver", "dalmatian", "persian cat"),
    "SUN": ("abbey", "bakery shop", "airport terminal", "campus", "dining room", "beach"),
}
CUB_NAMES = ("has_bill_shape::curved_(up_or_down)", "has_bill_shape::all-purpose", "has_wing_color::blue",
             "has_wing_color::brown", "has_upperparts_color::blue", "has_size::small_(5_-_9_in)")
SUN_NAMES = ("sailing/ boating", "direct sun/sunny", "man-made", "open_area")
ATTRIBUTES = {"CUB": len(CUB_NAMES), "AWA2": 85, "SUN": len(SUN_NAMES)}
TRAIN, VAL, TEST_UNSEEN = (0, 1, 2), (3,), (4, 5)
"""Classes of train_loc, val_loc and test_unseen_loc; trainval_loc holds TRAIN + VAL."""
PER_SEEN, PER_UNSEEN = 5, 2
"""Images per class of trainval_loc (the last one of each goes to test_seen_loc) and of test_unseen_loc."""
HEIGHT, WIDTH = 23, 37
BOX = (10.0, 4.0, 12.0, 9.0)
"""The bird's box ``(x, y, w, h)`` of every CUB image; painted white over the class colour."""
COLOURS = [(200, 30, 40), (20, 160, 60), (30, 50, 220), (230, 200, 20), (140, 40, 200), (20, 200, 210)]


@dataclass
class Fixture:
    """A written xlsa17 copy: ``files`` (res101.mat's paths), ``relative`` (under image_root), ``labels`` (0-based)
    and the 0-based ``locs`` of every split field."""

    dataset: str
    split_root: Path
    image_root: Path
    files: list[str]
    relative: list[str]
    labels: np.ndarray
    locs: dict[str, list[int]]
    attributes: np.ndarray

    def module(self, **kwargs) -> XianDataModule:
        kwargs = dict(image_size=8, batch_size=4, num_workers=0, augment=False) | kwargs
        return XianDataModule(self.dataset, str(self.split_root), str(self.image_root), **kwargs)

    def split_fields(self) -> dict[str, np.ndarray]:
        """The fields of att_splits.mat, as the real file stores them (column vectors, cells, 1-based)."""
        fields = {name: np.asarray(rows, dtype=np.float64).reshape(-1, 1) + 1 for name, rows in self.locs.items()}
        names = np.empty((len(CLASSES[self.dataset]), 1), dtype=object)
        names[:, 0] = CLASSES[self.dataset]
        return fields | {"allclasses_names": names, "att": self.attributes, "original_att": 100 * self.attributes}

    def save_splits(self, drop: tuple[str, ...] = (), **overrides) -> None:
        fields = {key: value for key, value in (self.split_fields() | overrides).items() if key not in drop}
        scipy.io.savemat(self.split_root / "att_splits.mat", fields)

    def save_res101(self, **overrides) -> None:
        cells = np.empty((len(self.files), 1), dtype=object)
        cells[:, 0] = self.files
        fields = {"image_files": cells, "labels": self.labels.reshape(-1, 1) + 1.0,
                  "features": np.zeros((3, len(self.files)))}
        scipy.io.savemat(self.split_root / "res101.mat", fields | overrides)

    def rows_of(self, *fields: str) -> set[int]:
        return {row for field in fields for row in self.locs[field]}


def _relative(dataset: str, name: str, k: int) -> str:
    """Where an image lies under image_root: ``<class>/<file>`` (SUN: ``<letter>/<class>/<file>``)."""
    if dataset == "CUB":
        return f"{name}/{name[4:]}_{k:04d}_{k}.jpg"
    return f"{name}/{name.replace('/', '_')}_{k}.jpg"


def _picture(dataset: str, label: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of the class colour (CUB: with the box painted white)."""
    image = np.broadcast_to(np.array(COLOURS[label], dtype=np.uint8), (HEIGHT, WIDTH, 3)).copy()
    if dataset == "CUB":
        x, y, w, h = map(int, BOX)
        image[y : y + h, x : x + w] = 255
    return image


def write_xlsa(tmp_path: Path, dataset: str) -> Fixture:
    """Images on disk and res101.mat / att_splits.mat naming them by the authors' paths, in a shuffled order."""
    entries = []  # (class, k, field)
    for c in TRAIN + VAL:
        field = "train_loc" if c in TRAIN else "val_loc"
        entries += [(c, k, field if k < PER_SEEN - 1 else "test_seen_loc") for k in range(PER_SEEN)]
    entries += [(c, k, "test_unseen_loc") for c in TEST_UNSEEN for k in range(PER_UNSEEN)]
    order = np.random.default_rng(0).permutation(len(entries))
    entries = [entries[i] for i in order]
    image_root = tmp_path / "images"
    relative = [_relative(dataset, CLASSES[dataset][c], k) for c, k, _ in entries]
    for (c, _, _), path in zip(entries, relative):
        (image_root / path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image_root / path), cv2.cvtColor(_picture(dataset, c), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 100])
    locs = {field: [row for row, entry in enumerate(entries) if entry[2] == field]
            for field in ("train_loc", "val_loc", "test_seen_loc", "test_unseen_loc")}
    locs["trainval_loc"] = sorted(locs["train_loc"] + locs["val_loc"])
    attributes = np.random.default_rng(1).random((ATTRIBUTES[dataset], len(CLASSES[dataset])))
    split_root = tmp_path / "xlsa17" / dataset
    split_root.mkdir(parents=True)
    fixture = Fixture(dataset, split_root, image_root, [PREFIXES[dataset] + path for path in relative], relative,
                      np.array([c for c, _, _ in entries]), locs, attributes)
    fixture.save_res101()
    fixture.save_splits()
    return fixture


def write_cub_root(fixture: Fixture, tmp_path: Path) -> Path:
    """``CUB_200_2011/images.txt`` and ``bounding_boxes.txt`` for the fixture's images, ids in another order."""
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    ids = {path: 1000 - i for i, path in enumerate(sorted(fixture.relative, reverse=True))}
    (root / "images.txt").write_text("".join(f"{ids[path]} {path}\n" for path in sorted(fixture.relative)))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {' '.join(map(str, BOX))}\n" for i in ids.values()))
    return root


@pytest.fixture(params=["CUB", "AWA2", "SUN"])
def xlsa(request, tmp_path) -> Fixture:
    return write_xlsa(tmp_path, request.param)


def _all(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def _colour(image: torch.Tensor) -> np.ndarray:
    """Mean RGB in 0..255 of a CLIP-normalised ``[3, H, W]`` image."""
    pixels = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    return pixels.reshape(-1, 3).mean(0) * 255


def _paths(dm: XianDataModule, split: str) -> list[Path]:
    return list(dm.dataset(split).images.paths)


# ------------------------------------------------------------------------------------------------ protocols
def test_validation_protocol_classes_splits_and_labels(xlsa):
    dm = xlsa.module(holdout_fraction=0.25)
    task = dm.task
    # the label space is the train_loc and val_loc classes (0-3): the test classes 4 and 5 are not in it
    assert task.class_names == READABLE[xlsa.dataset][:4]
    assert task.seen == TRAIN and task.unseen == VAL
    assert task.extras["validates_on_test"] is False
    assert task.attributes.dtype == torch.float32 and task.attributes.shape == (4, ATTRIBUTES[xlsa.dataset])
    torch.testing.assert_close(task.attributes, torch.tensor(100 * xlsa.attributes.T[:4], dtype=torch.float32))
    train, val, test = (dm.dataset(split) for split in ("train", "val", "test"))
    # one of the four train_loc images of every seen class is held out (round(0.25 * 4))
    assert torch.bincount(train.labels, minlength=4).tolist() == [3, 3, 3, 0]
    assert torch.bincount(val.labels, minlength=4).tolist() == [1, 1, 1, 4]
    assert _paths(dm, "val") == _paths(dm, "test") and torch.equal(val.labels, test.labels)
    assert torch.equal(val.seen, val.labels < 3) and train.seen.all()
    train_rows = {xlsa.relative.index(str(path.relative_to(xlsa.image_root))) for path in _paths(dm, "train")}
    val_rows = {xlsa.relative.index(str(path.relative_to(xlsa.image_root))) for path in _paths(dm, "val")}
    assert train_rows | val_rows == xlsa.rows_of("train_loc", "val_loc") and not train_rows & val_rows
    for path, label in zip(_paths(dm, "val"), val.labels.tolist()):
        assert label == xlsa.labels[xlsa.relative.index(str(path.relative_to(xlsa.image_root)))]
        assert str(path.relative_to(xlsa.image_root)).startswith(CLASSES[xlsa.dataset][label] + "/")


def test_holdout_is_seeded_and_fraction_per_class(tmp_path):
    xlsa = write_xlsa(tmp_path, "AWA2")
    first, again = xlsa.module(holdout_fraction=0.5), xlsa.module(holdout_fraction=0.5)
    assert _paths(first, "train") == _paths(again, "train")
    assert torch.bincount(first.dataset("train").labels).tolist() == [2, 2, 2]
    other = xlsa.module(holdout_fraction=0.5, holdout_seed=3)
    assert _paths(other, "train") != _paths(first, "train")
    assert torch.bincount(xlsa.module(holdout_fraction=0.0).dataset("train").labels).tolist() == [4, 4, 4]


def test_test_protocol_trains_on_trainval_and_validates_on_the_test_images(xlsa):
    dm = xlsa.module(protocol="test")
    assert dm.task.seen == TRAIN + VAL and dm.task.unseen == TEST_UNSEEN
    assert dm.task.extras["validates_on_test"] is True
    assert torch.bincount(dm.dataset("train").labels, minlength=6).tolist() == [4, 4, 4, 4, 0, 0]
    val = dm.dataset("val")
    assert torch.bincount(val.labels, minlength=6).tolist() == [1, 1, 1, 1, 2, 2]
    assert torch.equal(val.seen, val.labels < 4)
    rows = xlsa.locs["test_seen_loc"] + xlsa.locs["test_unseen_loc"]
    expected = [xlsa.image_root / xlsa.relative[row] for row in rows]
    assert _paths(dm, "val") == _paths(dm, "test") == expected


def test_validation_never_reads_a_test_image(tmp_path):
    xlsa = write_xlsa(tmp_path, "SUN")
    leaked = next(row for row in xlsa.locs["test_seen_loc"] if xlsa.labels[row] in VAL)  # val_loc lists it too
    xlsa.save_splits(val_loc=np.array(xlsa.locs["val_loc"] + [leaked], dtype=float).reshape(-1, 1) + 1)
    for row in xlsa.rows_of("test_seen_loc", "test_unseen_loc"):
        (xlsa.image_root / xlsa.relative[row]).unlink()  # construction must not even look for them
    with pytest.warns(UserWarning, match="1 images of train_loc/val_loc are also in test_seen_loc"):
        dm = xlsa.module(augment=True)
    tests = {xlsa.image_root / xlsa.relative[row] for row in xlsa.rows_of("test_seen_loc", "test_unseen_loc")}
    for split in ("train", "val", "test"):
        assert not tests & set(_paths(dm, split))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert len(_all(loader)["label"]) > 0


# ------------------------------------------------------------------------------------------------ images
def test_foreign_absolute_paths_are_remapped_onto_image_root(xlsa):
    assert xlsa.files[0].startswith(PREFIXES[xlsa.dataset]) and not Path(xlsa.files[0]).exists()
    dm = xlsa.module()
    dataset = dm.dataset("val")
    row = xlsa.relative.index(str(dataset.images.paths[0].relative_to(xlsa.image_root)))
    assert dataset.images.paths[0] == xlsa.image_root / xlsa.relative[row]
    original = dm.original_image("val", 0)
    assert original.shape == (3, HEIGHT, WIDTH) and original.dtype == torch.uint8


def test_pixels_follow_labels(tmp_path):
    xlsa = write_xlsa(tmp_path, "AWA2")
    dm = xlsa.module(protocol="test")
    for split in ("train", "val"):
        batch = _all(dm.loader(split, sharded=False))
        assert batch["image"].shape[1:] == (3, 8, 8)
        for image, label in zip(batch["image"], batch["label"]):
            np.testing.assert_allclose(_colour(image), COLOURS[label], atol=3)


def test_found_images_are_reported(tmp_path, caplog):
    xlsa = write_xlsa(tmp_path, "CUB")
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            xlsa.module()
    finally:
        logger.removeHandler(caplog.handler)
    assert "found 16 of the 16 images of the protocol under image_root" in caplog.text


def test_missing_image_is_an_error_naming_the_first_and_skip_drops_it(tmp_path):
    xlsa = write_xlsa(tmp_path, "AWA2")
    gone = sorted(xlsa.locs["train_loc"])[:2]
    for row in gone:
        (xlsa.image_root / xlsa.relative[row]).unlink()
    first = gone[0]
    with pytest.raises(ValueError) as error:
        xlsa.module()
    message = str(error.value)
    for text in ("2 of 16 images are missing", xlsa.files[first], str(xlsa.image_root / xlsa.relative[first]),
                 "image_root", "JPEGImages", "on_bad_image: skip"):
        assert text in message
    with pytest.warns(UserWarning, match="2 of 16 images are missing"):
        dm = xlsa.module(on_bad_image="skip", holdout_fraction=0.0, batch_size=16)
    with pytest.warns(UserWarning, match="skipped a sample"):
        batches = list(dm.train_dataloader())
    assert sum(int(batch["skipped_images"]) for batch in batches) == 2
    assert sum(len(batch["label"]) for batch in batches) == 10


# ------------------------------------------------------------------------------------------------ CUB boxes
def test_cub_box_mask_covers_the_box_after_resize_and_crop(tmp_path):
    xlsa = write_xlsa(tmp_path, "CUB")
    size = 40  # shorter side 23 -> round(40 * 256 / 224) = 46: exactly twice, so nearest neighbour is exact
    dm = xlsa.module(cub_root=str(write_cub_root(xlsa, tmp_path)), image_size=size)
    batch = _all(dm.val_dataloader())
    scale, top, left = 2, (2 * HEIGHT - size) // 2, (2 * WIDTH - size) // 2
    x, y, w, h = map(int, BOX)
    rows = slice(max(scale * y - top, 0), min(scale * (y + h) - top, size))
    cols = slice(max(scale * x - left, 0), min(scale * (x + w) - left, size))
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[rows, cols] = True
    assert (rows.stop - rows.start) * (cols.stop - cols.start) == 18 * 24
    assert batch["mask"].shape == (7, size, size) and batch["mask"].dtype == torch.bool
    for mask in batch["mask"]:
        assert torch.equal(mask, expected)
    train = dm.dataset("train")[0]
    assert train["mask"].sum() == 18 * 24


def test_cub_bbox_crop_keeps_the_bird_only(tmp_path):
    xlsa = write_xlsa(tmp_path, "CUB")
    dm = xlsa.module(cub_root=str(write_cub_root(xlsa, tmp_path)), cub_bbox_crop=True)
    batch = _all(dm.val_dataloader())
    assert batch["mask"].all()
    for image in batch["image"]:
        np.testing.assert_allclose(_colour(image), [255, 255, 255], atol=12)
    assert dm.original_image("val", 0).shape == (3, 9, 12)


def test_cub_root_errors_name_the_file(tmp_path):
    xlsa = write_xlsa(tmp_path, "CUB")
    root = write_cub_root(xlsa, tmp_path)
    with pytest.raises(ValueError, match="cub_bbox_crop needs"):
        xlsa.module(cub_bbox_crop=True)
    lines = (root / "images.txt").read_text().splitlines()
    (root / "images.txt").write_text("\n".join(line for line in lines if xlsa.relative[0] not in line))
    with pytest.raises(ValueError, match="have no box in .*images.txt and bounding_boxes.txt"):
        xlsa.module(cub_root=str(root), protocol="test")
    (root / "bounding_boxes.txt").unlink()
    with pytest.raises(ValueError, match="bounding_boxes.txt not found"):
        xlsa.module(cub_root=str(root))


# ------------------------------------------------------------------------------------------------ names and groups
def test_cub_attribute_names_are_cleaned_and_grouped_by_prefix(tmp_path):
    xlsa = write_xlsa(tmp_path, "CUB")
    names = tmp_path / "attributes.txt"
    names.write_text("".join(f"{k + 1} {name}\n" for k, name in enumerate(CUB_NAMES)))
    task = xlsa.module(attribute_names=str(names)).task
    assert task.attribute_names == ("bill shape curved up or down", "bill shape all purpose", "wing color blue",
                                    "wing color brown", "upperparts color blue", "size small 5 9 in")
    assert task.extras["attribute_groups"] == ((0, 1), (2, 3), (4,), (5,))
    plain = xlsa.module().task
    assert plain.attribute_names == tuple(f"attribute {k}" for k in range(1, 7))
    assert plain.extras["attribute_groups"] == tuple((k,) for k in range(6))


def test_awa2_predicates_and_apn_groups(tmp_path):
    xlsa = write_xlsa(tmp_path, "AWA2")
    names = tmp_path / "predicates.txt"
    names.write_text("".join(f"{k + 1}\tpredicate_{k}\n" for k in range(85)))
    task = xlsa.module(attribute_names=str(names)).task
    assert task.attribute_names[:2] == ("predicate 0", "predicate 1")
    groups = task.extras["attribute_groups"]
    assert len(groups) == 9 and sorted(k for group in groups for k in group) == list(range(85))
    assert groups[0] == AWA2_GROUPS["color"] == tuple(range(8))


def test_sun_attribute_names_from_the_mat_file(tmp_path):
    xlsa = write_xlsa(tmp_path, "SUN")
    cells = np.empty((len(SUN_NAMES), 1), dtype=object)
    cells[:, 0] = SUN_NAMES
    scipy.io.savemat(tmp_path / "attributes.mat", {"attributes": cells})
    task = xlsa.module(attribute_names=str(tmp_path / "attributes.mat")).task
    assert task.attribute_names == ("sailing or boating", "direct sun or sunny", "man-made", "open area")
    assert task.extras["attribute_groups"] == ((0,), (1,), (2,), (3,))


def test_attribute_source_att(tmp_path):
    xlsa = write_xlsa(tmp_path, "SUN")
    torch.testing.assert_close(xlsa.module(attribute_source="att", protocol="test").task.attributes,
                               torch.tensor(xlsa.attributes.T, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ transforms
PIPELINES = {"CUB": ["SmallestMaxSize", "CenterCrop", "HorizontalFlip"], "AWA2": ["Resize"],
             "SUN": ["RandomResizedCrop", "HorizontalFlip"]}
"""SVIP's training pipelines, before normalisation."""


@pytest.mark.parametrize("dataset", ["CUB", "AWA2", "SUN"])
def test_training_pipeline_per_dataset_and_augment_false_evaluates(tmp_path, dataset):
    xlsa = write_xlsa(tmp_path, dataset)
    train = xlsa.module(augment=True).dataset("train")
    assert [type(step).__name__ for step in train.transform.transforms][:-2] == PIPELINES[dataset]
    assert train[(0, 7)]["image"].shape == (3, 8, 8)
    if dataset == "SUN":
        assert train.transform.transforms[0].scale == (0.08, 1.0)
    plain = xlsa.module(augment=False, image_size=14).dataset("train")
    image = read_rgb(plain.images.paths[0])
    expected = resize_crop_eval_transform(14)(image=image)["image"]
    assert torch.equal(plain[0]["image"], expected)
    assert resize_crop_eval_transform(14).transforms[0].max_size == 16


# ------------------------------------------------------------------------------------------------ errors
def _drop_res101(xlsa, tmp_path):
    (xlsa.split_root / "res101.mat").unlink()
    return {}


def _drop_val_loc(xlsa, tmp_path):
    xlsa.save_splits(drop=("val_loc",))
    return {}


def _misnamed_field(xlsa, tmp_path):
    fields = xlsa.split_fields()
    xlsa.save_splits(drop=("test_unseen_loc",), test_unseen=fields["test_unseen_loc"])
    return {}


def _att_wrong_shape(xlsa, tmp_path):
    xlsa.save_splits(original_att=np.ones((ATTRIBUTES["CUB"], 5)))
    return {}


def _labels_wrong_count(xlsa, tmp_path):
    xlsa.save_res101(labels=np.ones((3, 1)))
    return {}


def _label_out_of_range(xlsa, tmp_path):
    xlsa.save_res101(labels=(xlsa.labels.reshape(-1, 1) + 1.0) * 2)
    return {}


def _val_shares_a_train_class(xlsa, tmp_path):
    xlsa.save_splits(val_loc=np.array(xlsa.locs["val_loc"] + xlsa.locs["train_loc"][:1], dtype=float)[:, None] + 1)
    return {}


def _test_unseen_shares_a_trainval_class(xlsa, tmp_path):
    rows = xlsa.locs["test_unseen_loc"] + xlsa.locs["trainval_loc"][:1]
    xlsa.save_splits(test_unseen_loc=np.array(rows, dtype=float)[:, None] + 1)
    return {}


def _loc_out_of_range(xlsa, tmp_path):
    xlsa.save_splits(train_loc=np.array([[0.0], [1.0]]))
    return {}


def _names_count(xlsa, tmp_path):
    (tmp_path / "attributes.txt").write_text("1 has_bill_shape::dagger\n")
    return {"attribute_names": str(tmp_path / "attributes.txt")}


ERRORS = {
    "missing res101.mat": (_drop_res101, ["res101.mat", "not found"]),
    "missing field": (_drop_val_loc, ["att_splits.mat", "val_loc"]),
    "misnamed field": (_misnamed_field, ["att_splits.mat", "test_unseen_loc"]),
    "attribute matrix of the wrong shape": (_att_wrong_shape, ["att_splits.mat", "original_att", "(6, 5)", "[K, 6]"]),
    "labels of the wrong length": (_labels_wrong_count, ["res101.mat", "labels", "3 entries", "24"]),
    "label out of range": (_label_out_of_range, ["res101.mat", "labels", "from 1 to 6"]),
    "val_loc shares a train_loc class": (_val_shares_a_train_class, ["att_splits.mat", "train_loc", "val_loc",
                                                                     "disjoint"]),
    "test_unseen_loc shares a trainval class": (_test_unseen_shares_a_trainval_class,
                                                ["att_splits.mat", "trainval_loc", "test_unseen_loc"]),
    "0 in a 1-based field": (_loc_out_of_range, ["att_splits.mat", "train_loc", "1-based"]),
    "attribute names of another count": (_names_count, ["attribute_names", "attributes.txt", "1 attributes"]),
    "unknown protocol": (lambda xlsa, tmp: {"protocol": "final"}, ["protocol", "final"]),
    "cub_root on AwA2 images": (lambda xlsa, tmp: {"cub_root": str(tmp)}, ["cub_root", "CUB only"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_configuration_errors_name_the_file_and_field(tmp_path, case):
    make, expected = ERRORS[case]
    xlsa = write_xlsa(tmp_path, "CUB" if case != "cub_root on AwA2 images" else "AWA2")
    with pytest.raises(ValueError) as error:
        xlsa.module(**make(xlsa, tmp_path))
    for text in ["XianDataModule(dataset=", *expected]:
        assert text in str(error.value)


def test_paths_of_another_dataset_are_refused(tmp_path):
    xlsa = write_xlsa(tmp_path, "CUB")
    with pytest.raises(ValueError, match=r"has no 'JPEGImages/' in it.*dataset='AWA2'"):
        XianDataModule("AWA2", str(xlsa.split_root), str(xlsa.image_root), num_workers=0)
