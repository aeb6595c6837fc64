"""MSCI: step 0 is the frozen CLIP, only MSCI's own parts learn, layer selection at any depth, the prompts against
CLIP's own text encoding, chunked open-world scoring, bf16, the feasibility formula, and checkpoints that hold the
trainable weights and refuse another head count."""

import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import ShapesDataModule
from xvlm.backbones import VisionLanguageModel
from xvlm.methods import MSCI
from xvlm.methods.msci import BottleneckAdapter, block_selection, feasibility_scores
from xvlm.metrics import czsl_report
from xvlm.prompts import PrimitivePrompts

SMALL = dict(image_size=32, batch_size=8, train_size=16, val_size=16, test_size=16, num_workers=0, augment=False)
TINY = dict(pretrained=None, input_size=32, low_layers=2, high_layers=2, cal_heads=4)


def _msci(**options) -> tuple[MSCI, ShapesDataModule]:
    torch.manual_seed(0)
    data = ShapesDataModule(task="compositions", **SMALL)
    model = MSCI(**(TINY | options))
    model.attach_task(data.task)
    return model, data


def _batch(data: ShapesDataModule, split: str = "train", count: int = 8) -> dict[str, torch.Tensor]:
    dataset = data.build_dataset(split)
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])


def test_step_zero_image_features_are_the_frozen_clips():
    model, data = _msci()
    images = _batch(data)["image"]
    frozen = VisionLanguageModel("xvlm-tiny", pretrained=None, image_size=32)
    frozen.load_state_dict({k: v for k, v in model.backbone.state_dict().items() if "adapter" not in k})
    adapters = list(model.backbone.adapter_modules())
    assert len(adapters) == 2 * 4 and all(isinstance(a, BottleneckAdapter) for a in adapters)
    model.eval(), frozen.eval()  # the conv stem's BatchNorm
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.encode_image(images), frozen.encode_image(images))
        torch.testing.assert_close(model.image_levels(images).embedding, frozen.encode_image(images, normalize=False))


def test_only_msci_parts_get_gradients_and_every_one_of_them_does():
    model, data = _msci()
    model.train()
    model.losses(_batch(data))["loss"].backward()
    adapters = {id(p) for p in model.backbone.adapter_parameters()}
    for name, param in model.backbone.named_parameters():
        if id(param) in adapters:  # every adapter is in the graph; at step 0 only W_up moves (W_up = 0 blocks W_down)
            assert param.grad is not None and (param.grad.abs().sum() > 0) == (".up." in name), name
        else:
            assert not param.requires_grad and param.grad is None, name  # CLIP's towers and logit scale
    stem = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert stem and not any(m.training for m in stem)  # a frozen conv stem keeps its statistics in training
    own = [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert own and all(p.grad is not None for _, p in own), [n for n, p in own if p.grad is None]


def test_layer_selection_on_a_4_and_a_12_block_tower():
    assert block_selection(2, 4, "low_layers", end=False) == (0, 1)
    assert block_selection(2, 4, "high_layers", end=True) == (2, 3)
    assert block_selection(4, 12, "high_layers", end=True) == (8, 9, 10, 11)
    assert block_selection([-1, 0, 5], 12, "low_layers", end=False) == (0, 5, 11)
    with pytest.raises(ValueError, match="high_layers=5: the image tower has depth 4"):
        block_selection(5, 4, "high_layers", end=True)
    with pytest.raises(ValueError, match=r"low_layers=\[12\].*depth 12"):
        block_selection([12], 12, "low_layers", end=False)
    data = ShapesDataModule(task="compositions", **SMALL)
    model = MSCI(model="ViT-B-32", pretrained=None, input_size=64, low_layers=[0, 3], high_layers=4, cal_heads=8)
    assert model.low_blocks == (0, 3) and model.high_blocks == (8, 9, 10, 11)
    model.attach_task(data.task)
    model.eval()
    with torch.no_grad():
        levels = model.image_levels(torch.randn(2, 3, 64, 64))
    assert levels.low.shape == levels.high.shape == (2, 1 + 4, 512)
    with pytest.raises(ValueError, match="low_layers=12: the image tower has depth 4"):
        MSCI(**(TINY | {"low_layers": 12}))
    with pytest.raises(ValueError, match="cal_heads=12 does not divide the joint dimension 128"):
        MSCI(**(TINY | {"cal_heads": 12}))


def test_intermediate_blocks_are_projected_through_the_last_layernorm_and_projection():
    model, data = _msci(low_layers=1, high_layers=[1])
    images = _batch(data)["image"]
    model.eval()
    with torch.no_grad():
        tokens = model.backbone.run_blocks(model.backbone.embed_patches(images), layers=[0, 1]).tokens
        visual = model.backbone.image_tower
        levels = model.image_levels(images)
    torch.testing.assert_close(levels.low, visual.ln_post(tokens[0]) @ visual.proj)  # one block passes through
    torch.testing.assert_close(levels.high, visual.ln_post(tokens[1]) @ visual.proj)


def test_untrained_prompts_of_single_token_names_are_clips_encoding_of_the_sentence():
    backbone = VisionLanguageModel("xvlm-tiny", pretrained=None).eval()
    prompts = PrimitivePrompts(backbone, ["red", "Faux.Fur"], ["star", "traffic_light"])
    assert all(len(backbone.tokenize([w])[0].nonzero()) == 3 for w in ("red", "star"))  # start, word, end
    with torch.no_grad():
        pair = prompts.encode(backbone, "pair", torch.tensor([[0, 2]]))
        state = prompts.encode(backbone, "state", torch.tensor([[0]]))
        expected = backbone.encode_texts(["a photo of red star", "a photo of red"])
        torch.testing.assert_close(torch.cat([pair, state]), expected, rtol=1e-4, atol=1e-5)
        words = backbone.token_embeddings(backbone.tokenize(["faux fur"]))[0, 1:3]
    torch.testing.assert_close(prompts.vocab[1], words.mean(dim=0))  # a multi-word primitive: the mean embedding


def test_chunked_open_world_scores_equal_unchunked_ones():
    model, data = _msci(pair_chunk=64)
    images = _batch(data, "val")["image"]
    model.eval()
    with torch.no_grad():
        whole = model.score(images)
        model.hparams.pair_chunk = 5
        model._class_text = None
        chunked = model.score(images)
    assert whole.pair.shape == (8, 64)
    torch.testing.assert_close(chunked.pair, whole.pair)
    torch.testing.assert_close(chunked.primitive, whole.primitive)
    combined = whole.combined((0.3, 0.7, 0.7))
    states, objects = whole.states[:, model.pair_states], whole.objects[:, model.pair_objects]
    direct = 0.3 * whole.pair + (0.7 * states) * (0.7 * objects)
    torch.testing.assert_close(combined, direct)


def test_training_under_bf16_autocast_keeps_float32_logits_and_a_finite_loss():
    model, data = _msci()
    batch = _batch(data)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.losses(batch)
        levels = model.image_levels(batch["image"])
        logits = model.branch_logits(F.normalize(levels.embedding.float(), dim=-1),
                                     model.encode_prompts(model.seen_classes).pairs, levels)
    assert levels.low.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_feasibility_is_the_mean_of_the_two_nearest_seen_partner_similarities_as_a_loop_computes():
    generator = torch.Generator().manual_seed(0)
    states, objects = torch.randn(4, 6, generator=generator), torch.randn(5, 6, generator=generator)
    seen = torch.rand(4, 5, generator=generator) < 0.4
    seen[3] = False  # a state never seen: its object side counts -1
    got = feasibility_scores(states, objects, seen).view(4, 5)
    cos = F.cosine_similarity
    for a in range(4):
        for o in range(5):
            if seen[a, o]:
                continue
            object_side = max([float(cos(objects[o], objects[p], dim=0)) for p in range(5) if seen[a, p]], default=-1)
            state_side = max([float(cos(states[a], states[s], dim=0)) for s in range(4) if seen[s, o]], default=-1)
            assert got[a, o] == pytest.approx(0.5 * (object_side + state_side), abs=1e-5)
    assert torch.all(got[seen] >= got[~seen].max() - 1e-6)


def test_checkpoints_hold_the_trainable_weights_and_restore_the_whole_model(tmp_path):
    model, data = _msci(pretrained="shapes")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    model.weights_choice = (0.3, 0.7, 0.7)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    stored = checkpoint["state_dict"]
    assert not any(k.startswith("backbone.clip.transformer") or "token_embedding" in k for k in stored)
    assert any("adapter" in k for k in stored)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for v in stored.values()) < 1.2 * trainable
    torch.save(checkpoint, tmp_path / "msci.ckpt")
    loaded = torch.load(tmp_path / "msci.ckpt", weights_only=True)
    fresh, _ = _msci(pretrained="shapes")
    fresh.on_load_checkpoint(loaded)
    fresh.load_state_dict(loaded["state_dict"])
    assert fresh.weights_choice == (0.3, 0.7, 0.7)
    images = _batch(data, "val")["image"]
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.classify(images), model.classify(images))
    other, _ = _msci(pretrained="shapes", cal_heads=8)
    with pytest.raises(ValueError, match="cal_heads=4.*cal_heads: 4"):
        other.on_load_checkpoint(torch.load(tmp_path / "msci.ckpt", weights_only=True))


def _scores(model: MSCI, data: ShapesDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _batch(data, split, 16)
    with torch.no_grad():
        return model.score(batch["image"]), batch["label"]


def test_validation_chooses_weights_and_threshold_and_test_applies_them_unchanged():
    grid = [(1.0, 0.0, 0.0), (0.0, 1.0, 1.0), (0.3, 0.7, 0.7)]
    model, data = _msci(weight_grid=grid)
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    trainer = L.Trainer(**options)
    trainer.validate(model, data, verbose=False)
    model.eval()
    scores, labels = _scores(model, data, "val")
    task = data.task
    closed = model.seen_pairs.clone()
    closed[list(task.val_pairs)] = True
    aucs = [float(czsl_report(scores.combined(w), labels, model.seen_pairs, closed)["auc"]) for w in grid]
    assert model.weights_choice == grid[aucs.index(max(aucs))]
    assert float(trainer.callback_metrics["val/czsl_auc"]) == pytest.approx(max(aucs))
    assert float(trainer.callback_metrics["val/w_pair"]) == pytest.approx(model.weights_choice[0])
    chosen = (model.weights_choice, model.open_world_choice, model.threshold_choice)
    (tested,) = L.Trainer(**options).test(model, data, verbose=False)
    assert (model.weights_choice, model.open_world_choice, model.threshold_choice) == chosen  # test chooses nothing
    scores, labels = _scores(model, data, "test")
    closed = model.seen_pairs.clone()
    closed[list(task.test_pairs)] = True
    expected = czsl_report(scores.combined(model.weights_choice), labels, model.seen_pairs, closed)
    assert tested["test/czsl_auc"] == pytest.approx(float(expected["auc"]))
    in_space = model.seen_pairs | (model.feasibility >= model.threshold_choice)
    expected = czsl_report(scores.combined(model.open_world_choice), labels, model.seen_pairs, in_space)
    assert tested["test/ow_czsl_auc"] == pytest.approx(float(expected["auc"]))


def test_the_global_feature_ablation_has_no_stages_and_scores_every_pair():
    model, data = _msci(interaction=False)
    assert not hasattr(model, "stages") and not hasattr(model, "fusion")
    model.train()
    loss = model.losses(_batch(data))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.prompts.vocab.grad is not None
    model.eval()
    scores, _ = _scores(model, data, "val")
    assert scores.pair.shape == (16, 64) and torch.isfinite(scores.pair).all()


def test_a_task_without_every_pair_in_state_major_order_is_refused_for_the_open_world():
    model, data = _msci()
    task = data.task
    shuffled = dataclasses.replace(task, pairs=task.pairs[::-1], class_names=task.class_names[::-1])
    with pytest.raises(ValueError, match="not every \\(state, object\\) in state-major order"):
        model.attach_task(shuffled)
    given = dataclasses.replace(shuffled, extras={"feasibility": torch.zeros(len(task.pairs))})
    model.attach_task(given)  # a feasibility file's order is the task's own: no order needed
    assert torch.equal(model.feasibility, torch.zeros(64))
