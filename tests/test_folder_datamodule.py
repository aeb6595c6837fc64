"""ImageFolderDataModule: class order and names, side-information files, unseen classes, pixels, errors."""

import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ImageFolderDataModule
from datamodules.transforms import CLIP_MEAN, CLIP_STD

COLOURS = {"sea_lion": (200, 30, 40), "ant": (20, 160, 60), "Zebra": (30, 50, 220)}
"""One uniform colour per class folder, so every image tells which folder it came from."""
SORTED_FOLDERS = ("Zebra", "ant", "sea_lion")
"""Code-point order: upper case sorts first."""
COUNTS = {"train": 3, "val": 2}


def _write(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _uniform(colour, height: int = 12, width: int = 12) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, 3)).copy()


def write_image_tree(root, colours=COLOURS, counts=COUNTS):
    """``root/<split>/<folder>/<k>.png`` uniform images of each folder's colour, plus files that are not images."""
    for split, count in counts.items():
        for folder, colour in colours.items():
            for k in range(count):
                _write(root / split / folder / f"{k}.png", _uniform(colour))
            (root / split / folder / "notes.txt").write_text("not an image")
    return root


def _colour(image: torch.Tensor) -> np.ndarray:
    """Mean RGB in 0..255 of a CLIP-normalised ``[3, H, W]`` image."""
    pixels = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    return pixels.reshape(-1, 3).mean(0) * 255


def _all(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def _module(root, **kwargs) -> ImageFolderDataModule:
    kwargs = dict(image_size=8, batch_size=4, num_workers=0, augment=False) | kwargs
    return ImageFolderDataModule(str(root), **kwargs)


# ------------------------------------------------------------------------------------------------ labels and pixels
def test_labels_follow_sorted_folders_and_names_drop_underscores(tmp_path):
    root = write_image_tree(tmp_path)
    _write(root / "val" / "ant" / "nested" / "UPPER.PNG", _uniform(COLOURS["ant"]))
    dm = _module(root)
    assert dm.task.class_names == ("Zebra", "ant", "sea lion")
    assert dm.task.seen == (0, 1, 2) and dm.task.unseen == ()
    val = _all(dm.val_dataloader())
    assert val["image"].shape == (7, 3, 8, 8) and val["image"].dtype == torch.float32
    assert val["label"].dtype == torch.long and val["seen"].dtype == torch.bool
    assert torch.equal(val["index"], torch.arange(7)) and val["seen"].all()
    assert torch.bincount(val["label"]).tolist() == [2, 3, 2]
    for image, label in zip(val["image"], val["label"]):
        np.testing.assert_allclose(_colour(image), COLOURS[SORTED_FOLDERS[label]], atol=0.5)


def test_class_name_map_renames_folders_in_folder_order(tmp_path):
    colours = {"n02": (250, 0, 0), "n01": (0, 250, 0), "n03": (0, 0, 250)}
    root = write_image_tree(tmp_path / "data", colours)
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n03": "great_white shark", "n02": "goldfish", "n01": "tench", "n99": "other"}))
    dm = _module(root, class_names=str(mapping))
    assert dm.task.class_names == ("tench", "goldfish", "great_white shark")
    train = _all(dm.train_dataloader())
    for image, label in zip(train["image"], train["label"]):
        np.testing.assert_allclose(_colour(image), colours[f"n0{label + 1}"], atol=0.5)


def test_descriptors_of_the_dataset_classes_reach_the_task(tmp_path):
    root = write_image_tree(tmp_path / "data")
    table = {"sea lion": ["which has flippers"], "ant": ["which has six legs", "which is small"],
             "Zebra": ["which has stripes"], "bee": ["which has wings"]}
    (tmp_path / "descriptors.json").write_text(json.dumps(table))
    dm = _module(root, descriptors=str(tmp_path / "descriptors.json"))
    assert dm.task.descriptors == {name: table[name] for name in ("Zebra", "ant", "sea lion")}
    assert _module(root).task.descriptors is None


CUB_FOLDERS = {"001.Black_footed_Albatross": "Black-footed Albatross", "009.Brewer_Blackbird": "Brewer's Blackbird",
               "107.Common_Raven": "Common Raven", "022.Chuck_will_Widow": "Chuck-will's-widow"}
"""Folders of CUB-200-2011 and the keys of DCLIP's descriptor file for them."""


def test_cub_folders_take_the_descriptor_files_names(tmp_path):
    colours = {folder: (10 * k, 100, 200) for k, folder in enumerate(CUB_FOLDERS)}
    root = write_image_tree(tmp_path / "cub", colours=colours)
    table = {key: [f"which is a {key.lower()}"] for key in CUB_FOLDERS.values()} | {"Laysan Albatross": ["white"]}
    (tmp_path / "descriptors.json").write_text(json.dumps(table))
    (tmp_path / "unseen.txt").write_text("022.Chuck_will_Widow\n")
    dm = _module(root, descriptors=str(tmp_path / "descriptors.json"), unseen_classes=str(tmp_path / "unseen.txt"))
    expected = tuple(CUB_FOLDERS[folder] for folder in sorted(CUB_FOLDERS))
    assert dm.task.class_names == expected
    assert dm.task.descriptors == {key: table[key] for key in expected}
    assert [dm.task.class_names[c] for c in dm.task.unseen] == ["Chuck-will's-widow"]
    assert _module(root).task.class_names == ("Black footed Albatross", "Brewer Blackbird", "Chuck will Widow",
                                              "Common Raven")


def test_descriptor_keys_that_spell_one_class_twice_are_refused(tmp_path):
    root = write_image_tree(tmp_path / "data")
    table = {"sea-lion": ["which has flippers"], "Sea Lion": ["which barks"], "ant": ["small"], "Zebra": ["striped"]}
    (tmp_path / "descriptors.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"descriptors file .*descriptors.json has several keys for the classes "
                                         r"\{'sea lion': \['sea-lion', 'Sea Lion'\]\}"):
        _module(root, descriptors=str(tmp_path / "descriptors.json"))


def _unseen_spec(tmp_path, form: str):
    if form == "readable":
        return ["sea lion", "Zebra"]
    if form == "folders":
        return ["sea_lion", "Zebra"]
    if form == "text":
        (tmp_path / "unseen.txt").write_text("# held out\nsea lion\n\nZebra\n")
        return str(tmp_path / "unseen.txt")
    (tmp_path / "unseen.json").write_text(json.dumps(["sea_lion", "Zebra"]))
    return str(tmp_path / "unseen.json")


@pytest.mark.parametrize("form", ["readable", "folders", "text", "json"])
def test_unseen_classes_leave_train_and_stay_in_val_flagged(tmp_path, form):
    root = write_image_tree(tmp_path / "data")
    dm = _module(root, unseen_classes=_unseen_spec(tmp_path, form), test_split=None)
    assert dm.task.seen == (1,) and dm.task.unseen == (0, 2)
    train = _all(dm.train_dataloader())
    assert train["label"].tolist() == [1, 1, 1] and train["seen"].all()
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        evaluation = _all(loader)
        assert sorted(evaluation["label"].tolist()) == [0, 0, 1, 1, 2, 2]
        assert torch.equal(evaluation["seen"], evaluation["label"] == 1)


def test_test_split_reads_its_own_folder_only_when_named(tmp_path):
    root = write_image_tree(tmp_path, counts={"train": 1, "val": 1, "test": 2})
    assert len(_all(_module(root).test_dataloader())["label"]) == 3
    assert len(_all(_module(root, test_split="test").test_dataloader())["label"]) == 6


def test_eval_resizes_the_shorter_side_and_keeps_the_centre(tmp_path):
    root = write_image_tree(tmp_path, counts={"train": 1})
    strip = np.concatenate([_uniform(colour, 16, 16) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))], axis=1)
    _write(root / "val" / "ant" / "strip.png", strip)
    image = _module(root).val_dataloader().dataset[0]["image"]
    assert image.shape == (3, 8, 8)
    pixels = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    np.testing.assert_allclose(pixels * 255, np.broadcast_to([0, 255, 0], (8, 8, 3)), atol=0.5)


def test_train_augmentation_follows_torch_seed(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (20, 16, 3), dtype=np.uint8)
    for split in ("train", "val"):
        _write(tmp_path / split / "ant" / "noise.png", noise)
    dataset = _module(tmp_path, augment=True).train_dataloader().dataset

    def drawn(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return dataset[0]["image"]

    assert drawn(0).shape == (3, 8, 8)
    assert torch.equal(drawn(0), drawn(0))
    assert not torch.equal(drawn(0), drawn(1))
    plain = _module(tmp_path, augment=False)
    assert torch.equal(plain.train_dataloader().dataset[0]["image"], plain.val_dataloader().dataset[0]["image"])


def test_train_loader_shuffles_and_eval_loaders_keep_order(tmp_path):
    dm = _module(write_image_tree(tmp_path), batch_size=2)
    train, val = dm.train_dataloader().sampler, dm.val_dataloader().sampler
    assert train.shuffle and train.keyed and sorted(index for index, _ in train) == list(range(len(train.dataset)))
    assert not val.shuffle and list(val) == list(range(len(val.dataset)))
    assert dm.val_dataloader().batch_size == 2


# ------------------------------------------------------------------------------------------------ errors
def _extra_val_class(root, tmp_path):
    _write(root / "val" / "bat" / "0.png", _uniform((1, 2, 3)))
    return {}


def _map_missing(root, tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({"ant": "ant"}))
    return {"class_names": str(tmp_path / "names.json")}


def _descriptors_missing(root, tmp_path):
    (tmp_path / "descriptors.json").write_text(json.dumps({"ant": ["which is small"]}))
    return {"descriptors": str(tmp_path / "descriptors.json")}


def _descriptors_not_lists(root, tmp_path):
    (tmp_path / "descriptors.json").write_text(json.dumps({"ant": "small"}))
    return {"descriptors": str(tmp_path / "descriptors.json")}


def _bad_json(root, tmp_path):
    (tmp_path / "names.json").write_text("{ant: ant")
    return {"class_names": str(tmp_path / "names.json")}


ERRORS = {
    "missing train split": (lambda root, tmp: {"train_split": "training"}, ["train_split", "training", "not found"]),
    "missing test split": (lambda root, tmp: {"test_split": "test"}, ["test_split", "test", "not found"]),
    "val class not in train": (_extra_val_class, ["bat", "val", "train"]),
    "class name map lacks folders": (_map_missing, ["class_names", "names.json", "Zebra", "sea_lion"]),
    "class name map not found": (lambda root, tmp: {"class_names": str(tmp / "none.json")}, ["class_names",
                                                                                           "none.json"]),
    "class name map not JSON": (_bad_json, ["class_names", "names.json", "JSON"]),
    "descriptors lack classes": (_descriptors_missing, ["descriptors", "descriptors.json", "Zebra", "sea lion"]),
    "descriptors not lists": (_descriptors_not_lists, ["descriptors", "descriptors.json", "phrases"]),
    "unknown unseen class": (lambda root, tmp: {"unseen_classes": ["ant", "bee"]}, ["unseen_classes", "bee"]),
    "unseen file not found": (lambda root, tmp: {"unseen_classes": str(tmp / "nope.txt")}, ["unseen_classes",
                                                                                          "nope.txt"]),
    "every class unseen": (lambda root, tmp: {"unseen_classes": ["ant", "Zebra", "sea lion"]}, ["unseen_classes"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_configuration_errors_name_the_option_and_file(tmp_path, case):
    make, expected = ERRORS[case]
    root = write_image_tree(tmp_path / "data")
    with pytest.raises(ValueError) as error:
        _module(root, **make(root, tmp_path))
    for text in ["ImageFolderDataModule(root=", *expected]:
        assert text in str(error.value)


def test_missing_root_and_seen_class_without_images_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"split folder .*missing.*train.* not found.*root/<train_split>/<class>"):
        _module(tmp_path / "missing")
    root = write_image_tree(tmp_path / "data")
    for path in (root / "train" / "ant").glob("*.png"):
        path.unlink()
    dm = _module(root)
    with pytest.raises(ValueError, match=r"\['ant'\].*no images.*unseen_classes"):
        dm.setup("fit")
    assert _module(root, unseen_classes=["ant"]).train_dataloader().dataset.labels.tolist() == [0, 0, 0, 2, 2, 2]
