"""The Shapes world: determinism, ground-truth masks, label spaces and splits, batches, augmentation."""

import itertools
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv
from scipy.spatial import ConvexHull

from datamodules import ShapesDataModule
from datamodules.sampling import EpochSampler, ResumableLoader
from datamodules.shapes import SHAPES, render
from datamodules.transforms import CLIP_MEAN, CLIP_STD

TASKS = ("objects", "attributes", "compositions")
NOMINAL_HUE = {"red": 0, "orange": 30, "yellow": 55, "green": 120, "cyan": 185, "blue": 230, "purple": 275,
               "pink": 325}
"""Hue in degrees of each colour name, from the colour wheel (not from the implementation)."""
SMALL = dict(batch_size=16, train_size=64, val_size=64, test_size=64)


@pytest.fixture(scope="module", params=TASKS)
def datamodule(request) -> ShapesDataModule:
    dm = ShapesDataModule(task=request.param, **SMALL)
    dm.setup("fit")
    return dm


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` CLIP-normalised tensor -> ``[H, W, 3]`` float pixels in 0..255."""
    pixels = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    return pixels * 255


def _coloured(pixels: np.ndarray, threshold: float = 10.0) -> np.ndarray:
    """``[H, W]`` bool: pixels that are not grey (channel spread above ``threshold``)."""
    return pixels.max(-1) - pixels.min(-1) > threshold


def _hue_error(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Circular distance in degrees between the hue of ``[N, 3]`` pixels and the nominal hue of ``colour``."""
    hue = rgb_to_hsv(pixels / 255.0)[:, 0] * 360
    error = np.abs(hue - NOMINAL_HUE[colour])
    return np.minimum(error, 360 - error)


def _batches(loader, count: int) -> list[dict]:
    return list(itertools.islice(loader, count))


# ------------------------------------------------------------------------------------------------ determinism
def test_samples_are_a_pure_function_of_seed_split_and_index():
    first, again = ShapesDataModule(seed=3), ShapesDataModule(seed=3)
    sample = first.raw_sample("val", 17)
    repeat = again.raw_sample("val", 17)
    assert np.array_equal(sample["image"], repeat["image"]) and np.array_equal(sample["mask"], repeat["mask"])
    others = [first.raw_sample("val", 18), first.raw_sample("test", 17), ShapesDataModule(seed=4).raw_sample("val", 17)]
    for other in others:
        assert not np.array_equal(sample["image"], other["image"])


def test_loader_serves_raw_samples_in_any_order_and_worker_count():
    dm = ShapesDataModule(task="attributes", batch_size=4, val_size=8, num_workers=2)
    dm.setup("validate")
    items = [dm.datasets["val"][i] for i in (5, 2)]
    assert torch.equal(items[0]["image"], dm.datasets["val"][5]["image"])
    raw = dm.raw_sample("val", 2)
    assert np.abs(_denormalise(items[1]["image"]) - raw["image"]).max() < 0.01
    assert np.array_equal(items[1]["mask"].numpy(), raw["mask"]) and items[1]["label"] == raw["label"]
    serial = ShapesDataModule(task="attributes", batch_size=4, val_size=8)
    serial.setup("validate")
    images = [torch.cat([batch["image"] for batch in module.val_dataloader()]) for module in (dm, serial)]
    assert torch.equal(*images)


# ------------------------------------------------------------------------------------------------ pixels and masks
def test_mask_is_exactly_the_coloured_pixels_and_has_the_class_hue():
    dm = ShapesDataModule(task="attributes")
    for index in range(0, 256, 5):
        raw = dm.raw_sample("val", index)
        assert np.array_equal(_coloured(raw["image"].astype(float)), raw["mask"])
        colour = dm.task.class_names[raw["label"]].split()[0]
        assert _hue_error(raw["image"][raw["mask"]].astype(float), colour).max() < 15
        border = np.concatenate([raw["mask"][0], raw["mask"][-1], raw["mask"][:, 0], raw["mask"][:, -1]])
        assert not border.any(), "the object must lie fully inside the image"


@pytest.mark.parametrize("shape, area", [("square", lambda side: side**2), ("circle", lambda d: np.pi * d**2 / 4)])
def test_mask_area_matches_closed_form(shape, area):
    for k in range(30):
        drawing = render(shape, "blue", "striped", np.random.default_rng(k), image_size=64)
        assert drawing.mask.sum() == pytest.approx(area(drawing.size), rel=0.07)
        assert area(0.25 * 64) * 0.93 <= drawing.mask.sum() <= area(0.60 * 64) * 1.07


@pytest.mark.parametrize("shape, convex", [("circle", True), ("square", True), ("triangle", True), ("hexagon", True),
                                           ("star", False), ("cross", False), ("crescent", False)])
def test_shapes_are_convex_or_not_as_their_geometry_says(shape, convex):
    for k in range(5):
        mask = render(shape, "red", "solid", np.random.default_rng(k)).mask
        corners = (np.argwhere(mask)[:, None, :] + np.array([[0, 0], [0, 1], [1, 0], [1, 1]])).reshape(-1, 2)
        solidity = mask.sum() / ConvexHull(corners).volume
        assert solidity > 0.82 if convex else solidity < 0.75


def test_train_augmentation_moves_the_mask_with_the_object():
    torch.manual_seed(0)
    dm = ShapesDataModule(task="attributes", **SMALL)
    dm.setup("fit")
    moved = 0
    for index in range(16):
        item = dm.datasets["train"][index]
        mask = item["mask"].numpy()
        coloured = _coloured(_denormalise(item["image"]), threshold=25)
        assert (mask & coloured).sum() / (mask | coloured).sum() > 0.7
        moved += not np.array_equal(mask, dm.raw_sample("train", index)["mask"])
    assert moved >= 8, "the augmentation should move most objects"


# ------------------------------------------------------------------------------------------------ label spaces
def test_attribute_classes_split_keeps_every_primitive_seen():
    task = ShapesDataModule(task="attributes").task
    assert len(task.class_names) == 256 and len(task.unseen) == 64
    assert set(task.seen).isdisjoint(task.unseen) and set(task.seen) | set(task.unseen) == set(range(256))
    for seed in range(4):
        extreme = ShapesDataModule(task="attributes", seed=seed, unseen_fraction=0.95).task
        words = [set(part) for part in zip(*(extreme.class_names[c].split() for c in extreme.seen))]
        assert [len(w) for w in words] == [8, 4, 8]
    assert ShapesDataModule(task="attributes", seed=1).task.unseen != task.unseen
    with pytest.raises(ValueError, match="unseen_fraction"):
        ShapesDataModule(task="attributes", unseen_fraction=0.99)


def test_attribute_matrix_matches_class_names():
    task = ShapesDataModule(task="attributes").task
    names = task.attribute_names
    assert task.attributes.shape == (256, len(names))
    straight = {"square", "triangle", "star", "cross", "hexagon"}
    for label, class_name in enumerate(task.class_names):
        row = task.attributes[label]
        colour, pattern, shape = class_name.split()
        for name, value in zip(names, row.tolist()):
            if " " not in name:
                assert value == (name in (colour, pattern, shape)), (class_name, name)
        assert row[names.index("straight edges")] == (shape in straight)
        assert row[names.index("curved outline")] == (shape not in straight)
        assert 3 <= len(task.descriptors[class_name]) <= 6 and f"{colour} colour" in task.descriptors[class_name]


def test_composition_pairs_split_like_czsl():
    task = ShapesDataModule(task="compositions").task
    assert len(task.pairs) == 64 and task.class_names == tuple(f"{s} {o}" for s, o in task.pairs)
    train = set(task.train_pairs)
    val_unseen, test_unseen = set(task.val_pairs) - train, set(task.test_pairs) - train
    assert train == set(task.seen) and train <= set(task.val_pairs) and train <= set(task.test_pairs)
    assert val_unseen and test_unseen and val_unseen.isdisjoint(test_unseen)
    assert val_unseen | test_unseen == set(task.unseen)
    assert {task.pairs[p][0] for p in train} == set(task.states)
    assert {task.pairs[p][1] for p in train} == set(task.objects)


def test_objects_task_has_no_pairs_and_says_so():
    task = ShapesDataModule(task="objects").task
    assert task.unseen == () and len(task.class_names) == 8
    assert all(3 <= len(task.rationales[name]) <= 5 for name in task.class_names)
    with pytest.raises(ValueError) as error:
        task.require("pairs", "MSCI")
    assert all(word in str(error.value) for word in ("MSCI", "pairs", "ShapesDataModule(task='objects')"))


# ------------------------------------------------------------------------------------------------ batches
def test_batches_have_the_contract_keys_and_types(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    task = datamodule.task
    extra = {"objects": {"rationale", "rationales"}, "attributes": {"attributes"}, "compositions": {"state", "object"}}
    assert set(batch) == {"image", "label", "mask", "index", "seen"} | extra[datamodule.hparams.task]
    assert batch["image"].shape == (16, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (16, 64, 64) and batch["mask"].dtype == torch.bool
    for key in ("label", "index"):
        assert batch[key].shape == (16,) and batch[key].dtype == torch.long
    assert batch["seen"].dtype == torch.bool
    if "attributes" in batch:
        assert torch.equal(batch["attributes"], task.attributes[batch["label"]])
    if "state" in batch:
        pairs = [task.pairs[label] for label in batch["label"].tolist()]
        assert [task.states[s] for s in batch["state"].tolist()] == [state for state, _ in pairs]
        assert [task.objects[o] for o in batch["object"].tolist()] == [obj for _, obj in pairs]
    if "rationales" in batch:
        assert batch["rationales"].shape == (16, len(task.rationale_vocab)) and batch["rationales"].dtype == torch.bool
        assert batch["rationale"].shape == (16,) and batch["rationale"].dtype == torch.long


def test_train_batches_hold_only_seen_classes_and_eval_batches_flag_seen(datamodule):
    seen = torch.tensor(datamodule.task.seen)
    for batch in _batches(datamodule.train_dataloader(), 3):
        assert torch.isin(batch["label"], seen).all() and batch["seen"].all()
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        labels = torch.cat([batch["label"] for batch in loader])
        flags = torch.cat([batch["seen"] for batch in loader])
        assert torch.equal(flags, torch.isin(labels, seen))
        assert flags.any() and (flags.all() if datamodule.task.unseen == () else not flags.all())


def test_composition_eval_splits_draw_their_own_pairs():
    dm = ShapesDataModule(task="compositions", **SMALL)
    dm.setup("test")
    for loader, pairs in ((dm.val_dataloader(), dm.task.val_pairs), (dm.test_dataloader(), dm.task.test_pairs)):
        labels = torch.cat([batch["label"] for batch in loader])
        assert set(labels.tolist()) == set(pairs)


def test_rationales_mark_shape_facts_and_the_visible_colour_and_pattern():
    dm = ShapesDataModule(task="objects", **SMALL)
    dm.setup("validate")
    task, vocab = dm.task, dm.task.rationale_vocab
    colour_facts = [fact for fact in vocab if fact.endswith(" colour")]
    for index in range(24):
        item, raw = dm.datasets["val"][index], dm.raw_sample("val", index)
        marked = {vocab[k] for k in torch.nonzero(item["rationales"]).flatten().tolist()}
        shape_facts = set(task.rationales[task.class_names[item["label"]]])
        assert shape_facts <= marked and len(marked) == len(shape_facts) + 2
        (colour,) = [fact.split()[0] for fact in marked & set(colour_facts)]
        object_pixels = raw["image"][raw["mask"]]
        assert np.median(_hue_error(object_pixels.astype(float), colour)) < 15
        assert ("uniform fill" in marked) == (len(np.unique(object_pixels, axis=0)) == 1)


def test_ground_truth_rationale_is_one_of_the_class_facts_cycled_by_index():
    dm = ShapesDataModule(task="objects", **SMALL)
    dm.setup("validate")
    task, vocab = dm.task, dm.task.rationale_vocab
    chosen = set()
    for batch in dm.val_dataloader():
        for index, label, rationale, marked in zip(batch["index"].tolist(), batch["label"].tolist(),
                                                   batch["rationale"].tolist(), batch["rationales"]):
            own = task.rationales[task.class_names[label]]
            assert vocab[rationale] == own[index % len(own)] and marked[rationale]
            chosen.add((label, rationale))
    assert len(chosen) > len(task.class_names), "several facts of a class should serve as ground truth"


def test_rationale_table_agrees_with_the_class_rationales():
    task = ShapesDataModule(task="objects").task
    table = task.extras["rationale_table"]
    assert table.shape == (len(task.class_names), len(task.rationale_vocab)) and table.dtype == torch.bool
    for c, name in enumerate(task.class_names):
        assert [task.rationale_vocab[r] for r in torch.nonzero(table[c]).flatten().tolist()] == sorted(
            task.rationales[name], key=task.rationale_vocab.index)
    assert task.descriptors == task.rationales
    assert all(table.sum(1) >= 3) and table.sum(0)[:-12].ge(1).all(), "every shape fact belongs to some class"


def test_shapes_option_restricts_the_classes_and_the_vocabulary():
    full = ShapesDataModule(task="objects", **SMALL)
    dm = ShapesDataModule(task="objects", shapes=["star", "circle"], **SMALL)
    task = dm.task
    assert task.class_names == ("star", "circle") and task.seen == (0, 1) and task.unseen == ()
    assert set(task.rationales) == {"star", "circle"} and task.rationales["star"] == full.task.rationales["star"]
    shape_facts = [fact for fact in task.rationale_vocab if not fact.endswith(" colour")][:-4]
    assert set(shape_facts) == set(task.rationales["star"]) | set(task.rationales["circle"])
    assert "four arms" not in task.rationale_vocab and len(task.rationale_vocab) == len(shape_facts) + 12
    assert task.extras["rationale_table"].shape == (2, len(task.rationale_vocab))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["label"].tolist()) == {0, 1} and batch["rationales"].shape[1] == len(task.rationale_vocab)
    for index, label in zip(batch["index"].tolist(), batch["label"].tolist()):
        assert SHAPES[dm.raw_sample("val", index)["shape"]] == task.class_names[label]
    assert full.task.class_names == ShapesDataModule(task="objects", shapes=None).task.class_names


@pytest.mark.parametrize("task, shapes, expected", [
    ("objects", ["star", "oval"], ["['star', 'oval']", "unknown shapes ['oval']", "circle", "crescent"]),
    ("objects", ["star", "star"], ["repeats ['star']"]),
    ("objects", [], ["is empty"]),
    ("attributes", ["star"], ["task='objects' only", "task='attributes'"]),
])
def test_bad_shapes_option_is_explained(task, shapes, expected):
    with pytest.raises(ValueError) as error:
        ShapesDataModule(task=task, shapes=shapes)
    assert all(text in str(error.value) for text in expected), str(error.value)


def test_train_classes_are_balanced():
    dm = ShapesDataModule(task="attributes")
    labels = [dm.raw_sample("train", index)["label"] for index in range(2 * len(dm.task.seen))]
    assert set(np.bincount(labels, minlength=256)[list(dm.task.seen)]) == {2}


def test_loaders_shuffle_train_only_and_keep_workers():
    dm = ShapesDataModule(task="objects", num_workers=2, **SMALL)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train, ResumableLoader) and isinstance(train.sampler, EpochSampler) and train.sampler.shuffle
    assert isinstance(val.sampler, EpochSampler) and list(val.sampler) == list(range(len(dm.dataset("val"))))
    assert train.persistent_workers and val.persistent_workers
    assert train.pin_memory == torch.cuda.is_available()


def _first_batch(seed: int, workers: int = 0, noise: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    dm = ShapesDataModule(task="attributes", batch_size=8, train_size=8, num_workers=workers)
    dm.setup("fit")
    torch.manual_seed(noise)  # the global generator's state when iterating must not matter
    return next(iter(dm.train_dataloader()))["image"]


def test_train_augmentation_follows_the_run_seed_not_the_worker_or_the_generator_state():
    first = _first_batch(0)
    assert torch.equal(first, _first_batch(0, noise=7))
    assert torch.equal(first, _first_batch(0, workers=2))
    assert not torch.equal(first, _first_batch(1))