"""LaZSL crops from the original images (spec §2.2): datamodule originals, views, callback path, explanations."""

import json
import os
import re

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from functools import partial  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from test_lazsl import _datamodule, _stub_trainer  # noqa: E402
from test_lazsl_settings import PixelTowers  # noqa: E402

import xvlm.zeroshot.lazsl as lazsl_module  # noqa: E402
from datamodules import ImageFolderDataModule  # noqa: E402
from xvlm.backbones import CLIP_MEAN, CLIP_STD  # noqa: E402
from xvlm.contracts import OriginalImages  # noqa: E402
from xvlm.explain.render import render_explanation, sample_explanation  # noqa: E402
from xvlm.methods import CLIPFineTune  # noqa: E402
from xvlm.prompts import descriptor_sentences, encode_descriptors  # noqa: E402
from xvlm.zeroshot import LaZSL, LaZSLSettings, evaluating, image_seeds, make_views, score_images  # noqa: E402
from xvlm.zeroshot import views_from_originals  # noqa: E402
from xvlm.zeroshot.regions import explain_lazsl, lazsl_explainer  # noqa: E402

SIDE = PixelTowers.image_size
"""Model input side of the stub towers (16)."""
DESCRIPTORS = {"cat": ["whiskers", "a tail"], "dog": ["floppy ears", "a wet nose", "paws"]}
SETTINGS = LaZSLSettings(n_crops=6, alpha=0.4, beta=0.6, eps=0.05)
CENTRE_X = (12, 49)
"""Columns of the centred 37 × 37 square of a 37 × 61 image, the only part the resized batch keeps."""


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """Grey noise with a saturated red 9 × 9 object in the top-right corner, ``[H, W, 3]`` uint8."""
    pixels = np.random.default_rng(seed).integers(90, 140, size=(height, width, 3), dtype=np.uint8)
    pixels[:9, -9:] = (250, 10, 10)
    return pixels


def _tree(root, images: dict[str, list[np.ndarray]], image_size: int = SIDE) -> ImageFolderDataModule:
    """``root/{train,val}/<class>/<k>.png``: the given val images, one train image per class; a datamodule on it."""
    for folder in DESCRIPTORS:
        for split, pictures in (("train", [_photo(SIDE, SIDE, 0)]), ("val", images.get(folder, []))):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for k, pixels in enumerate(pictures):
                Image.fromarray(pixels).save(root / split / folder / f"{k}.png")
    (root / "descriptors.json").write_text(json.dumps(DESCRIPTORS))
    return ImageFolderDataModule(str(root), image_size=image_size, batch_size=8, num_workers=0, augment=False,
                                 descriptors=str(root / "descriptors.json"), unseen_classes=["dog"])


def _val_batch(datamodule: ImageFolderDataModule) -> dict[str, torch.Tensor]:
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))


def _text(encoder, task, settings=SETTINGS) -> tuple[torch.Tensor, torch.Tensor]:
    sentences, mask = descriptor_sentences(task.class_names, task.descriptors, settings.suffix)
    return encode_descriptors(encoder, sentences, mask), mask


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 → ``[3, H, W]`` CLIP-normalised float32 (independent of the code under test)."""
    scaled = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255
    return (scaled - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


# --------------------------------------------------------------------------------------------- datamodule
def test_folder_datamodule_serves_the_decoded_files_and_shapes_none(tmp_path):
    photo = _photo(37, 61, 1)
    datamodule = _tree(tmp_path, {"cat": [photo]})
    assert isinstance(datamodule, OriginalImages)
    original = datamodule.original_image("val", 0)
    assert original.dtype == torch.uint8 and torch.equal(original, torch.from_numpy(photo).permute(2, 0, 1))
    assert _val_batch(datamodule)["image"].shape[-2:] == (SIDE, SIDE)
    shapes = _datamodule()
    assert shapes.original_image("val", 0) is None


@pytest.mark.parametrize("content, reason", [(b"", ": it is empty"), (b"\x89PNG not really", "")])
def test_a_bad_image_file_is_named(tmp_path, content, reason):
    datamodule = _tree(tmp_path, {"cat": [_photo(20, 20, 0)]})
    bad = tmp_path / "val" / "cat" / "1.png"
    bad.write_bytes(content)
    datamodule.setup("validate")
    with pytest.raises(ValueError, match=re.escape(f"cannot decode image file {bad}{reason}; replace or remove it")):
        datamodule.original_image("val", 1)


# --------------------------------------------------------------------------------------------- views
def _pil_view(pixels: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """PIL's bicubic resize of ``pixels`` cut to ``box = (x0, y0, x1, y1)``, the reference's way, normalised."""
    return _normalised(np.asarray(Image.fromarray(pixels).crop(box).resize(size, Image.BICUBIC)))


def test_views_from_originals_are_pils_clip_preprocessing_and_crops():
    photo = _photo(37, 61, 2)
    views, boxes = views_from_originals([torch.from_numpy(photo).permute(2, 0, 1)], 5, 0.6, 0.9, seeds=[3],
                                        out_size=SIDE)
    # CLIP: short side 37 → 16, long side ⌊16 · 61 / 37⌋ = 26, centred 16 × 16 from column round(10 / 2) = 5
    resized = np.asarray(Image.fromarray(photo).resize((26, 16), Image.BICUBIC))[:, 5:21]
    one_level = 1 / 255 / min(CLIP_STD) + 1e-6  # PIL and torch may round a pixel value to neighbouring integers
    torch.testing.assert_close(views[0, 0], _normalised(resized), atol=one_level, rtol=0)
    for view, box in zip(views[0, 1:], boxes[0].long().tolist()):
        torch.testing.assert_close(view, _pil_view(photo, tuple(box), (SIDE, SIDE)), atol=one_level, rtol=0)
    sides = boxes[0, :, 2] - boxes[0, :, 0]
    assert torch.equal(sides, boxes[0, :, 3] - boxes[0, :, 1])
    assert bool(((sides >= 0.6 * 37 - 1) & (sides <= 0.9 * 37)).all())


def test_crops_from_an_original_reach_the_corner_the_batch_cuts_off(tmp_path):
    photo = _photo(37, 61, 3)
    datamodule = _tree(tmp_path, {"cat": [photo]})
    batch = _val_batch(datamodule)
    towers = PixelTowers()
    desc, mask = _text(towers, datamodule.task)
    settings = LaZSLSettings(n_crops=16, eps=0.05)  # sides 0.6-0.9 of the short side, as the reference
    originals = [datamodule.original_image("val", 0)]
    full = score_images(towers, batch["image"], batch["index"], desc, mask, settings, originals=originals)
    cut = score_images(towers, batch["image"], batch["index"], desc, mask, settings)
    x0, y0, x1, y1 = full.boxes[0].T
    assert bool((x1 <= 61).all() and (y1 <= 37).all() and (x0 >= 0).all() and (y0 >= 0).all())
    assert bool(((x0 < CENTRE_X[0]) | (x1 > CENTRE_X[1])).any())  # crops outside the central square
    assert bool(((x0 <= 56.5) & (x1 > 56.5) & (y0 <= 4.5) & (y1 > 4.5)).any())  # a crop holds the object's centre
    assert float(cut.boxes.max()) <= SIDE
    assert not torch.allclose(full.scores, cut.scores, atol=1e-4, rtol=0)


def test_both_paths_agree_on_a_square_image_at_model_size(tmp_path):
    photo = _photo(SIDE, SIDE, 4)
    datamodule = _tree(tmp_path, {"cat": [photo]})
    batch = _val_batch(datamodule)
    original = datamodule.original_image("val", 0)
    seeds = image_seeds(SETTINGS.seed, [0])
    from_original, boxes = views_from_originals([original], 6, 0.4, 0.6, seeds=seeds, out_size=SIDE)
    from_batch, batch_boxes = make_views(batch["image"], 6, 0.4, 0.6, seeds=seeds, out_size=SIDE)
    assert torch.equal(boxes, batch_boxes)
    torch.testing.assert_close(from_original[:, 0], batch["image"], atol=1e-5, rtol=0)  # the image itself
    torch.testing.assert_close(from_batch, from_original, atol=1e-5, rtol=0)  # every view, crops included
    towers = PixelTowers()
    desc, mask = _text(towers, datamodule.task)
    both = [score_images(towers, batch["image"], batch["index"], desc, mask, SETTINGS, originals=originals)
            for originals in ([original], None)]
    for name in ("scores", "dclip_scores", "view_feats", "boxes"):
        torch.testing.assert_close(getattr(both[0], name), getattr(both[1], name), atol=1e-5, rtol=0)


def test_scores_of_an_image_do_not_depend_on_its_batch(tmp_path):
    datamodule = _tree(tmp_path, {"cat": [_photo(37, 61, 5), _photo(16, 16, 6)], "dog": [_photo(50, 23, 7)]})
    datamodule.setup("validate")
    originals = [datamodule.original_image("val", i) for i in range(3)]
    towers = PixelTowers()
    desc, mask = _text(towers, datamodule.task)
    settings = LaZSLSettings(n_crops=4, eps=0.05, max_views=10)  # two images per forward pass

    def scores(order: list[int]) -> torch.Tensor:
        out = score_images(towers, None, torch.tensor(order), desc, mask, settings,
                           originals=[originals[i] for i in order])
        return torch.cat([out.scores, out.dclip_scores], dim=1)

    together = scores([0, 1, 2])
    torch.testing.assert_close(scores([2, 0]), together[[2, 0]], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores([1]), together[[1]], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- callback
@pytest.fixture
def said(monkeypatch) -> list[str]:
    """The callback's log messages (``rank_zero_info``)."""
    messages: list[str] = []
    monkeypatch.setattr(lazsl_module, "rank_zero_info", messages.append)
    return messages


def test_callback_scores_an_image_folder_from_its_originals(tmp_path, said):
    photos = [_photo(37, 61, 8), _photo(45, 33, 9)]
    datamodule = _tree(tmp_path, {"cat": photos}, image_size=32)
    batch = _val_batch(datamodule)
    torch.manual_seed(0)
    module = CLIPFineTune(pretrained=None, input_size=32)
    callback = LaZSL(n_crops=4, split="all")
    trainer = _stub_trainer(datamodule)
    callback.setup(trainer, module, "validate")
    callback.on_validation_epoch_start(trainer, module)
    encoder = module.zero_shot_encoder()
    files = [torch.from_numpy(np.array(Image.open(tmp_path / "val" / "cat" / f"{k}.png"))).permute(2, 0, 1)
             for k in range(2)]
    with evaluating(encoder):
        logged = callback.score(encoder, batch["image"], batch["index"])
        direct = score_images(encoder, None, batch["index"], callback._text, callback._sentences[1],
                              callback.settings, originals=files)
    assert float(logged.boxes[0, :, 2].max()) > 32  # past the batch image's right edge: original pixels
    assert torch.equal(logged.boxes, direct.boxes) and torch.equal(logged.scores, direct.scores)
    assert torch.equal(logged.dclip_scores, direct.dclip_scores)
    assert said == []


def test_callback_without_originals_says_so_once(said, monkeypatch):
    datamodule = _datamodule(val_size=8, batch_size=4)
    datamodule.setup("validate")
    module = CLIPFineTune(pretrained=None, input_size=32)
    monkeypatch.setattr(module, "log_dict", lambda logged: None)
    callback = LaZSL(n_crops=2)
    trainer = _stub_trainer(datamodule)
    callback.setup(trainer, module, "validate")
    for _ in range(2):  # epochs
        callback.on_validation_epoch_start(trainer, module)
        for batch_idx, batch in enumerate(datamodule.val_dataloader()):
            callback.on_validation_batch_end(trainer, module, None, batch, batch_idx)
        callback.on_validation_epoch_end(trainer, module)
    assert len(said) == 1
    assert "resized, centre-cropped validation batch" in said[0]
    assert "ShapesDataModule serves no original images of its 'val' split" in said[0]

    bare = LaZSL(n_crops=2)
    bare.setup(_stub_trainer(SimpleNamespace(task=datamodule.task)), module, "validate")
    assert bare.originals(torch.arange(2)) is None
    assert "SimpleNamespace has no original_image(split, index)" in said[1]


# --------------------------------------------------------------------------------------------- explanations
def test_explanations_are_drawn_on_the_originals(tmp_path):
    photos = [_photo(37, 61, 10), _photo(30, 20, 11)]
    datamodule = _tree(tmp_path, {"cat": photos[:1], "dog": photos[1:]})
    batch = _val_batch(datamodule)
    towers = PixelTowers()
    module = SimpleNamespace(task=datamodule.task, zero_shot_encoder=lambda: towers)
    explain = lazsl_explainer(module, SETTINGS, originals=partial(datamodule.original_image, "val"))
    explained = explain(batch)
    originals = [torch.from_numpy(p).permute(2, 0, 1) for p in photos]
    direct = explain_lazsl(towers, None, batch["index"], datamodule.task, settings=SETTINGS, originals=originals)
    assert torch.equal(explained["logits"], direct["logits"]) and torch.equal(explained["boxes"], direct["boxes"])
    for i, photo in enumerate(photos):
        maps, keep = explained["descriptor_maps"][i], explained["crop_keep"][i]
        assert maps.shape[-2:] == photo.shape[:2]
        assert torch.equal(explained["original_image"][i], originals[i])
        # the normalised maps of all descriptors add up to 1 / N_kept on every covered pixel (regions docstring)
        total = maps.sum(dim=0)
        covered = total > 0
        torch.testing.assert_close(total[covered], torch.full_like(total[covered], 1 / float(keep.sum())),
                                   atol=1e-5, rtol=0)
        figure = render_explanation(batch["image"][i], sample_explanation(explained, i), datamodule.task.class_names)
        shown = figure.axes[0].images[0].get_array()
        assert shown.shape == (*photo.shape[:2], 3) and np.array_equal(np.asarray(shown), photo)
