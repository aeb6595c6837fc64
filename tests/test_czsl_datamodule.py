"""CZSLDataModule: the "compositional-split-natural" files of MIT-States, UT-Zappos and C-GQA, label space, record
selection, batches, feasibility, pickle refusal, augmentation of non-square photos and errors.

Fixtures are tiny copies of the real layout: ``images/<attr>_<obj>/<k>.jpg`` JPEGs of odd, non-square sizes, one
uniform colour per pair (so a sample's pixels tell its pair), pair files with multi-word tokens (UT-Zappos
``Faux.Fur``, C-GQA ``traffic_light``) and a ``torch.save``\\ d list of metadata dicts holding NA records, pairs in no
pair file and UT-Zappos' ``_image`` field.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dataclasses import dataclass, field  # noqa: E402
from itertools import product  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules import CZSLDataModule  # noqa: E402
from datamodules.czsl import czsl_eval_transform, czsl_train_transform  # noqa: E402
from datamodules.loading import BadImageError  # noqa: E402
from datamodules.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402

SPLIT = "compositional-split-natural"
STATES = ("Faux.Fur", "broken", "old", "wet")
"""Raw state tokens in sorted (code-point) order; ``broken`` appears in test_pairs.txt only."""
OBJECTS = ("boot", "dog", "traffic_light")
PAIRS = {
    "train": [("old", "boot"), ("old", "dog"), ("wet", "dog"), ("Faux.Fur", "boot"), ("wet", "traffic_light")],
    "val": [("old", "boot"), ("wet", "boot"), ("Faux.Fur", "dog")],
    "test": [("old", "dog"), ("old", "traffic_light"), ("broken", "dog")],
}
"""The pair files, in file order; labels are ``state index * 3 + object index``."""
SIZES = ((23, 37), (41, 19), (31, 45))
"""Odd ``(height, width)`` of the JPEGs, cycled over the records."""


def _label(state: str, obj: str) -> int:
    return STATES.index(state) * len(OBJECTS) + OBJECTS.index(obj)


def _colour(label: int) -> tuple[int, int, int]:
    """A colour per pair label, far from the others."""
    return (20 + 19 * label, 230 - 17 * label, 60 + 90 * (label % 3))


@dataclass
class Record:
    """A metadata record of the fixture and where it should end up: a split, or None when it is dropped."""

    image: str
    attr: str
    obj: str
    set: str
    expected: str | None
    extra: dict = field(default_factory=dict)

    def entry(self) -> dict:
        return {"image": self.image, "attr": self.attr, "obj": self.obj, "set": self.set} | self.extra


def _records() -> list[Record]:
    """Two images per pair of each pair file, in interleaved order, plus the records the reference drops and a test
    image of a train pair that test_pairs.txt does not list (kept, as the reference keeps it)."""
    records = []
    for k in range(2):
        for split, pairs in PAIRS.items():
            records += [Record(f"{s}_{o}/{split}_{k}.jpg", s, o, split, split) for s, o in pairs]
    records.insert(3, Record("old_boot/na_attr.jpg", "NA", "boot", "train", None))
    records.insert(7, Record("old_dog/na_set.jpg", "old", "dog", "NA", None))
    records.insert(11, Record("broken_boot/0.jpg", "broken", "boot", "test", None))  # pair in no pair file
    records.insert(13, Record("old_cat/0.jpg", "old", "cat", "val", None))  # object in no pair file
    records.append(Record("wet_dog/test_extra.jpg", "wet", "dog", "test", "test", {"_image": "orig/wet_dog.jpg"}))
    return records


@dataclass
class Fixture:
    """A written dataset folder: ``root`` and its ``records`` (metadata order)."""

    root: Path
    records: list[Record]

    @property
    def metadata(self) -> Path:
        return self.root / f"metadata_{SPLIT}.t7"

    def pair_file(self, split: str) -> Path:
        return self.root / SPLIT / f"{split}_pairs.txt"

    def save_metadata(self, entries: list | None = None) -> None:
        torch.save([record.entry() for record in self.records] if entries is None else entries, self.metadata)

    def expected(self, split: str) -> list[int]:
        """Metadata indices of the records ``split`` reads."""
        return [i for i, record in enumerate(self.records) if record.expected == split]

    def module(self, **kwargs) -> CZSLDataModule:
        kwargs = dict(image_size=16, batch_size=4, num_workers=0, augment=False) | kwargs
        return CZSLDataModule(str(self.root), **kwargs)


def _write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100)


def write_czsl(root: Path) -> Fixture:
    """The CZSL layout under ``root``: images of the kept records, pair files and the metadata file."""
    fixture = Fixture(root, _records())
    for k, record in enumerate(r for r in fixture.records if r.expected):
        height, width = SIZES[k % len(SIZES)]
        colour = np.array(_colour(_label(record.attr, record.obj)), dtype=np.uint8)
        _write_jpeg(root / "images" / record.image, np.broadcast_to(colour, (height, width, 3)).copy())
    for split, pairs in PAIRS.items():
        fixture.pair_file(split).parent.mkdir(parents=True, exist_ok=True)
        fixture.pair_file(split).write_text("".join(f"{s} {o}\n" for s, o in pairs) + "\n")
    fixture.save_metadata()
    return fixture


@pytest.fixture
def czsl(tmp_path) -> Fixture:
    return write_czsl(tmp_path / "mit-states")


def _all(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {key: torch.cat([batch[key].reshape(-1) if batch[key].ndim == 0 else batch[key] for batch in batches])
            for key in batches[0]}


def _rgb(image: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` RGB in 0..255 of a CLIP-normalised ``[3, H, W]`` image."""
    return (image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)) * 255


class Provenance:
    """A custom class: a metadata file holding one needs full unpickling."""

    def __init__(self, source: str) -> None:
        self.source = source


# ------------------------------------------------------------------------------------------------ label space
def test_vocabularies_pairs_and_splits(czsl):
    task = czsl.module().task
    assert task.extras["raw_states"] == STATES and task.extras["raw_objects"] == OBJECTS
    assert task.states == ("Faux Fur", "broken", "old", "wet")
    assert task.objects == ("boot", "dog", "traffic light")
    assert task.pairs == tuple(product(task.states, task.objects)) and len(task.pairs) == 12
    assert task.class_names[:2] == ("Faux Fur boot", "Faux Fur dog") and task.class_names[-1] == "wet traffic light"
    assert task.train_pairs == (0, 6, 7, 10, 11)
    assert task.val_pairs == (1, 6, 9) and task.test_pairs == (4, 7, 8)
    assert task.seen == task.train_pairs
    assert task.unseen == (1, 4, 8, 9)  # val and test pairs less the train pairs 6 and 7
    assert "feasibility" not in task.extras


def test_each_split_reads_its_records_and_drops_the_others(czsl):
    dm = czsl.module()
    for split in ("train", "val", "test"):
        assert [record.index for record in dm.records[split]] == czsl.expected(split)
        dataset = dm.dataset(split)
        records = [czsl.records[i] for i in czsl.expected(split)]
        assert dataset.labels.tolist() == [_label(r.attr, r.obj) for r in records]
        assert dataset.images.paths == [czsl.root / "images" / r.image for r in records]
    assert len(czsl.records) == sum(map(len, dm.records.values())) + 4  # NA attr, NA set, two pairs in no file


def test_batches_carry_state_and_object_of_their_pair(czsl):
    dm = czsl.module()
    task = dm.task
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"image", "label", "index", "seen", "state", "object"}
        everything = _all(loader)
        labels = everything["label"]
        assert everything["image"].shape == (len(labels), 3, 16, 16)
        assert all(everything[key].dtype == torch.long for key in ("label", "index", "state", "object"))
        assert torch.equal(everything["state"] * len(task.objects) + everything["object"], labels)
        assert [task.pairs[label] for label in labels.tolist()] == [
            (task.states[s], task.objects[o]) for s, o in zip(everything["state"], everything["object"])]
        assert torch.equal(everything["seen"], torch.isin(labels, torch.tensor(task.seen)))
        for image, label in zip(everything["image"], labels.tolist()):
            np.testing.assert_allclose(_rgb(image).reshape(-1, 3).mean(0), _colour(label), atol=2.5)
    train, test = _all(dm.train_dataloader()), _all(dm.test_dataloader())
    assert train["seen"].all() and set(train["label"].tolist()) == set(task.train_pairs)
    # test_pairs.txt lists 7 (seen) and 4, 8 (unseen); the extra test record of train pair 10 is kept, seen
    assert set(test["label"].tolist()) == {4, 7, 8, 10} and test["seen"].tolist().count(True) == 3


def test_evaluation_batches_have_their_own_size_and_hold_the_same_samples(czsl):
    dm, wide = czsl.module(batch_size=2), czsl.module(batch_size=2, eval_batch_size=5)
    assert [len(b["label"]) for b in wide.train_dataloader()] == [len(b["label"]) for b in dm.train_dataloader()]
    for split in ("val", "test"):
        loader = getattr(wide, f"{split}_dataloader")()
        sizes = [len(b["label"]) for b in loader]
        assert sizes[0] == min(5, len(dm.records[split])) and all(size <= 5 for size in sizes)
        assert torch.equal(_all(loader)["index"], _all(getattr(dm, f"{split}_dataloader")())["index"])


def test_original_image_is_the_file_at_its_own_size(czsl):
    dm = czsl.module()
    record = dm.records["val"][1]
    original = dm.original_image("val", 1)
    height, width = Image.open(czsl.root / "images" / record.image).size[::-1]
    assert original.shape == (3, height, width) and original.dtype == torch.uint8 and height != width


# ------------------------------------------------------------------------------------------------ transforms
def test_training_augmentation_of_a_non_square_photo_is_seeded(czsl):
    first = czsl.records[czsl.expected("train")[0]]
    noise = np.random.default_rng(0).integers(0, 256, (29, 53, 3), dtype=np.uint8)
    _write_jpeg(czsl.root / "images" / first.image, noise)
    dataset = czsl.module(augment=True, image_size=24).dataset("train")
    drawn = dataset[(0, 5)]["image"]
    assert drawn.shape == (3, 24, 24)
    assert torch.equal(drawn, dataset[(0, 5)]["image"])
    assert not torch.equal(drawn, dataset[(0, 6)]["image"])
    assert all(dataset[(k, 1)]["image"].shape == (3, 24, 24) for k in range(len(dataset)))


def test_pipelines_follow_the_msci_recipe():
    train, evaluation = czsl_train_transform(224), czsl_eval_transform(224)
    assert [type(step).__name__ for step in train] == ["SmallestMaxSize", "CenterCrop", "HorizontalFlip", "Perspective",
                                                      "Rotate", "Normalize", "ToTensorV2"]
    assert [type(step).__name__ for step in evaluation] == ["SmallestMaxSize", "CenterCrop", "Normalize", "ToTensorV2"]
    for pipeline in (train, evaluation):
        assert pipeline[0].max_size == 224 and pipeline[0].interpolation == cv2.INTER_CUBIC
        assert (pipeline[1].height, pipeline[1].width) == (224, 224)
    flip, perspective, rotate = train[2:5]
    assert flip.p == perspective.p == 0.5 and rotate.p == 1 and tuple(rotate.limit) == (-5, 5)


def test_evaluation_resizes_the_shorter_side_and_keeps_the_centre(czsl):
    record = czsl.records[czsl.expected("val")[0]]
    strip = np.concatenate([np.broadcast_to(np.array(c, dtype=np.uint8), (32, 32, 3))
                            for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))], axis=1)
    path = czsl.root / "images" / record.image
    Image.fromarray(strip).save(path, format="PNG")  # a .jpg name holding a PNG: decoded by content
    image = _rgb(czsl.module(image_size=16).dataset("val")[0]["image"])
    assert image.shape == (16, 16, 3)
    np.testing.assert_allclose(image[:, 3:13], np.broadcast_to([0, 250, 0], (16, 10, 3)), atol=1.0)


# ------------------------------------------------------------------------------------------------ feasibility
def test_feasibility_is_published_in_pair_order(czsl):
    scores = torch.rand(4, 3)
    torch.save({"feasibility": scores.reshape(-1)}, czsl.root / "feasibility_toy.pt")
    auto = czsl.module(feasibility="auto").task.extras["feasibility"]
    assert auto.dtype == torch.float32 and torch.equal(auto, scores.reshape(-1))
    named = czsl.module(feasibility="feasibility_toy.pt").task.extras["feasibility"]  # below root
    assert torch.equal(named, auto)
    torch.save({"feasibility": scores}, czsl.root / "matrix.pt")
    assert torch.equal(czsl.module(feasibility=str(czsl.root / "matrix.pt")).task.extras["feasibility"], auto)


@pytest.mark.parametrize("content, expected", [
    ({"feasibility": torch.rand(11)}, ["shape (11,)", "expected [12]"]),
    ({"scores": torch.rand(12)}, ["['scores']", "'feasibility'"]),
])
def test_feasibility_of_the_wrong_form_is_refused(czsl, content, expected):
    torch.save(content, czsl.root / "feasibility_bad.pt")
    with pytest.raises(ValueError) as error:
        czsl.module(feasibility="auto")
    for text in [str(czsl.root / "feasibility_bad.pt"), *expected]:
        assert text in str(error.value)
    assert "feasibility" not in write_czsl(czsl.root.parent / "other").module(feasibility="auto").task.extras
    with pytest.raises(FileNotFoundError, match="feasibility file none.pt not found"):
        czsl.module(feasibility="none.pt")


# ------------------------------------------------------------------------------------------------ pickles
def test_metadata_needing_full_unpickling_is_refused_unless_allowed(czsl):
    entries = [record.entry() for record in czsl.records]
    entries[0]["provenance"] = Provenance("lab")
    czsl.save_metadata(entries)
    with pytest.raises(ValueError) as error:
        czsl.module()
    message = str(error.value)
    for text in (str(czsl.metadata), "Provenance", "allow_pickle: true", "arbitrary code"):
        assert text in message
    dm = czsl.module(allow_pickle=True)
    assert [record.index for record in dm.records["train"]] == czsl.expected("train")


def test_damaged_metadata_is_named(czsl):
    czsl.metadata.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"metadata_compositional-split-natural.t7 cannot be read by torch's "
                                         r"weights-only loader"):
        czsl.module()


# ------------------------------------------------------------------------------------------------ errors
def _pair_without_images(czsl):
    with czsl.pair_file("test").open("a") as file:
        file.write("Faux.Fur traffic_light\n")
    return ValueError, [f"{czsl.pair_file('test')}: line 5", "'Faux.Fur traffic_light'", "no test image"]


def _malformed_line(czsl):
    czsl.pair_file("val").write_text("old boot\nwet boot extra\nFaux.Fur dog\n")
    return ValueError, [f"{czsl.pair_file('val')}: line 2", "3 tokens", "'wet boot extra'"]


def _missing_image(czsl):
    index = czsl.expected("val")[1]
    path = czsl.root / "images" / czsl.records[index].image
    path.unlink()
    return FileNotFoundError, [str(path), f"record {index}", str(czsl.metadata), "on_bad_image: skip"]


def _missing_metadata(czsl):
    czsl.metadata.unlink()
    return FileNotFoundError, [str(czsl.metadata), "not found", "<root>/images/"]


def _missing_pair_file(czsl):
    czsl.pair_file("train").unlink()
    return FileNotFoundError, [str(czsl.pair_file("train")), "not found", "{train,val,test}_pairs.txt"]


def _record_without_set(czsl):
    entries = [record.entry() for record in czsl.records]
    del entries[2]["set"]
    czsl.save_metadata(entries)
    return ValueError, ["record 2 (0-based)", str(czsl.metadata), "['set']"]


def _unknown_set(czsl):
    entries = [record.entry() for record in czsl.records]
    entries[4]["set"] = "training"
    czsl.save_metadata(entries)
    return ValueError, ["record 4 (0-based)", "set='training'"]


def _training_record_of_an_unseen_pair(czsl):
    czsl.records.append(Record("wet_boot/train.jpg", "wet", "boot", "train", "train"))
    czsl.save_metadata()
    return ValueError, [f"record {len(czsl.records) - 1}", "wet boot", str(czsl.pair_file("train"))]


ERRORS = {
    "pair without images": _pair_without_images,
    "malformed line": _malformed_line,
    "missing image": _missing_image,
    "missing metadata": _missing_metadata,
    "missing pair file": _missing_pair_file,
    "record without set": _record_without_set,
    "unknown set": _unknown_set,
    "training record of an unseen pair": _training_record_of_an_unseen_pair,
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_inputs_are_named_with_a_fix(czsl, case):
    kind, expected = ERRORS[case](czsl)
    with pytest.raises(kind) as error:
        czsl.module()
    for text in ["CZSLDataModule(root=", *expected]:
        assert text in str(error.value)


@pytest.mark.filterwarnings("ignore:skipped a sample")
def test_unreadable_images_follow_the_bad_image_policy(czsl):
    index = czsl.expected("val")[2]
    path = czsl.root / "images" / czsl.records[index].image
    path.write_bytes(path.read_bytes()[:200])  # truncated: no end-of-image marker
    with pytest.raises(BadImageError, match=f"{path}: it is truncated"):
        _all(czsl.module().val_dataloader())
    with pytest.warns(UserWarning, match=f"skipped a sample.*{path}"):
        val = _all(czsl.module(on_bad_image="skip").val_dataloader())
    assert val["skipped_images"].sum() == 1 and len(val["label"]) == len(czsl.expected("val")) - 1
    assert 2 not in val["index"].tolist()
    missing = czsl.root / "images" / czsl.records[czsl.expected("test")[0]].image
    missing.unlink()
    with pytest.warns(UserWarning, match="1 of the .* images .* are missing"):
        dm = czsl.module(on_bad_image="skip")
    assert len(_all(dm.test_dataloader())["label"]) == len(czsl.expected("test")) - 1
