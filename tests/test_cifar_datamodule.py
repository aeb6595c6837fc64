"""CIFARDataModule on tiny fake batches in the real pickle format: names, pixel layout, hold-out, augmentation."""

import os
import pickle

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
import torch

from datamodules import CIFARDataModule
from datamodules.transforms import CLIP_MEAN, CLIP_STD

NAMES = ["truck", "airplane", "sea_lion", "cat"]
"""Meta order of the fake classes: deliberately not sorted."""
PER_CLASS, TEST_PER_CLASS, TEST_OFFSET = 10, 3, 1000
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _identity_rows(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[n, 3072]`` rows whose red plane is ``id % 256``, green plane ``id // 256`` and blue plane ``20 * label``."""
    planes = np.stack([ids % 256, ids // 256, 20 * labels], axis=1).astype(np.uint8)
    return np.repeat(planes, 1024, axis=1)


def _dump(path, content: dict, keys: type) -> None:
    with open(path, "wb") as file:
        pickle.dump({key.encode() if keys is bytes else key: value for key, value in content.items()}, file)


def write_fake_cifar(root, variant: str = "cifar10", keys: type = bytes, train_rows=None, test_rows=None):
    """A fake CIFAR folder under ``root``: ``PER_CLASS`` train and ``TEST_PER_CLASS`` test images per class."""
    folder = root / FOLDERS[variant]
    folder.mkdir(parents=True)
    train_labels = np.tile(np.arange(len(NAMES)), PER_CLASS)
    test_labels = np.tile(np.arange(len(NAMES)), TEST_PER_CLASS)
    ids = np.arange(len(train_labels))
    if train_rows is None:
        train_rows = _identity_rows(ids, train_labels)
    if test_rows is None:
        test_rows = _identity_rows(TEST_OFFSET + np.arange(len(test_labels)), test_labels)
    names = [name.encode() for name in NAMES] if keys is bytes else NAMES
    if variant == "cifar10":
        for k, part in enumerate(np.array_split(ids, 5), start=1):
            _dump(folder / f"data_batch_{k}", {"batch_label": b"training batch", "labels": train_labels[part].tolist(),
                                               "data": train_rows[part]}, keys)
        _dump(folder / "test_batch", {"labels": test_labels.tolist(), "data": test_rows}, keys)
        _dump(folder / "batches.meta", {"label_names": names, "num_vis": 3072}, keys)
    else:
        for name, labels, rows in (("train", train_labels, train_rows), ("test", test_labels, test_rows)):
            coarse = (len(NAMES) - 1 - labels).tolist()
            _dump(folder / name, {"fine_labels": labels.tolist(), "coarse_labels": coarse, "data": rows}, keys)
        _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": names[::-1]}, keys)
    return folder


def _pixels(image: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` pixels in 0..255 (rounded) of a CLIP-normalised ``[3, H, W]`` image."""
    pixels = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    return np.round(pixels * 255).astype(int)


def _identities(loader) -> tuple[list[int], list[int], torch.Tensor]:
    """Fake sample ids, the labels written into the images, and the ``label`` field of every item."""
    batches = list(loader)
    centre = [_pixels(image)[16, 16] for batch in batches for image in batch["image"]]
    labels = torch.cat([batch["label"] for batch in batches])
    return [int(r + 256 * g) for r, g, _ in centre], [int(b // 20) for _, _, b in centre], labels


def _module(root, **kwargs) -> CIFARDataModule:
    kwargs = dict(batch_size=16, num_workers=0, augment=False, val_fraction=0.2) | kwargs
    return CIFARDataModule(str(root), **kwargs)


# ------------------------------------------------------------------------------------------------ names and layout
@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("keys", [bytes, str])
@pytest.mark.parametrize("at_folder", [False, True])
def test_meta_names_in_label_order_and_labels_match_images(tmp_path, variant, keys, at_folder):
    folder = write_fake_cifar(tmp_path, variant, keys)
    dm = _module(folder if at_folder else tmp_path, variant=variant)
    assert dm.task.class_names == ("truck", "airplane", "sea lion", "cat")
    assert dm.task.seen == (0, 1, 2, 3) and dm.task.unseen == () and dm.task.descriptors is None
    ids, written, labels = _identities(dm.test_dataloader())
    assert ids == list(range(TEST_OFFSET, TEST_OFFSET + len(NAMES) * TEST_PER_CLASS))
    assert labels.tolist() == written


def test_channel_first_rows_become_rgb_images(tmp_path):
    y, x = np.mgrid[:32, :32]
    planes = np.stack([8 * x, 8 * y, np.full((32, 32), 77)]).astype(np.uint8)
    rows = np.repeat(planes.reshape(1, 3072), len(NAMES) * TEST_PER_CLASS, axis=0)
    item = _module(write_fake_cifar(tmp_path, test_rows=rows)).test_dataloader().dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    np.testing.assert_array_equal(_pixels(item["image"]), planes.transpose(1, 2, 0))


# ------------------------------------------------------------------------------------------------ splits
def test_validation_is_a_seeded_stratified_holdout_of_the_training_set(tmp_path):
    write_fake_cifar(tmp_path)
    train_ids, _, _ = _identities(_module(tmp_path, seed=0).train_dataloader())
    val_ids, _, val_labels = _identities(_module(tmp_path, seed=0).val_dataloader())
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(len(NAMES) * PER_CLASS))
    assert torch.bincount(val_labels).tolist() == [2, 2, 2, 2]
    assert _identities(_module(tmp_path, seed=0).val_dataloader())[0] == val_ids
    assert _identities(_module(tmp_path, seed=1).val_dataloader())[0] != val_ids
    test_ids, _, _ = _identities(_module(tmp_path).test_dataloader())
    assert min(test_ids) >= TEST_OFFSET


@pytest.mark.parametrize("unseen", [["sea lion", "truck"], ["sea_lion", "truck"]])
def test_unseen_classes_are_absent_from_train_and_flagged_in_val_and_test(tmp_path, unseen):
    dm = _module(write_fake_cifar(tmp_path), unseen_classes=unseen, batch_size=4)
    assert dm.task.seen == (1, 3) and dm.task.unseen == (0, 2)
    for batch in dm.train_dataloader():
        assert set(batch["label"].tolist()) <= {1, 3} and batch["seen"].all()
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        labels = torch.cat([batch["label"] for batch in loader])
        seen = torch.cat([batch["seen"] for batch in loader])
        assert set(labels.tolist()) == {0, 1, 2, 3}
        assert torch.equal(seen, torch.isin(labels, torch.tensor([1, 3])))


# ------------------------------------------------------------------------------------------------ augmentation
def _shifted_and_flipped(image: np.ndarray) -> dict[tuple[bool, int, int], np.ndarray]:
    """Every 32-pixel crop of ``image`` ``[32, 32, 3]`` padded by 4 black pixels, flipped or not."""
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crops = {}
    for flip in (False, True):
        for dy in range(9):
            for dx in range(9):
                crop = padded[dy : dy + 32, dx : dx + 32]
                crops[flip, dy, dx] = crop[:, ::-1] if flip else crop
    return crops


def test_train_augmentation_pads_with_black_crops_flips_and_follows_torch_seed(tmp_path):
    noise = np.random.default_rng(0).integers(1, 256, (len(NAMES) * PER_CLASS, 3072), dtype=np.uint8)
    write_fake_cifar(tmp_path, train_rows=noise)
    original = _pixels(_module(tmp_path).train_dataloader().dataset[0]["image"])
    dataset = _module(tmp_path, augment=True).train_dataloader().dataset
    candidates = _shifted_and_flipped(original)

    def drawn(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return dataset[0]["image"]

    matched = set()
    for seed in range(30):
        pixels = _pixels(drawn(seed))
        matched |= {key for key, crop in candidates.items() if np.array_equal(crop, pixels)}
    assert {flip for flip, _, _ in matched} == {False, True}
    assert len({(dy, dx) for _, dy, dx in matched}) > 5
    assert torch.equal(drawn(3), drawn(3))


def test_images_are_resized_when_image_size_differs_from_32(tmp_path):
    dm = _module(write_fake_cifar(tmp_path), image_size=48, augment=True)
    assert dm.train_dataloader().dataset[0]["image"].shape == (3, 48, 48)
    item = dm.val_dataloader().dataset[0]
    assert item["image"].shape == (3, 48, 48)
    assert len(np.unique(_pixels(item["image"]).reshape(-1, 3), axis=0)) == 1


# ------------------------------------------------------------------------------------------------ errors
def test_missing_files_say_where_they_belong_and_where_to_get_them(tmp_path):
    with pytest.raises(ValueError) as error:
        _module(tmp_path)
    for text in ("CIFARDataModule(root=", "cifar-10-batches-py", "data_batch_1", "batches.meta",
                 "https://www.cs.toronto.edu/~kriz/cifar.html"):
        assert text in str(error.value)
    with pytest.raises(ValueError, match=r"cifar-100-python/ with train, test, meta"):
        _module(tmp_path, variant="cifar100")
    (write_fake_cifar(tmp_path) / "data_batch_3").unlink()
    with pytest.raises(ValueError, match=r"\['data_batch_3'\] missing .*cifar-10-batches-py.*kriz/cifar.html"):
        _module(tmp_path)


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(unseen_classes=["cat", "dog"]), r"unseen_classes lists unknown classes \['dog'\]"),
        (dict(unseen_classes=NAMES), "unseen_classes holds out every class"),
        (dict(val_fraction=0.0), "val_fraction=0.0"),
        (dict(val_fraction=1.0), "val_fraction=1.0"),
        (dict(variant="cifar1000"), "variant='cifar1000'.*unknown variant"),
    ],
)
def test_bad_options_are_named(tmp_path, options, expected):
    write_fake_cifar(tmp_path)
    with pytest.raises(ValueError, match=rf"CIFARDataModule\(root=.*{expected}"):
        _module(tmp_path, **options)
