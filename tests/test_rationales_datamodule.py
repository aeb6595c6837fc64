"""DRORDataModule and RationaleFolderDataModule: normalisation, the category–rationale table, batches, the stratified
validation hold-out, the test split, the CSV form and errors that name the folder, file and line.

Fixtures are tiny copies of DROR's layout, ``<split>/<category>/<rationale>/<query index>/.../<image>``: JPEGs of
odd, non-square sizes in one uniform colour per (category, rationale) folder (so a sample's pixels tell its folder),
and a rationale JSON with GPT's ``"- "`` bullets, ``_``/``-``/``/`` in names, a class without rationales, rationales
shared by two classes, a duplicate, a ``__`` folder standing for ``/`` and a ``/`` rationale split over two folders.
"""

import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules import DRORDataModule, RationaleFolderDataModule  # noqa: E402
from datamodules.loading import BadImageError  # noqa: E402
from datamodules.rationales import folder_key, normalise_rationale, stratified_hold_out  # noqa: E402
from datamodules.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*have no rationales")

RATIONALES = {
    "sea_lion": ["- flippers", "- whiskers", "- wet-looking skin"],
    "Cat": ["- four legs", "- Whiskers", "- black/white fur", "- pointed_ears", "- four legs"],
    "unicorn": [],
    "deer": ["- four legs", "- antlers/horns"],
}
"""The rationale file: ``unicorn`` has none; ``whiskers`` and ``four legs`` are shared; Cat has ``four legs`` twice."""
CLASSES = ("sea lion", "cat", "deer")
VOCAB = ("antlers or horns", "black or white fur", "flippers", "four legs", "pointed ears", "wet looking skin",
         "whiskers")
FOLDERS = {
    "train": [
        ("sea_lion", "flippers/0", "flippers", 10),
        ("sea_lion", "whiskers/1", "whiskers", 3),
        ("sea_lion", "wet-looking_skin/0", "wet looking skin", 2),
        ("Cat", "four_legs/0", "four legs", 6),
        ("Cat", "four_legs/1/deeper", "four legs", 6),
        ("Cat", "black__white_fur/0", "black or white fur", 3),
        ("Cat", "Pointed Ears/2", "pointed ears", 2),
        ("Cat", "Whiskers/0", "whiskers", 1),
        ("deer", "antlers/horns/0", "antlers or horns", 10),
        ("deer", "four-legs/0", "four legs", 2),
        ("unicorn", "horn/0", None, 2),
    ],
    "test": [
        ("sea_lion", "flippers/0", "flippers", 2),
        ("Cat", "black__white_fur/3", "black or white fur", 1),
        ("Cat", "four_legs/0", "four legs", 2),
        ("deer", "antlers/horns/1", "antlers or horns", 2),
    ],
}
"""Per split: category folder, path below it, the rationale it stands for (None: not read) and the image count."""
SIZES = ((13, 9), (9, 17), (11, 7))
"""Odd ``(height, width)`` of the JPEGs, cycled."""


def _colour(label: int, rationale: int) -> tuple[int, int, int]:
    """A colour per (class, rationale), far from the others."""
    return (30 + 70 * label, 20 + 30 * rationale, 230 - 25 * rationale)


@dataclass
class Tree:
    """A DROR fixture: where things are and what each image file should become."""

    root: Path
    json: Path
    truth: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """Per split, ``{path: (label, rationale index)}`` of every image that should be read."""

    def module(self, **kwargs) -> DRORDataModule:
        kwargs = dict(image_size=8, batch_size=4, num_workers=0, augment=False) | kwargs
        return DRORDataModule(str(self.root), str(self.json), **kwargs)


def _jpeg(path: Path, colour, size) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), colour, dtype=np.uint8)).save(path, quality=95)


def write_dror(folder: Path) -> Tree:
    """The DROR fixture under ``folder`` (see the module docstring)."""
    tree = Tree(folder / "cifar_dr", folder / "toy_text.json")
    tree.json.write_text(json.dumps(RATIONALES, indent=4))
    k = 0
    for split, entries in FOLDERS.items():
        tree.truth[split] = {}
        for category, below, rationale, count in entries:
            label = CLASSES.index(normalise_rationale(category)) if rationale else 0
            r = VOCAB.index(rationale) if rationale else 0
            for n in range(count):
                path = tree.root / split / category / below / f"img_{n}.jpg"
                _jpeg(path, _colour(label, r), SIZES[k % len(SIZES)])
                k += 1
                if rationale:
                    tree.truth[split][str(path)] = (label, r)
    (tree.root / "train" / "Cat" / "four_legs" / "0" / "notes.txt").write_text("not an image")
    return tree


@pytest.fixture(scope="module")
def dror(tmp_path_factory) -> Tree:
    return write_dror(tmp_path_factory.mktemp("dror"))


def _mean_colour(image: torch.Tensor) -> np.ndarray:
    pixels = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    return pixels.reshape(-1, 3).mean(0) * 255


def _check_split(dm, split: str, truth: dict[str, tuple[int, int]]) -> list[str]:
    """Every batch of ``split`` against the file each sample came from; returns the split's paths."""
    dataset = dm.dataset(split)
    paths = [str(path) for path in dataset.images.paths]
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    seen = []
    for batch in loader:
        assert batch["rationale"].dtype == torch.long and batch["rationales"].dtype == torch.bool
        assert batch["rationales"].shape == (len(batch["label"]), len(VOCAB))
        for k, index in enumerate(batch["index"].tolist()):
            label, rationale = truth[paths[index]]
            assert (batch["label"][k], batch["rationale"][k]) == (label, rationale), paths[index]
            assert torch.equal(batch["rationales"][k], torch.nn.functional.one_hot(torch.tensor(rationale),
                                                                                   len(VOCAB)).bool())
            np.testing.assert_allclose(_mean_colour(batch["image"][k]), _colour(label, rationale), atol=4)
            seen.append(index)
    assert sorted(seen) == list(range(len(paths))) and batch["seen"].all()
    return paths


# ------------------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("raw, normal", [
    ("- Black/White_fur", "black or white fur"),
    ("  a large,  four-legged\tmammal ", "a large, four legged mammal"),
    ("antlers (on male deer)", "antlers (on male deer)"),
    ("sea_lion", "sea lion"),
])
def test_normalise_rationale(raw, normal):
    assert normalise_rationale(raw) == normal


def test_folder_names_read_double_underscore_as_slash():
    assert folder_key("apartment_building__outdoor") == normalise_rationale("apartment_building/outdoor")
    assert folder_key("Sea_Lion") == folder_key("sea-lion") == "sea lion"


# ------------------------------------------------------------------------------------------------ label space
def test_task_holds_the_normalised_table_without_empty_classes(dror):
    with pytest.warns(UserWarning, match=r"1 classes of .*toy_text.json have no rationales .*\['unicorn'\]"):
        task = dror.module().task
    assert task.class_names == CLASSES and task.seen == (0, 1, 2) and task.unseen == ()
    assert task.rationale_vocab == VOCAB
    assert task.rationales == {"sea lion": ["flippers", "whiskers", "wet looking skin"],
                               "cat": ["four legs", "whiskers", "black or white fur", "pointed ears"],
                               "deer": ["four legs", "antlers or horns"]}
    assert task.descriptors == task.rationales
    table = task.extras["rationale_table"]
    assert table.dtype == torch.bool and table.shape == (3, len(VOCAB))
    for c, name in enumerate(CLASSES):
        assert {VOCAB[r] for r in torch.nonzero(table[c]).flatten().tolist()} == set(task.rationales[name])
    assert table[:, VOCAB.index("four legs")].tolist() == [False, True, True]
    assert task.extras["excluded_classes"] == ("unicorn",)
    assert task.extras["raw_class_names"] == ("sea_lion", "Cat", "deer")


def test_batches_carry_the_label_and_rationale_of_their_folder(dror):
    dm = dror.module()
    dm.setup("fit")
    train = _check_split(dm, "train", dror.truth["train"])
    val = _check_split(dm, "val", dror.truth["train"])
    assert all("unicorn" not in path and path.endswith(".jpg") for path in train + val)
    by_label_then_path = sorted(dror.truth["test"], key=lambda path: (dror.truth["test"][path][0], path))
    assert _check_split(dm, "test", dror.truth["test"]) == by_label_then_path


def test_validation_is_a_seeded_tenth_of_every_category_and_rationale(dror):
    dm = dror.module()
    train, val = ([str(p) for p in dm.dataset(split).images.paths] for split in ("train", "val"))
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(dror.truth["train"])
    groups = {}
    for path in train + val:
        groups.setdefault(dror.truth["train"][path], []).append(path in val)
    for group, held in groups.items():
        assert sum(held) == min(int(0.1 * len(held) + 0.5), len(held) - 1), group
        assert sum(held) >= 1 or len(held) < 10
    assert len(val) == 3  # the three groups of 10-12 images
    again = [str(p) for p in dror.module().dataset("val").images.paths]
    others = [[str(p) for p in dror.module(seed=seed).dataset("val").images.paths] for seed in (1, 2, 3)]
    assert again == val and any(other != val for other in others)
    larger = dror.module(val_fraction=0.5).dataset("val")
    assert len(larger) == 5 + 2 + 1 + 6 + 2 + 1 + 0 + 5 + 1  # half rounded up, and one image kept per group


def test_stratified_hold_out_keeps_a_training_sample_of_every_group():
    groups = [(0, 0)] * 20 + [(0, 1)] * 2 + [(1, 0)]
    train, val = stratified_hold_out(groups, 0.9, seed=0)
    assert sorted(train + val) == list(range(23))
    assert [groups[p] for p in val].count((0, 0)) == 18 and [groups[p] for p in val].count((0, 1)) == 1
    assert 22 in train


def test_test_split_reads_the_test_folder_and_serves_original_images(dror):
    dm = dror.module()
    dm.setup("test")
    assert set(dm.datasets) == {"test"}
    paths = [str(p) for p in dm.dataset("test").images.paths]
    assert set(paths) == set(dror.truth["test"])
    for index in (0, 3):
        width, height = Image.open(paths[index]).size
        assert dm.original_image("test", index).shape == (3, height, width)


def test_a_test_only_run_needs_no_training_folder(tmp_path):
    tree = write_dror(tmp_path)
    os.rename(tree.root / "train", tmp_path / "elsewhere")
    dm = tree.module()
    dm.setup("test")
    assert len(dm.dataset("test")) == 7
    with pytest.raises(ValueError, match=r"split folder .*cifar_dr/train not found"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------ errors
def _unknown_rationale_folder(tree: Tree):
    _jpeg(tree.root / "train" / "Cat" / "whisker" / "0" / "a.jpg", (1, 2, 3), (9, 7))
    return [f"rationale folder {tree.root / 'train' / 'Cat' / 'whisker'}", str(tree.json), "class 'cat'",
            "close matches: ['whiskers']"]


def _unknown_class_folder(tree: Tree):
    _jpeg(tree.root / "test" / "Zebra" / "stripes" / "0" / "a.jpg", (1, 2, 3), (9, 7))
    return [f"category folder {tree.root / 'test' / 'Zebra'}", "'zebra'", str(tree.json)]


def _image_in_category_folder(tree: Tree):
    _jpeg(tree.root / "train" / "deer" / "loose.jpg", (1, 2, 3), (9, 7))
    return [str(tree.root / "train" / "deer"), "loose.jpg", "<category>/<rationale>"]


def _rewrite_json(content):
    def write(tree: Tree):
        tree.json.write_text(json.dumps(content) if not isinstance(content, str) else content)
        return [str(tree.json)]
    return write


def _entry_not_a_list(tree: Tree):
    return _rewrite_json({"Cat": "- four legs", "deer": ["- hooves"]})(tree) + ["entry 'Cat' is a str"]


def _entry_with_a_number(tree: Tree):
    return _rewrite_json({"deer": ["- hooves"], "Cat": ["- four legs", 4]})(tree) + ["entry 'Cat'", "positions [1]"]


def _json_missing(tree: Tree):
    tree.json.unlink()
    return [str(tree.json), "not found"]


def _two_keys_one_class(tree: Tree):
    return _rewrite_json({"sea_lion": ["- flippers"], "Sea-Lion": ["- fins"]})(tree) + ["'sea_lion'", "'Sea-Lion'"]


ERRORS = {
    "rationale folder not in the JSON": _unknown_rationale_folder,
    "class folder not in the JSON": _unknown_class_folder,
    "image directly in a category folder": _image_in_category_folder,
    "JSON is a list": lambda tree: _rewrite_json([["Cat", "four legs"]])(tree) + ["holds a list", "{\"class\""],
    "JSON entry not a list": _entry_not_a_list,
    "JSON entry holds a number": _entry_with_a_number,
    "JSON not JSON": lambda tree: _rewrite_json("{'Cat': [")(tree) + ["not valid JSON"],
    "JSON keys that read the same": _two_keys_one_class,
    "JSON missing": _json_missing,
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_inputs_are_named_with_a_fix(tmp_path, case):
    tree = write_dror(tmp_path)
    expected = ERRORS[case](tree)
    with pytest.raises(ValueError) as error:
        tree.module().setup(None)
    for text in ["DRORDataModule(root=", *expected]:
        assert text in str(error.value), str(error.value)


def test_bad_options_are_refused(dror):
    for option, text in (({"val_fraction": 0.0}, "val_fraction=0.0"), ({"on_bad_image": "drop"}, "'drop'"),
                         ({"seed": -1}, "seed=-1")):
        with pytest.raises(ValueError, match=text):
            dror.module(**option)


@pytest.mark.filterwarnings("ignore:skipped a sample")
def test_truncated_image_follows_the_bad_image_policy(tmp_path):
    tree = write_dror(tmp_path)
    path = sorted(tree.truth["test"])[1]
    Path(path).write_bytes(Path(path).read_bytes()[:150])
    with pytest.raises(BadImageError, match=f"{path}: it is truncated"):
        list(tree.module().test_dataloader())
    with pytest.warns(UserWarning, match=f"skipped a sample.*{path}"):
        batches = list(tree.module(on_bad_image="skip").test_dataloader())
    assert sum(int(batch["skipped_images"]) for batch in batches) == 1
    assert sum(len(batch["label"]) for batch in batches) == len(tree.truth["test"]) - 1
    assert all(batch["rationales"].shape[0] == len(batch["rationale"]) for batch in batches)


# ------------------------------------------------------------------------------------------------ the CSV form
def _csv(path: Path, rows: list[tuple[str, str, str]], header: str = "path,category,rationale") -> str:
    path.write_text("\n".join([header, *(",".join(f'"{v}"' for v in row) for row in rows)]) + "\n")
    return str(path)


def _rows(tree: Tree, split: str) -> list[tuple[str, str, str]]:
    """CSV rows of a split's images: the category and rationale spelled as in the JSON file (bullets and all)."""
    raw = {normalise_rationale(key): key for key in RATIONALES}
    rows = []
    for path, (label, rationale) in tree.truth[split].items():
        listed = RATIONALES[raw[CLASSES[label]]]
        spelled = next(text for text in listed if normalise_rationale(text) == VOCAB[rationale])
        rows.append((str(Path(path).relative_to(tree.root)), raw[CLASSES[label]], spelled))
    return rows


def _csv_module(tree: Tree, **kwargs) -> RationaleFolderDataModule:
    kwargs = dict(image_size=8, batch_size=4, num_workers=0, augment=False) | kwargs
    return RationaleFolderDataModule(str(tree.root), str(tree.json), **kwargs)


def test_csv_form_reads_its_files_with_the_same_contract(tmp_path):
    tree = write_dror(tmp_path)
    train_csv = _csv(tmp_path / "train.csv", _rows(tree, "train"))
    test_rows = [(path, category.upper().replace("_", " "), rationale.upper())
                 for path, category, rationale in _rows(tree, "test")]
    test_csv = _csv(tmp_path / "test.csv", test_rows)
    dm = _csv_module(tree, train_csv=train_csv, test_csv=test_csv)
    assert dm.task.class_names == CLASSES and dm.task.rationale_vocab == VOCAB
    dm.setup(None)
    train, val = (_check_split(dm, split, tree.truth["train"]) for split in ("train", "val"))
    assert len(val) == 3 and set(train) | set(val) == set(tree.truth["train"])
    assert _check_split(dm, "test", tree.truth["test"]) == [str(tree.root / row[0]) for row in test_rows]
    explicit = _csv_module(tree, train_csv=train_csv, val_csv=test_csv, test_csv=test_csv)
    assert len(explicit.dataset("train")) == len(tree.truth["train"])
    assert len(explicit.dataset("val")) == len(test_rows)
    with pytest.raises(ValueError, match="needs train_csv"):
        _csv_module(tree, test_csv=test_csv).setup("fit")


def _csv_case(row: tuple[str, str, str] | None = None, header: str = "path,category,rationale"):
    """A CSV error case: the test rows with ``row`` appended as line 9 (after the header and 7 rows)."""
    def make(tree: Tree, folder: Path) -> str:
        rows = _rows(tree, "test") + ([row] if row else [])
        return _csv(folder / "test.csv", rows, header)
    return make


CSV_ERRORS = {
    "unknown category": (_csv_case(("test/x.jpg", "zebra", "stripes")), ValueError,
                         ["test.csv: line 9", "'zebra'", "toy_text.json"]),
    "rationale not of its category": (_csv_case(("test/Cat/four_legs/0/img_0.jpg", "deer", "whiskers")), ValueError,
                                      ["test.csv: line 9", "'whiskers'", "class 'deer'", "toy_text.json"]),
    "category without rationales": (_csv_case(("test/x.jpg", "unicorn", "horn")), ValueError,
                                    ["test.csv: line 9", "'unicorn'", "no rationales"]),
    "empty field": (_csv_case(("test/x.jpg", "deer", " ")), ValueError, ["test.csv: line 9", "['rationale']"]),
    "missing image": (_csv_case(("test/gone.jpg", "deer", "four legs")), FileNotFoundError,
                      ["test.csv: line 9", "gone.jpg", "on_bad_image: skip"]),
    "missing column": (_csv_case(header="file,category,rationale"), ValueError, ["test.csv: line 1", "['path']"]),
}


@pytest.mark.parametrize("case", CSV_ERRORS)
def test_csv_errors_name_the_file_and_line(tmp_path, case):
    make, kind, expected = CSV_ERRORS[case]
    tree = write_dror(tmp_path)
    test_csv = make(tree, tmp_path)
    with pytest.raises(kind) as error:
        _csv_module(tree, test_csv=test_csv).setup("test")
    for text in ["RationaleFolderDataModule(root=", *expected]:
        assert text in str(error.value), str(error.value)
