"""Unreadable image files: errors that name them, ``on_bad_image: skip`` batches and the ``SkippedImages`` callback."""

import csv
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from test_folder_datamodule import SORTED_FOLDERS, _all, _module, write_image_tree  # noqa: E402

from datamodules.loading import BadImageError, read_rgb  # noqa: E402
from xvlm.callbacks import SkippedImages  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:skipped a sample")
"""Skipping warns per bad file; ``test_skip_warns_naming_each_skipped_file`` checks the warnings."""

HEIGHT, WIDTH = 37, 61
"""Odd, non-square size of the photos written as JPEG and PNG files."""


def _photo(seed: int) -> np.ndarray:
    """Smooth gradient plus noise, ``[37, 61, 3]`` uint8 RGB."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    noise = np.random.default_rng(seed).integers(0, 40, (HEIGHT, WIDTH, 3))
    return (np.stack([rows * 5, cols * 3, (rows + cols) * 2], axis=-1) + noise).astype(np.uint8)


def _encoded(extension: str, seed: int = 0) -> bytes:
    ok, data = cv2.imencode(extension, cv2.cvtColor(_photo(seed), cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_FILES = {
    "truncated jpeg": ("ant/truncated.jpg", lambda: _first_half(_encoded(".jpg")), ": it is truncated (no JPEG"),
    "truncated png": ("ant/truncated.png", lambda: _first_half(_encoded(".png")), ": it is truncated (no PNG"),
    "garbage": ("sea_lion/garbage.png", lambda: np.random.default_rng(1).bytes(500), "garbage.png; replace"),
    "empty": ("sea_lion/empty.jpg", lambda: b"", ": it is empty"),
    "deleted": ("Zebra/deleted.png", lambda: _encoded(".png"), "No such file"),
}
"""Per case: file below the split folder, its bytes, and what the error says. ``deleted`` is removed after the scan."""


def _files(cases, split: str = "val") -> list[tuple[int, str]]:
    """Ground truth of a split of :func:`_bad_tree`, in dataset order: ``(label, path below the split folder)`` per
    sample, the bad files of ``cases`` included."""
    added = [BAD_FILES[case][0] for case in cases] + (["Zebra/photo.jpg"] if split == "val" else [])
    return [(label, f"{folder}/{name}") for label, folder in enumerate(SORTED_FOLDERS)
            for name in sorted(["0.png", "1.png", "2.png"] + [path.split("/")[1] for path in added
                                                             if path.startswith(f"{folder}/")])]


def _bad_tree(root, cases, split: str = "val"):
    """The tree of ``test_folder_datamodule`` (three 12 × 12 PNGs per class and split), a good 37 × 61 JPEG
    ``val/Zebra/photo.jpg`` and the bad files of ``cases`` in ``split``."""
    write_image_tree(root, counts={"train": 3, "val": 3})
    (root / "val" / "Zebra" / "photo.jpg").write_bytes(_encoded(".jpg", seed=2))
    for case in cases:
        relative, content, _ = BAD_FILES[case]
        (root / split / relative).write_bytes(content())
    return root


def _scan_then_delete(dm, root, cases) -> None:
    """List every split, then delete the ``deleted`` case's validation file when ``cases`` has it."""
    dm.setup(None)
    if "deleted" in cases:
        (root / "val" / BAD_FILES["deleted"][0]).unlink()


def _good(cases, split: str = "val") -> tuple[list[int], list[int]]:
    """Indices and labels of the samples of :func:`_files` whose files are not among the bad files of ``cases``."""
    bad = {BAD_FILES[case][0] for case in cases}
    good = [(i, label) for i, (label, relative) in enumerate(_files(cases, split)) if relative not in bad]
    return [i for i, _ in good], [label for _, label in good]


def _opencv_rgb(path) -> np.ndarray:
    """What ``read_rgb`` decoded before bad files were checked: OpenCV's decoding, in RGB."""
    return cv2.cvtColor(cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("case, workers", [(case, 0) for case in BAD_FILES] + [("truncated jpeg", 2)])
def test_a_bad_file_stops_the_loader_naming_it_and_the_fix(tmp_path, case, workers):
    root = _bad_tree(tmp_path, [case])
    dm = _module(root, num_workers=workers)
    _scan_then_delete(dm, root, [case])
    path = root / "val" / BAD_FILES[case][0]
    with pytest.raises(BadImageError) as error:
        _all(dm.val_dataloader())
    for text in (str(path), BAD_FILES[case][2], "on_bad_image: skip"):
        assert text in str(error.value)
    assert error.value.path == (None if workers else path)  # a worker's error is rebuilt from its message


def test_a_jpeg_missing_only_its_end_marker_is_truncated(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(_encoded(".jpg")[:-2])
    with pytest.raises(BadImageError, match=r"cut.jpg: it is truncated \(no JPEG end-of-image marker FF D9"):
        read_rgb(path)


def _with_thumbnail(jpeg: bytes) -> bytes:
    """``jpeg`` with a complete 8 × 8 JPEG inside an ``APP15`` segment after its start marker, as cameras store
    thumbnails."""
    thumbnail = b"THMB" + cv2.imencode(".jpg", np.full((8, 8, 3), 90, dtype=np.uint8))[1].tobytes()
    return jpeg[:2] + b"\xff\xef" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail + jpeg[2:]


def test_a_jpeg_cut_after_a_complete_thumbnail_is_truncated(tmp_path):
    main = _encoded(".jpg")
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(_with_thumbnail(main))
    np.testing.assert_array_equal(read_rgb(whole), _opencv_rgb(whole))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: -len(main) // 2])  # the thumbnail and half the main image
    with pytest.raises(BadImageError, match="cut.jpg: it is truncated"):
        read_rgb(cut)


TRAILERS = {"nothing": b"", "camera bytes": b"\x00\x00trailer\xff\x00", "a second image": _encoded(".jpg", seed=4),
            "a video": b"\x00\x00\x00\x18ftypmp42\xff\xda\x00\x0c\xff\xd8\x10"}
"""What may follow a complete file: nothing, a few bytes, another JPEG (multi-picture files), a video (motion photos,
whose data may hold any marker)."""


@pytest.mark.parametrize("trailer", TRAILERS)
@pytest.mark.parametrize("extension", [".jpg", ".png"])
def test_good_files_decode_exactly_as_opencv_does(tmp_path, extension, trailer):
    path = tmp_path / f"photo{extension}"
    path.write_bytes(_encoded(extension, seed=3) + TRAILERS[trailer])
    image = read_rgb(path)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, _opencv_rgb(path))


def test_skip_mode_serves_the_original_images_unchanged(tmp_path):
    root = _bad_tree(tmp_path, ["garbage"])
    index = [relative for _, relative in _files(["garbage"])].index("Zebra/photo.jpg")
    original = _module(root, on_bad_image="skip").original_image("val", index)
    assert torch.equal(original, torch.from_numpy(_opencv_rgb(root / "val" / "Zebra" / "photo.jpg")).permute(2, 0, 1))


def test_on_bad_image_must_be_error_or_skip(tmp_path):
    with pytest.raises(ValueError, match="on_bad_image='drop'; choose 'error' or 'skip'"):
        _module(write_image_tree(tmp_path), on_bad_image="drop")


# ------------------------------------------------------------------------------------------------ skipping
@pytest.mark.parametrize("workers", [0, 2])
def test_skip_yields_exactly_the_good_samples_and_counts_the_bad(tmp_path, workers):
    root = _bad_tree(tmp_path, BAD_FILES)
    indices, labels = _good(BAD_FILES)
    assert len(_files(BAD_FILES)) == 15 and len(indices) == 10
    dm = _module(root, on_bad_image="skip", num_workers=workers, batch_size=4)
    _scan_then_delete(dm, root, BAD_FILES)
    batches = list(dm.val_dataloader())
    assert torch.cat([batch["index"] for batch in batches]).tolist() == indices
    assert torch.cat([batch["label"] for batch in batches]).tolist() == labels
    assert torch.cat([batch["image"] for batch in batches]).shape == (10, 3, 8, 8)
    # Batches of indices 0-3, 4-7, 8-11, 12-14; bad: 3 (deleted), 8, 9 (truncated), 13 (empty), 14 (garbage).
    assert [batch["skipped_images"].item() for batch in batches] == [1, 0, 2, 2]
    assert all(batch["skipped_images"].dtype == torch.long and batch["skipped_images"].ndim == 0
               for batch in batches)


def test_skip_warns_naming_each_skipped_file(tmp_path):
    root = _bad_tree(tmp_path, ["garbage", "empty"])
    with pytest.warns(UserWarning) as warned:
        list(_module(root, on_bad_image="skip").val_dataloader())
    said = [str(warning.message) for warning in warned]
    for case in ("garbage", "empty"):
        assert any(str(root / "val" / BAD_FILES[case][0]) in text and "skipped" in text for text in said)


def test_skip_train_epoch_holds_every_good_sample_once(tmp_path):
    root = _bad_tree(tmp_path, ["garbage", "truncated png"], split="train")
    indices, labels = _good(["garbage", "truncated png"], split="train")
    batches = list(_module(root, on_bad_image="skip", batch_size=3).train_dataloader())
    assert sorted(torch.cat([batch["index"] for batch in batches]).tolist()) == indices
    assert sorted(torch.cat([batch["label"] for batch in batches]).tolist()) == sorted(labels)
    assert sum(batch["skipped_images"].item() for batch in batches) == 2


def test_a_batch_of_bad_files_holds_the_next_readable_sample_instead(tmp_path):
    root = _bad_tree(tmp_path, BAD_FILES)
    dm = _module(root, on_bad_image="skip", batch_size=2)
    _scan_then_delete(dm, root, BAD_FILES)
    batches = list(dm.val_dataloader())
    # Batches [8, 9] (both truncated) and [14] (garbage, the last) hold the next readable samples instead: 10
    # (sea_lion/0.png) and, wrapping round, 0 (Zebra/0.png).
    assert [batch["index"].tolist() for batch in batches] == [[0, 1], [2], [4, 5], [6, 7], [10], [10, 11], [12],
                                                              [0]]
    assert [batch["skipped_images"].item() for batch in batches] == [0, 1, 0, 0, 2, 0, 1, 1]
    assert [batches[4]["label"].item(), batches[7]["label"].item()] == [SORTED_FOLDERS.index("sea_lion"), 0]


def test_a_split_without_readable_files_is_an_error(tmp_path):
    root = write_image_tree(tmp_path, counts={"train": 1, "val": 1})
    for folder in SORTED_FOLDERS:
        (root / "val" / folder / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="none of the 3 image files of this split can be read"):
        list(_module(root, on_bad_image="skip", batch_size=3).val_dataloader())


# ------------------------------------------------------------------------------------------------ callback
class Probe(L.LightningModule):
    """Mean colour → class logits; logs its loss and records the validation indices it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 3)
        self.val_indices: list[int] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.layer(batch["image"].mean(dim=(2, 3))), batch["label"])
        self.log("train/loss", loss, batch_size=len(batch["label"]), on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_indices += batch["index"].tolist()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, tmp_path, **data) -> tuple[Probe, list[dict[str, str]]]:
    """Two epochs with ``SkippedImages``, two validation batches each, then a test on the whole validation split:
    the module and the CSV logger's rows."""
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=2, num_sanity_val_steps=2,
                        logger=CSVLogger(tmp_path / "logs", name="run"), callbacks=[SkippedImages()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    module = Probe()
    datamodule = _module(root, batch_size=4, **data)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    with open(tmp_path / "logs" / "run" / "version_0" / "metrics.csv") as file:
        return module, list(csv.DictReader(file))


def _per_epoch(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def test_callback_logs_the_skipped_samples_of_each_epoch(tmp_path):
    root = _bad_tree(tmp_path / "data", ["garbage", "truncated png"], split="train")
    for case in ("truncated jpeg", "empty"):
        (root / "val" / BAD_FILES[case][0]).write_bytes(BAD_FILES[case][1]())
    module, rows = _fit(root, tmp_path, on_bad_image="skip")
    # Every train epoch reads the 11 train files (2 bad); validation its first 8 files, Zebra 0-2.png and photo.jpg,
    # ant 0-2.png and truncated.jpg (index 7, bad). Sanity-check batches are not counted, epochs not accumulated.
    assert _per_epoch(rows, "data/skipped_train_images") == [2.0, 2.0]
    assert _per_epoch(rows, "data/skipped_val_images") == [1.0, 1.0]
    assert _per_epoch(rows, "data/skipped_test_images") == [2.0]  # the whole validation split
    assert module.val_indices == [0, 1, 2, 3, 4, 5, 6] * 3  # sanity check, then two epochs


def test_callback_logs_nothing_without_the_key(tmp_path):
    _, rows = _fit(write_image_tree(tmp_path / "data"), tmp_path)
    assert rows and not any(key.startswith("data/") for row in rows for key in row)
