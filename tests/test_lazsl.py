import csv
import dataclasses
import json
from types import SimpleNamespace

import lightning as L
import ot
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

import xvlm.zeroshot.lazsl as lazsl_module
from datamodules import ShapesDataModule
from datamodules.transforms import CLIP_MEAN, CLIP_STD
from xvlm.methods import CLIPFineTune
from xvlm.prompts import encode_descriptors
from xvlm.zeroshot import (
    LaZSL,
    LaZSLSettings,
    descriptor_sentence,
    descriptor_sentences,
    image_seeds,
    lazsl_scores,
    load_descriptors,
    make_views,
    sample_boxes,
    score_images,
    views_from_originals,
    vision_selection,
)
from xvlm.zeroshot.scorers import awt_scores, wca_scores


# --------------------------------------------------------------------------------------------- scoring
def _features(b, c, n, m, d=16, seed=0):
    """Random (not normalised) features; padded descriptor rows hold garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    crops = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    glob = torch.randn(b, d, generator=g, dtype=torch.float64)
    desc = torch.randn(c, m, d, generator=g, dtype=torch.float64)
    mask = torch.arange(m) < torch.randint(1, m + 1, (c,), generator=g)[:, None]
    mask[0] = True
    return crops, glob, desc, mask


def _direct_loop(crops, glob, desc, mask, theta, eps, select):
    """LaZSL and DCLIP scores written per image and per class, with POT solving each small problem."""
    b, n, _ = crops.shape
    c = len(desc)
    scores, dclip = torch.zeros(b, c, dtype=torch.float64), torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        p_g = glob[i] / glob[i].norm()
        crop_list = [crops[i, k] / crops[i, k].norm() for k in range(n)]
        rho = [float(p @ p_g) for p in crop_list]
        kept = [p for p, r in zip(crop_list, rho) if r >= sum(rho) / n or not select]
        for k in range(c):
            qs = [desc[k, j] / desc[k, j].norm() for j in range(desc.shape[1]) if mask[k, j]]
            g = torch.stack([p_g @ q for q in qs])
            s = torch.stack([torch.stack([p @ q for q in qs]) for p in kept])
            h = theta * s + (1 - theta) * g
            a = torch.full((len(kept),), 1 / len(kept), dtype=torch.float64)
            nu = torch.full((len(qs),), 1 / len(qs), dtype=torch.float64)
            plan = ot.sinkhorn(a, nu, 1 - h, eps, numItermax=100_000, stopThr=1e-13)
            scores[i, k] = (plan * h).sum()
            dclip[i, k] = g.mean()
    return scores, dclip


@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("theta, eps", [(0.8, 0.1), (0.5, 0.02)])
def test_scores_match_a_direct_loop(select, theta, eps):
    crops, glob, desc, mask = _features(3, 4, 6, 5)
    settings = LaZSLSettings(theta=theta, eps=eps, select_crops=select, max_iter=10_000)
    out = lazsl_scores(crops, glob, desc, mask, settings)
    scores, dclip = _direct_loop(crops, glob, desc, mask, theta, eps, select)
    torch.testing.assert_close(out.scores, scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.dclip_scores, dclip, atol=1e-12, rtol=0)


def test_score_is_global_dclip_plus_transported_crop_similarity():
    crops, glob, desc, mask = _features(4, 5, 7, 6, seed=1)
    out = lazsl_scores(crops, glob, desc, mask, LaZSLSettings(theta=0.7))
    similarity = torch.einsum("bnd,cmd->bcnm", F.normalize(crops, dim=-1), F.normalize(desc, dim=-1))
    expected = 0.3 * out.dclip_scores + 0.7 * (out.plans * similarity).sum(dim=(-2, -1))
    torch.testing.assert_close(out.scores, expected, atol=1e-6, rtol=0)


def test_plans_put_no_mass_on_padding_or_dropped_crops():
    crops, glob, desc, mask = _features(3, 6, 8, 5, seed=2)
    out = lazsl_scores(crops, glob, desc, mask)
    assert (~out.crop_keep).any() and (~mask).any()
    assert (out.plans.permute(0, 2, 1, 3)[~out.crop_keep] == 0).all()
    assert (out.plans.permute(1, 3, 0, 2)[~mask] == 0).all()
    column_mass = out.plans.sum(dim=2)
    torch.testing.assert_close(column_mass, (mask / mask.sum(1, keepdim=True)).expand_as(column_mass).double())
    row_mass = out.plans.sum(dim=3)
    expected_rows = out.crop_keep / out.crop_keep.sum(1, keepdim=True)
    # the default tol bounds each kept crop's error relative to its mass
    torch.testing.assert_close(row_mass, expected_rows[:, None, :].expand_as(row_mass).double(), atol=0,
                               rtol=LaZSLSettings.tol)


def test_chunks_over_classes_give_the_same_scores():
    crops, glob, desc, mask = _features(2, 7, 5, 4, seed=3)
    whole = lazsl_scores(crops, glob, desc, mask)
    budget = lazsl_module.PLAN_ENTRY_BYTES * 2 * 5 * 4 * 3 / 2**20  # three classes per chunk
    assert lazsl_module.classes_per_chunk(2, 5, 4, budget) == 3
    assert lazsl_module.classes_per_chunk(2, 5, 4, 2 * budget) == 6
    assert lazsl_module.classes_per_chunk(2, 5, 4, budget / 10) == 1
    chunked = lazsl_scores(crops, glob, desc, mask, LaZSLSettings(memory_budget_mb=budget))
    torch.testing.assert_close(chunked.scores, whole.scores, atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked.plans, whole.plans, atol=1e-12, rtol=0)


def test_vision_selection_keeps_crops_at_or_above_the_mean_cosine():
    cosines = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.3, 0.3, 0.3, 0.3]])
    crops = torch.stack([cosines, (1 - cosines**2).sqrt(), torch.zeros_like(cosines)], dim=-1)
    glob = torch.tensor([[1.0, 0.0, 0.0]] * 2)
    keep = vision_selection(crops, glob)
    assert keep.tolist() == [[True, False, False, True], [True, True, True, True]]
    assert vision_selection(crops, glob, offset=0.5).tolist()[0] == [True, False, False, False]


def test_every_class_needs_a_descriptor():
    crops, glob, desc, mask = _features(1, 2, 3, 2)
    mask[1] = False
    with pytest.raises(ValueError, match="at least one descriptor"):
        lazsl_scores(crops, glob, desc, mask)


# --------------------------------------------------------------------------------------------- views
def test_boxes_are_squares_inside_the_image_with_sides_in_range():
    height, width, alpha, beta = 40, 70, 0.3, 0.8
    boxes = sample_boxes(height, width, 200, alpha, beta, image_seeds(0, range(5)))
    x0, y0, x1, y1 = boxes.unbind(-1)
    side = x1 - x0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert torch.equal(side, y1 - y0)
    assert (side >= alpha * height - 1).all() and (side <= beta * height).all()
    assert side.max() - side.min() > 0.3 * height  # the range is actually used
    assert x0.max() > 0.5 * (width - side.min())  # and the positions


def test_crops_depend_only_on_seed_and_dataset_index():
    first = sample_boxes(64, 64, 8, 0.5, 0.9, image_seeds(1, [5, 7]))
    second = sample_boxes(64, 64, 8, 0.5, 0.9, image_seeds(1, [7, 5, 9]))
    assert torch.equal(first[1], second[0]) and torch.equal(first[0], second[1])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, sample_boxes(64, 64, 8, 0.5, 0.9, image_seeds(2, [5, 7])))


def _normalised_batch(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 pixels as the validation batch holds them: ``(x / 255 − mean) / std``."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (pixels.float() / 255 - mean) / std


@pytest.mark.parametrize(("height", "width"), [(48, 64), (37, 23), (32, 32)])
def test_views_of_a_batch_are_the_views_of_its_originals(height, width):
    """One resampler: the batch path (pixels recovered from the normalised batch) cuts what the originals path cuts,
    also on non-square images of odd sizes."""
    pixels = torch.randint(0, 256, (2, 3, height, width), generator=torch.Generator().manual_seed(height),
                           dtype=torch.uint8)
    seeds = image_seeds(0, [3, 4])
    views, boxes = make_views(_normalised_batch(pixels), 6, 0.3, 0.9, seeds=seeds, out_size=20)
    expected, expected_boxes = views_from_originals(list(pixels), 6, 0.3, 0.9, seeds=seeds, out_size=20)
    assert views.shape == (2, 7, 3, 20, 20) and torch.equal(boxes, expected_boxes)
    torch.testing.assert_close(views, expected, atol=1e-5, rtol=0)


def test_a_view_at_native_size_is_the_pixel_box():
    pixels = torch.randint(0, 256, (2, 3, 40, 50), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = _normalised_batch(pixels)
    views, boxes = make_views(image, 3, 0.8, 0.8, seeds=image_seeds(0, [0, 1]), out_size=32)
    for b in range(2):
        for n, (x0, y0, x1, y1) in enumerate(boxes[b].long().tolist()):
            torch.testing.assert_close(views[b, 1 + n], image[b, :, y0:y1, x0:x1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- descriptors
@pytest.mark.parametrize("descriptor, sentence", [
    ("a long beak", "which is a long beak"),
    ("an orange bill", "which is an orange bill"),
    ("antennae", "which has antennae"),
    ("has webbed feet", "which has webbed feet"),
    ("hasty movement", "which has hasty movement"),
    ("often found in water", "which often found in water"),
    ("can fly", "which can fly"),
    ("canopy of leaves", "which has canopy of leaves"),
    ("used for cutting", "which is used for cutting"),
    ("red colour", "which has red colour"),
])
def test_descriptor_sentence_tests_the_first_word(descriptor, sentence):
    assert descriptor_sentence(descriptor) == sentence


def test_descriptor_sentences_pad_and_fall_back_to_the_class_name():
    descriptors = {"red_star": ["five points", "a red colour"], "donuts": [], "cat": ["whiskers"]}
    sentences, mask = descriptor_sentences(["donuts", "red_star", "cat"], descriptors, suffix=".")
    assert sentences == [["donuts.", ""], ["red star, which has five points.", "red star, which is a red colour."],
                         ["cat, which has whiskers.", ""]]
    assert mask.tolist() == [[True, False], [True, True], [True, False]]
    with pytest.raises(ValueError, match="2 class.*: dog, bird"):
        descriptor_sentences(["dog", "cat", "bird"], descriptors)


def test_load_descriptors_keeps_file_order_or_the_given_classes(tmp_path):
    path = tmp_path / "descriptors_toy.json"
    path.write_text(json.dumps({"zebra": ["stripes"], "apple": ["red colour", "a stem"], "cat": []}))
    assert list(load_descriptors(path)) == ["zebra", "apple", "cat"]
    chosen = load_descriptors(path, ["cat", "zebra"])
    assert chosen == {"cat": [], "zebra": ["stripes"]} and list(chosen) == ["cat", "zebra"]
    with pytest.raises(ValueError, match=r"descriptors_toy\.json has no descriptors for 2 class.*dog, emu"):
        load_descriptors(path, ["apple", "dog", "emu"])


@pytest.mark.parametrize("content", ['["a", "b"]', '{"cat": "whiskers"}', '{"cat": [1, 2]}'])
def test_load_descriptors_refuses_other_layouts(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"bad\.json: a descriptor file must be"):
        load_descriptors(path)


# --------------------------------------------------------------------------------------------- callback
def _datamodule(task="attributes", **kwargs):
    settings = dict(image_size=32, batch_size=16, train_size=16, val_size=32, augment=False) | kwargs
    return ShapesDataModule(task=task, **settings)


def _logged_rows(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_callback_logs_unseen_metrics_every_epoch(tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="csv"),
                        callbacks=[LaZSL(n_crops=4)], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_train_batches=1, num_sanity_val_steps=1)
    trainer.fit(CLIPFineTune(pretrained=None, input_size=32, freeze="text"), _datamodule())
    for key in ("unseen_top1", "dclip_unseen_top1", "unseen_top1_micro", "dclip_unseen_top1_micro"):
        assert 0 <= float(trainer.callback_metrics[f"lazsl/{key}"]) <= 1
    assert "lazsl/H" not in trainer.callback_metrics
    epochs = [row["epoch"] for row in _logged_rows(trainer) if row.get("lazsl/unseen_top1")]
    assert epochs == ["0", "1"]


def test_callback_gzsl_mode_under_validate():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LaZSL(n_crops=3, split="all")])
    trainer.validate(CLIPFineTune(pretrained=None, input_size=32), _datamodule("compositions", val_size=16))
    for key in ("S", "U", "H", "unseen_top1", "unseen_top1_micro", "dclip_S", "dclip_U", "dclip_H", "dclip_unseen_top1",
                "dclip_unseen_top1_micro"):
        assert 0 <= float(trainer.callback_metrics[f"lazsl/{key}"]) <= 1


def test_micro_top1_is_the_share_of_unseen_images_predicted_right():
    datamodule = _datamodule(val_size=48)
    torch.manual_seed(0)
    module = CLIPFineTune(pretrained=None, input_size=32)
    callback = LaZSL(n_crops=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.validate(module, datamodule)
    # directly: every validation image of an unseen class, argmax over the unseen classes, one count over all
    task = datamodule.task
    unseen = torch.tensor(task.unseen)
    encoder = module.zero_shot_encoder().eval()
    sentences, mask = descriptor_sentences([task.class_names[k] for k in task.unseen], task.descriptors)
    hits, total = {"": 0, "dclip_": 0}, 0
    with torch.no_grad():
        text = encode_descriptors(encoder, sentences, mask)
        for batch in datamodule.val_dataloader():
            member = torch.isin(batch["label"], unseen)
            out = score_images(encoder, batch["image"][member], batch["index"][member], text, mask, callback.settings)
            for prefix, scores in (("", out.scores), ("dclip_", out.dclip_scores)):
                hits[prefix] += int((unseen[scores.argmax(dim=1)] == batch["label"][member]).sum())
            total += int(member.sum())
    assert total > 0
    for prefix, count in hits.items():
        logged = trainer.callback_metrics[f"lazsl/{prefix}unseen_top1_micro"]
        assert float(logged) == pytest.approx(count / total, abs=1e-6)


def test_every_scorer_is_scored_on_the_lazsl_views_and_logged_side_by_side():
    datamodule = _datamodule(val_size=48)
    torch.manual_seed(0)
    module = CLIPFineTune(pretrained=None, input_size=32)
    callback = LaZSL(n_crops=3, scorers=["wca", "awt"])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.validate(module, datamodule)
    # directly: the crops of score_images, every crop (no vision selection), the name prompts of NAME_TEMPLATE
    task = datamodule.task
    unseen = torch.tensor(task.unseen)
    names = [task.class_names[k] for k in task.unseen]
    encoder = module.zero_shot_encoder().eval()
    sentences, mask = descriptor_sentences(names, task.descriptors)
    hits, total = {"wca": 0, "awt": 0}, 0
    with torch.no_grad():
        text = encode_descriptors(encoder, sentences, mask)
        name_feats = encoder.encode_texts([f"a photo of a {name}." for name in names])
        for batch in datamodule.val_dataloader():
            member = torch.isin(batch["label"], unseen)
            images, indices = batch["image"][member], batch["index"][member]
            views, _ = make_views(images, 3, callback.settings.alpha, callback.settings.beta,
                                  seeds=image_seeds(callback.settings.seed, indices.tolist()), out_size=32)
            feats = encoder.encode_image(views.flatten(0, 1)).view(*views.shape[:2], -1)
            for name, scorer in (("wca", wca_scores), ("awt", awt_scores)):
                scores = scorer(feats[:, 1:], feats[:, 0], text, mask, name_feats)
                hits[name] += int((unseen[scores.argmax(dim=1)] == batch["label"][member]).sum())
            total += int(member.sum())
    for name, count in hits.items():
        logged = trainer.callback_metrics[f"lazsl/{name}_unseen_top1_micro"]
        assert float(logged) == pytest.approx(count / total, abs=1e-6)
        assert 0 <= float(trainer.callback_metrics[f"lazsl/{name}_unseen_top1"]) <= 1
    assert not any(key.startswith(("lazsl/unseen", "lazsl/dclip")) for key in trainer.callback_metrics)  # not listed
    choices = r"choose from \['lazsl', 'dclip', 'wca', 'awt'\]"
    with pytest.raises(ValueError, match=r"scorers=\['wca', 'clip'\]: unknown \['clip'\]; " + choices):
        LaZSL(scorers=["wca", "clip"])
    with pytest.raises(ValueError, match=r"scorers=\[\]: empty; " + choices):
        LaZSL(scorers=[])


def test_micro_top1_counts_images_where_the_per_class_mean_counts_classes(monkeypatch):
    datamodule = _datamodule()
    datamodule.setup("validate")
    first, second = datamodule.task.unseen[:2]
    seen = datamodule.task.seen[0]
    module = CLIPFineTune(pretrained=None, input_size=32)
    logged = {}
    monkeypatch.setattr(module, "log_dict", logged.update)
    callback = LaZSL(n_crops=2)
    trainer = _stub_trainer(datamodule)
    callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_start(trainer, module)
    n_unseen = len(datamodule.task.unseen)

    def predict_first(encoder, images, indices):  # LaZSL picks the first unseen class, DCLIP the second
        scores = torch.zeros(len(images), n_unseen)
        scores[:, 0] = 1
        return lazsl_module.LaZSLOutput(scores=scores, dclip_scores=scores.roll(1, dims=1), contributions=scores,
                                        plans=None, crop_keep=torch.ones(len(images), 2, dtype=torch.bool))

    monkeypatch.setattr(callback, "score", predict_first)
    for labels in ([first, first, seen, first], [second]):  # the seen-class image is not scored
        batch = {"image": torch.zeros(len(labels), 3, 32, 32), "label": torch.tensor(labels),
                 "index": torch.arange(len(labels))}
        callback.on_validation_batch_end(trainer, module, None, batch, 0)
    callback.on_validation_epoch_end(trainer, module)
    assert float(logged["lazsl/unseen_top1_micro"]) == pytest.approx(3 / 4)  # 3 of 4 images
    assert float(logged["lazsl/unseen_top1"]) == pytest.approx(1 / 2)  # 1 of 2 classes
    assert float(logged["lazsl/dclip_unseen_top1_micro"]) == pytest.approx(1 / 4)
    assert float(logged["lazsl/dclip_unseen_top1"]) == pytest.approx(1 / 2)


def test_callback_skips_a_module_without_zero_shot_encoder():
    module = SimpleNamespace(zero_shot_encoder=lambda: None)
    datamodule = _datamodule()
    datamodule.setup("validate")
    trainer = _stub_trainer(datamodule)
    callback = LaZSL(n_crops=2)
    with pytest.warns(UserWarning, match="LaZSL is skipped: SimpleNamespace has no zero-shot encoder"):
        callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_end(trainer, module, None, next(iter(datamodule.val_dataloader())), 0)
    callback.on_validation_epoch_end(trainer, module)  # nothing scored, nothing logged (the stub cannot log)


def _stub_trainer(datamodule, epoch=0, sanity_checking=False):
    return SimpleNamespace(datamodule=datamodule, sanity_checking=sanity_checking, current_epoch=epoch,
                           state=SimpleNamespace(fn=TrainerFn.FITTING))


def _scored_samples(callback, module, trainer, batch):
    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    return int(callback._metrics[""].total.sum())


def test_callback_restores_modes_skips_sanity_checks_and_honours_every_n_epochs():
    datamodule = _datamodule()
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    n_unseen = int(torch.isin(batch["label"], torch.tensor(datamodule.task.unseen)).sum())
    assert 0 < n_unseen < len(batch["label"])
    module = CLIPFineTune(pretrained=None, input_size=32).train()
    module.backbone.clip.visual.conv1.eval()
    callback = LaZSL(n_crops=4, every_n_epochs=2)
    callback.setup(_stub_trainer(datamodule), module, "fit")
    assert _scored_samples(callback, module, _stub_trainer(datamodule, epoch=1, sanity_checking=True), batch) == 0
    assert _scored_samples(callback, module, _stub_trainer(datamodule, epoch=0), batch) == 0
    assert _scored_samples(callback, module, _stub_trainer(datamodule, epoch=1), batch) == n_unseen
    assert module.training and module.backbone.clip.visual.training
    assert not module.backbone.clip.visual.conv1.training


def test_crops_follow_the_dataset_index_not_the_batch_position():
    datamodule = _datamodule()
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    module = CLIPFineTune(pretrained=None, input_size=32)
    callback = LaZSL(n_crops=4)
    trainer = _stub_trainer(datamodule)
    callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_start(trainer, module)
    encoder = module.zero_shot_encoder().eval()
    with torch.no_grad():
        pair = callback.score(encoder, batch["image"][:2], batch["index"][:2])
        alone = callback.score(encoder, batch["image"][1:2], batch["index"][1:2])
        again = callback.score(encoder, batch["image"][1:2], batch["index"][1:2])
    assert torch.equal(pair.boxes[1], alone.boxes[0]) and not torch.equal(pair.boxes[0], pair.boxes[1])
    assert torch.equal(alone.scores, again.scores)
    torch.testing.assert_close(pair.dclip_scores[1:], alone.dclip_scores, atol=1e-6, rtol=0)


def test_callback_names_what_the_task_lacks():
    module = CLIPFineTune(pretrained=None, input_size=32)
    datamodule = _datamodule()
    datamodule.task = dataclasses.replace(datamodule.task, descriptors=None)
    with pytest.raises(ValueError, match=r"LaZSL needs descriptors; ShapesDataModule\(task='attributes'\) has none"):
        LaZSL().setup(_stub_trainer(datamodule), module, "fit")
    with pytest.raises(ValueError, match=r"LaZSL\(split='unseen'\) needs unseen; .*task='objects'"):
        LaZSL().setup(_stub_trainer(_datamodule("objects")), module, "fit")
    partial = _datamodule()
    partial.task = dataclasses.replace(partial.task, descriptors={"no such class": ["red colour"]})
    with pytest.raises(ValueError, match=r"LaZSL: ShapesDataModule\(task='attributes'\) has no descriptors for 64"):
        LaZSL().setup(_stub_trainer(partial), module, "fit")


@pytest.mark.slow
def test_lazsl_beats_chance_on_unseen_classes_with_the_pretrained_backbone():
    datamodule = ShapesDataModule(task="attributes", image_size=64, batch_size=64, val_size=512)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[LaZSL(n_crops=16)])
    trainer.validate(CLIPFineTune(pretrained="shapes"), datamodule)
    chance = 1 / len(datamodule.task.unseen)
    assert float(trainer.callback_metrics["lazsl/unseen_top1"]) > 3 * chance
    assert float(trainer.callback_metrics["lazsl/dclip_unseen_top1"]) > 3 * chance
