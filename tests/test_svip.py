"""SVIP: the patch-raster math against direct loops, the replacement, the losses, the warm-up schedule, the
calibration chosen on validation only, and the kept patches against the Shapes masks."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import ShapesDataModule
from datamodules.task import Task
from xvlm.methods import SVIP
from xvlm.methods.svip import (
    decorrelation_loss,
    divergence,
    keep_precision,
    load_word_vectors,
    pooled_attributes,
    rollout_targets,
)
from xvlm.metrics import GZSLMetrics
from xvlm.patches import (
    attention_rollout,
    group_superpatches,
    superpatch_index,
    superpatch_scores,
    ungroup_superpatches,
)


def _stochastic(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


# ------------------------------------------------------------------------------------------ patch-raster math
def test_attention_rollout_is_the_product_of_half_attention_half_identity_written_as_loops():
    layers, batch, tokens = 3, 2, 5
    attention = _stochastic(layers, batch, tokens, tokens)
    got = attention_rollout(attention)
    for b in range(batch):
        rollout = [[float(q == k) for k in range(tokens)] for q in range(tokens)]
        for layer in range(layers):
            mixed = [[0.5 * float(attention[layer, b, q, k]) + 0.5 * (q == k) for k in range(tokens)]
                     for q in range(tokens)]
            rollout = [[sum(mixed[q][j] * rollout[j][k] for j in range(tokens)) for k in range(tokens)]
                       for q in range(tokens)]
        torch.testing.assert_close(got[b], torch.tensor(rollout), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(batch, tokens))  # still row-stochastic


def test_superpatches_group_two_by_two_blocks_of_the_raster_as_a_loop_does():
    grid, size, width = (6, 4), 2, 3
    tokens = torch.randn(2, 24, width)
    scores = torch.randn(2, 24)
    grouped, means = group_superpatches(tokens, grid, size), superpatch_scores(scores, grid, size)
    assert grouped.shape == (2, 6, 4 * width) and means.shape == (2, 6)
    for b in range(2):
        for i in range(grid[0]):
            for j in range(grid[1]):
                g, k = (i // size) * (grid[1] // size) + j // size, (i % size) * size + j % size
                torch.testing.assert_close(grouped[b, g, k * width : (k + 1) * width], tokens[b, i * grid[1] + j])
        for g in range(6):
            members = [i * grid[1] + j for i in range(grid[0]) for j in range(grid[1])
                       if (i // size) * (grid[1] // size) + j // size == g]
            assert math.isclose(float(means[b, g]), float(scores[b, members].mean()), rel_tol=1e-5, abs_tol=1e-6)
    assert torch.equal(ungroup_superpatches(grouped, grid, size), tokens)
    with pytest.raises(ValueError, match="do not tile the 6x4 patch grid"):
        superpatch_scores(scores, grid, 4)


def test_superpatch_index_of_pixels_follows_the_patch_grid_on_a_non_square_image():
    index = superpatch_index((12, 20), (6, 10), 2)  # 2-px patches, super-patches of 4x4 px
    for y in range(12):
        for x in range(20):
            assert int(index[y, x]) == (y // 4) * 5 + x // 4


def test_a_rollout_peak_at_one_patch_keeps_the_two_by_two_group_that_holds_it():
    grid, tokens = (4, 4), 17
    for patch in (0, 5, 10, 15, 6):
        attention = torch.full((2, 1, tokens, tokens), 0.01)
        attention[:, 0, 0, 1 + patch] = 5.0  # the class token attends to one patch in every block
        attention = attention / attention.sum(dim=-1, keepdim=True)
        kept, relevance = rollout_targets(attention, grid, keep=1)
        i, j = divmod(patch, 4)
        expected = (i // 2) * 2 + j // 2
        assert kept[0].nonzero().flatten().tolist() == [expected]
        assert int(relevance[0].argmax()) == expected


# ------------------------------------------------------------------------------------------ the module
@pytest.fixture(scope="module")
def shapes() -> ShapesDataModule:
    return ShapesDataModule(task="attributes", batch_size=8, train_size=16, val_size=16, test_size=16)


def make_svip(shapes: ShapesDataModule, **kwargs) -> SVIP:
    torch.manual_seed(0)
    module = SVIP(pretrained=None, **kwargs)
    module.attach_task(shapes.task)
    return module


@pytest.fixture(scope="module")
def batch(shapes) -> dict:
    shapes.setup("fit")
    return next(iter(shapes.loader("val", sharded=False)))


def test_replacement_changes_the_input_tokens_of_the_unrelated_superpatches_only(shapes, batch):
    module = make_svip(shapes)
    patches = module.backbone.embed_patches(batch["image"]).tokens
    kept = torch.zeros(len(patches), 16, dtype=torch.bool)
    kept[:, [0, 5, 6, 15]] = True
    changed = module.contextualise(patches, kept) - patches
    e = module.context_embedding()  # [4, W]: one vector per sub-patch
    for n in range(64):
        i, j = divmod(n, 8)
        g, k = (i // 2) * 4 + j // 2, (i % 2) * 2 + j % 2
        for b in range(len(patches)):
            expected = torch.zeros_like(e[k]) if kept[b, g] else e[k]
            torch.testing.assert_close(changed[b, n], expected, rtol=1e-5, atol=1e-6)


def test_at_zero_embedding_inference_is_the_plain_tower(shapes, batch):
    module = make_svip(shapes).eval()
    for layer in (module.word_to_patch, module.attribute_to_subpatch):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    with torch.no_grad():
        out = module.infer(batch["image"])
        plain = module.backbone.encode_image_tokens(batch["image"], layers=1).patches[-1]
        tokens = group_superpatches(module.backbone.norm_tokens(plain), module.grid, 2)
        expected = module.attribute_head(tokens).mean(dim=1)
    torch.testing.assert_close(out.attributes, expected, rtol=1e-5, atol=1e-5)
    prototypes = F.normalize(shapes.task.attributes, dim=1)
    torch.testing.assert_close(out.logits, 5.0 * expected @ prototypes.T, rtol=1e-5, atol=1e-5)
    assert int(out.kept.sum(dim=1).unique()) == module.keep == 13  # round(0.8 * 16)


def test_divergence_and_decorrelation_against_their_formulas():
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    p, q = (student / 20).softmax(1), (teacher / 20).softmax(1)
    kl = 400 * sum(float(p[b, c] * math.log(p[b, c] / q[b, c])) for b in range(4) for c in range(6)) / 24
    assert math.isclose(float(divergence(student, teacher, "kl", 20.0)), kl, rel_tol=1e-4)
    m = 0.5 * (p + q)
    js = 400 * 0.5 * float((p * (p / m).log()).mean() + (q * (q / m).log()).mean())
    assert math.isclose(float(divergence(student, teacher, "jsd", 20.0)), js, rel_tol=1e-4)
    assert math.isclose(float(divergence(teacher, student, "jsd", 20.0)), js, rel_tol=1e-4)  # symmetric
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the shipped GPU configs' precision: computed in float32
        assert math.isclose(float(divergence(student.bfloat16(), teacher.bfloat16(), "kl", 20.0)), kl, rel_tol=0.05)
    attributes = torch.randn(5, 7)
    groups = ((0, 1, 2), (3,), (4, 5, 6))
    expected = sum(sum(math.sqrt(sum(float(attributes[b, k]) ** 2 for k in g)) for b in range(5)) / 5
                   for g in groups) / 3
    assert math.isclose(float(decorrelation_loss(attributes, groups)), expected, rel_tol=1e-5)


def test_pooling_over_chosen_tokens():
    scores = torch.randn(2, 4, 3)
    chosen = torch.tensor([[True, False, True, False], [False, False, False, True]])
    torch.testing.assert_close(pooled_attributes(scores, chosen, "mean")[0], scores[0, [0, 2]].mean(0))
    torch.testing.assert_close(pooled_attributes(scores, chosen, "max")[1], scores[1, 3])
    torch.testing.assert_close(pooled_attributes(scores, None, "mean"), scores.mean(1))


def test_losses_train_every_part_and_score_seen_classes_only(shapes):
    module = make_svip(shapes)
    shapes.setup("fit")
    train = next(iter(shapes.loader("train", sharded=False)))
    out = module.losses(train)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name, part in (("selector", module.selector), ("W2P", module.word_to_patch), ("P2A", module.attribute_head)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
    blocks = module.backbone.clip.visual.transformer.resblocks
    assert blocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert module.backbone.logit_scale.grad is None and module.backbone.clip.visual.proj.grad is None
    target = module.seen_targets(train)
    assert int(target.max()) < len(shapes.task.seen)


def test_keep_precision_against_a_pixel_loop():
    kept = torch.tensor([[True, False, False, True]])
    mask = torch.zeros(1, 6, 10, dtype=torch.bool)
    mask[0, :4, :7] = True
    precision, share, recall = keep_precision(kept, mask, (2, 2), size=1)  # 4 "super-patches" of 3x5 pixels
    index = superpatch_index((6, 10), (2, 2), 1)
    on = [(y, x) for y in range(6) for x in range(10) if kept[0, index[y, x]]]
    hits = sum(bool(mask[0, y, x]) for y, x in on)
    assert math.isclose(float(precision[0]), hits / len(on), rel_tol=1e-6)
    assert math.isclose(float(share[0]), 28 / 60, rel_tol=1e-6)
    assert math.isclose(float(recall[0]), hits / 28, rel_tol=1e-6)


def test_word_vectors_from_a_file_and_their_errors(shapes, tmp_path):
    count = len(shapes.task.attribute_names)
    good = tmp_path / "w2v.pt"
    torch.save(torch.randn(count, 30), good)
    module = make_svip(shapes, word_vectors=str(good))
    assert module.word_vectors.shape == (count, 30) and module.word_to_patch.in_features == 30
    torch.save(torch.randn(count + 1, 30), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=rf"bad.pt holds \({count + 1}, 30\); expected \[{count}, Dw\]"):
        load_word_vectors(str(tmp_path / "bad.pt"), count)
    with pytest.raises(ValueError, match="missing.npy not found"):
        load_word_vectors(str(tmp_path / "missing.npy"), count)


def test_bad_settings_name_the_option(shapes):
    with pytest.raises(ValueError, match="keep=16: keeps 16 of the 16 super-patches"):
        SVIP(pretrained=None, keep=16)
    with pytest.raises(ValueError, match="divergence='l2'"):
        SVIP(pretrained=None, divergence="l2")
    with pytest.raises(ValueError, match="VisionTransformer image tower; image_encoder='timm:resnet18'"):
        SVIP(pretrained=None, image_encoder="timm:resnet18", input_size=64)
    plain = Task(source="Plain()", class_names=("a", "b"), seen=(0,), unseen=(1,))
    with pytest.raises(ValueError, match="SVIP needs attributes; Plain\\(\\) has none"):
        make_svip(shapes).attach_task(plain)


# ------------------------------------------------------------------------------------------ training loop
def _trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2, limit_val_batches=2,
                   num_sanity_val_steps=0, default_root_dir=tmp_path)
    return L.Trainer(**(options | kwargs))


def test_warm_up_trains_the_heads_alone_then_everything_at_the_decayed_rate(shapes, tmp_path):
    module = make_svip(shapes, warmup_epochs=1, warmup_lr=1e-3, lr=1e-4, lr_decay=0.5, lr_decay_every=1)
    trunk = {k: v.detach().clone() for k, v in module.backbone.named_parameters()}  # the conv stem's batch-norm
    # statistics are buffers: they follow the data in training mode, warm-up or not
    head = module.attribute_head.weight.detach().clone()
    trainer = _trainer(tmp_path, max_epochs=1, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=shapes)
    assert all(torch.equal(v, dict(module.backbone.named_parameters())[k]) for k, v in trunk.items())
    assert not torch.equal(head, module.attribute_head.weight)
    optimizer = trainer.optimizers[0]
    assert not any(optimizer.state.get(p) for p in optimizer.param_groups[1]["params"])  # no moments either
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-5, 5e-5])  # epoch 1: lr·0.5¹
    trainer = _trainer(tmp_path, max_epochs=2, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=shapes)
    changed = [k for k, v in trunk.items() if not torch.equal(v, dict(module.backbone.named_parameters())[k])]
    assert any("resblocks" in k for k in changed)
    assert not any("proj" == k.split(".")[-1] or "logit_scale" in k for k in changed)


def test_the_calibration_is_chosen_on_validation_and_applied_to_test(shapes, tmp_path, monkeypatch):
    module = make_svip(shapes)
    chosen_on = []
    original = GZSLMetrics.choose_calibration

    def spy(metric, *args, **kwargs):
        chosen_on.append(metric)
        return original(metric, *args, **kwargs)

    monkeypatch.setattr(GZSLMetrics, "choose_calibration", spy)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=shapes)
    validation = module.val_metrics
    assert chosen_on and all(metric is validation for metric in chosen_on)
    gamma = module.gzsl_calibration
    assert float(trainer.callback_metrics["val/calibration"]) == pytest.approx(gamma)
    tested = trainer.test(module, datamodule=shapes, verbose=False)[0]
    assert all(metric is validation for metric in chosen_on)  # testing chose nothing
    assert tested["test/calibration"] == pytest.approx(gamma)
    for key in ("test/S_cal", "test/U_cal", "test/H_cal", "test/keep_precision"):
        assert 0.0 <= tested[key] <= 1.0
    # stored in the checkpoint: a fresh module tests with the same calibration
    path = tmp_path / "svip.ckpt"
    trainer.save_checkpoint(path)
    again = make_svip(shapes)
    again.on_load_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    assert again.gzsl_calibration == pytest.approx(gamma)


def test_a_task_that_validates_on_test_refuses_to_choose_the_calibration(shapes):
    task = shapes.task
    final = Task(source="Final()", class_names=task.class_names, seen=task.seen, unseen=task.unseen,
                 attributes=task.attributes, attribute_names=task.attribute_names,
                 extras={"validates_on_test": True})
    with pytest.raises(ValueError, match="pass the val/calibration of a run on the validation protocol"):
        make_svip(shapes).attach_task(final)
    fixed = make_svip(shapes, calibration=0.25)
    fixed.attach_task(final)
    assert fixed.gzsl_calibration == 0.25


def test_svip_on_a_timm_vit_trains_every_part_and_scores_with_the_frozen_clip(shapes, batch):
    """The spec's tower option: a timm ViT through the same stepper (random weights, a 2-block ViT at 64 px)."""
    tower = {"img_size": 64, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    module = make_svip(shapes, image_encoder="timm:vit_tiny_patch16_224", encoder_kwargs=tower, input_size=64)
    assert module.grid == (8, 8) and module.token_width == 4 * 48
    shapes.setup("fit")
    out = module.losses(next(iter(shapes.loader("train", sharded=False))))
    out["loss"].backward()
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    assert [name for name, p in trainable if p.grad is None] == []  # plain DDP accepts it
    assert any(name.startswith("backbone.timm_encoder") for name, _ in trainable)
    module.eval()
    with torch.no_grad():
        assert module.classify(batch["image"]).shape == (len(batch["image"]), shapes.task.num_classes)
    encoder = module.zero_shot_encoder()  # not the timm tower: the frozen CLIP of `model`, for LaZSL
    assert encoder is not module.backbone and encoder.text_aligned_images
