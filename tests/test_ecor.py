"""ECOR: the pruned top-k search against brute force, the four factorisations (each a distribution, told apart on
a case built for it), each training loss equal to −log P(c*, r* | I), the category marginal, what trains in each
prompt mode, bf16, and zero-shot transfer to another vocabulary."""

import math

import pytest
import torch

from datamodules import ShapesDataModule
from xvlm.methods import ECOR
from xvlm.methods.ecor import FACTORIZATIONS, TextFeatures, joint_log_probs, pruned_top_k

SMALL = dict(image_size=32, batch_size=8, train_size=16, val_size=16, test_size=16, num_workers=0, augment=False)
TINY = dict(pretrained=None, input_size=32)


def _ecor(shapes=None, **options) -> tuple[ECOR, ShapesDataModule]:
    torch.manual_seed(0)
    data = ShapesDataModule(task="objects", shapes=shapes, **SMALL)
    model = ECOR(**(TINY | options))
    model.attach_task(data.task)
    return model, data


def _batch(data: ShapesDataModule, split: str = "train", count: int = 8) -> dict[str, torch.Tensor]:
    dataset = data.build_dataset(split)
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])


def _brute_top(joint: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, flat = joint.flatten(1).topk(k, dim=1)
    return values, flat // joint.shape[2], flat % joint.shape[2]


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_the_pruned_search_finds_the_brute_force_top_k(chunk):
    generator = torch.Generator().manual_seed(chunk)
    outer = torch.randn(6, 40, generator=generator).mul(3).log_softmax(dim=1)
    inner_all = torch.randn(6, 40, 7, generator=generator).mul(2).log_softmax(dim=2)
    values, o, i, visited = pruned_top_k(outer, lambda ids: inner_all[:, ids], k=5, chunk=chunk)
    expected = _brute_top(outer[:, :, None] + inner_all, 5)
    torch.testing.assert_close(values, expected[0])
    assert torch.equal(o, expected[1]) and torch.equal(i, expected[2])
    assert visited < 40 or chunk == 50  # peaked outer factors: the bound stops the search early
    unpruned = pruned_top_k(outer, lambda ids: inner_all[:, ids], k=5, chunk=chunk, prune=False)
    assert unpruned[3] == 40 and torch.equal(unpruned[1], o)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_the_models_top_pairs_are_the_brute_force_top_pairs_of_its_joint(factorization):
    model, data = _ecor(factorization=factorization, search_chunk=4)
    model.eval()
    with torch.no_grad():
        f, text = model.image_features(_batch(data, "val")["image"]), model.text_features()
        joint = model.joint(f, text)
        top = model.top_pairs(f, text, k=7)
    values, categories, rationales = _brute_top(joint, 7)
    torch.testing.assert_close(top.log_prob, values, rtol=1e-5, atol=1e-5)
    assert torch.equal(top.category, categories) and torch.equal(top.rationale, rationales)


def test_the_four_factorisations_are_distributions_told_apart_on_a_built_case():
    s_r = torch.tensor([[5.0, 0.0]])  # P(r|I) favours r0
    s_c = torch.tensor([[0.0, 5.0]])  # P(c|I) favours c1
    s_cr = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # the pair prompts favour (c0, r0) given r0, (c1, r1) overall
    joints = {f: joint_log_probs(f, s_r, s_c, s_cr) for f in FACTORIZATIONS}
    for joint in joints.values():
        assert float(joint.exp().sum()) == pytest.approx(1.0, abs=1e-6)
    top = {f: divmod(int(j.flatten().argmax()), 2) for f, j in joints.items()}
    assert top == {"rationale_first": (0, 0), "category_first": (1, 1), "independent": (1, 0), "flat": (1, 1)}
    # rationale-first by hand: P(r0) P(c0 | r0)
    expected = math.log(math.exp(5) / (math.exp(5) + 1)) + math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(joints["rationale_first"][0, 0, 0]) == pytest.approx(expected, abs=1e-6)
    assert not torch.allclose(joints["category_first"], joints["flat"])


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_each_training_loss_is_minus_the_joint_log_probability_of_the_true_pair(factorization):
    model, data = _ecor(factorization=factorization)
    batch = _batch(data)
    model.eval()  # the same features in both passes
    with torch.no_grad():
        out = model.losses(batch)
        joint = model.joint(model.image_features(batch["image"]), model.text_features())
    picked = joint[torch.arange(len(batch["label"])), batch["label"], batch["rationale"]]
    assert float(out["loss"]) == pytest.approx(float(-picked.mean()), rel=1e-5)
    classify = model.classify(batch["image"]).detach()
    torch.testing.assert_close(classify, joint.logsumexp(dim=2), rtol=1e-5, atol=1e-5)


def test_visual_prompts_are_the_only_trained_weights_and_checkpoints_hold_them(tmp_path):
    model, data = _ecor(pretrained="shapes")
    model.train()
    model.losses(_batch(data))["loss"].backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["backbone.clip.visual.register_tokens"]
    assert model.backbone.clip.visual.register_tokens.grad.abs().sum() > 0
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert "backbone.clip.visual.register_tokens" in checkpoint["state_dict"]
    assert not any("transformer.resblocks" in k or "token_embedding" in k for k in checkpoint["state_dict"])


def test_text_mode_trains_the_context_vectors_of_the_prompt_families_its_factorisation_reads():
    model, data = _ecor(prompt_mode="text", n_ctx=2)
    model.train()
    model.losses(_batch(data))["loss"].backward()
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == ["prompts.pair.context", "prompts.rationale.context"]  # rationale-first reads no category prompt
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)


def test_training_under_bf16_autocast_keeps_float32_scores():
    model, data = _ecor()
    batch = _batch(data)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.losses(batch)
        scores = model.scores(model.image_features(batch["image"]), model.text_features().rationales)
    assert scores.dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_a_trained_model_transfers_to_held_out_shapes_with_their_own_vocabulary():
    model, data = _ecor(shapes=["circle", "square", "triangle", "star", "hexagon", "cross"])
    with torch.no_grad():
        model.backbone.clip.visual.register_tokens.add_(0.5)
    tokens = model.backbone.clip.visual.register_tokens.clone()
    held_out = ShapesDataModule(task="objects", shapes=["heart", "crescent"], **SMALL)
    model.attach_task(held_out.task)
    assert model.categories == ("heart", "crescent")
    assert "two rounded lobes" in model.rationale_names and "five points" not in model.rationale_names
    assert torch.equal(model.backbone.clip.visual.register_tokens, tokens)
    model.eval()
    with torch.no_grad():
        text = model.text_features()
        top = model.top_pairs(model.image_features(_batch(held_out, "val")["image"]), text)
    assert isinstance(text, TextFeatures) and text.pairs.shape[:2] == (2, len(model.rationale_names))
    assert set(top.category.flatten().tolist()) <= {0, 1}
