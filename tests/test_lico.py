"""LICO: its two losses against direct references, its prompts, its gradients, and its encoders."""

import math
import re

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from datamodules.shapes import ShapesDataModule
from xvlm.methods.lico import LICO, manifold_matching_loss, optimal_transport_loss, transport_cost


def manifold_matching_by_loops(image: torch.Tensor, language: torch.Tensor, scale: float) -> float:
    """``(1/B) Σ_i KL(A^G_i ‖ A^F_i)`` with ``A_ij ∝ exp(−κ ‖x_i − x_j‖)`` over ``j ≠ i``, a scalar at a time."""
    def affinities(x: torch.Tensor) -> list[dict[int, float]]:
        vectors = [row.flatten() / row.flatten().norm() for row in x]
        rows = []
        for i, u in enumerate(vectors):
            weights = {j: math.exp(-scale * float((u - v).norm())) for j, v in enumerate(vectors) if j != i}
            rows.append({j: w / sum(weights.values()) for j, w in weights.items()})
        return rows

    target, prediction = affinities(language), affinities(image)
    total = 0.0
    for p_row, q_row in zip(target, prediction):
        total += sum(p * math.log(p / q_row[j]) for j, p in p_row.items())
    return total / len(target)


def test_manifold_matching_equals_a_double_loop():
    torch.manual_seed(0)
    image, language = torch.randn(6, 5, 4, dtype=torch.float64), torch.randn(6, 3, 4, dtype=torch.float64)
    log_scale = torch.tensor(1.3, dtype=torch.float64)
    got = manifold_matching_loss(image, language, log_scale)
    assert float(got) == pytest.approx(manifold_matching_by_loops(image, language, math.exp(1.3)), rel=1e-9)


def test_manifold_matching_scale_is_clamped_to_100():
    torch.manual_seed(1)
    image, language = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    got = manifold_matching_loss(image, language, torch.tensor(9.0, dtype=torch.float64))
    assert float(got) == pytest.approx(manifold_matching_by_loops(image, language, 100.0), rel=1e-9)


def test_manifold_matching_is_zero_when_the_manifolds_coincide():
    torch.manual_seed(2)
    image = torch.randn(7, 4, 9)
    assert float(manifold_matching_loss(image, 3.0 * image, torch.tensor(2.0))) == pytest.approx(0.0, abs=1e-6)
    assert float(manifold_matching_loss(image, torch.randn(7, 4, 9), torch.tensor(2.0))) > 1e-2


def test_transport_plan_matches_pot_and_gradient_holds_the_plan_fixed():
    torch.manual_seed(3)
    visual = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    language = torch.randn(2, 4, 5, dtype=torch.float64)
    loss, plans = optimal_transport_loss(visual, language, eps=0.1, max_iter=5000, tol=1e-12)
    loss.backward()
    cost = transport_cost(visual.detach(), language)
    for b in range(2):
        reference = ot.sinkhorn(np.full(6, 1 / 6), np.full(4, 1 / 4), cost[b].numpy(), reg=0.1,
                                numItermax=10000, stopThr=1e-13)
        assert np.allclose(plans[b].numpy(), reference, atol=1e-9)
    # The gradient is that of <P*, C(visual)> with P* a constant.
    frozen = visual.detach().clone().requires_grad_(True)
    ((plans.detach() * transport_cost(frozen, language)).sum(dim=(1, 2)).mean()).backward()
    assert visual.grad.abs().sum() > 0
    assert torch.allclose(visual.grad, frozen.grad, atol=1e-12)


def test_transport_cost_is_two_minus_two_cosine_in_zero_to_four():
    visual = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    language = torch.tensor([[[3.0, 0.0], [-1.0, 0.0]]])
    expected = torch.tensor([[[0.0, 4.0], [2.0, 2.0]]])
    assert torch.allclose(transport_cost(visual, language), expected, atol=1e-6)


@pytest.fixture(scope="module")
def shapes():
    data = ShapesDataModule(task="attributes", image_size=64, batch_size=6, train_size=12, val_size=12)
    data.setup("fit")
    return data


def make_lico(data: ShapesDataModule, **kwargs) -> LICO:
    options = dict(model="xvlm-tiny", pretrained=None, n_ctx=4, mapper_hidden=32, optimizer="adamw", lr=1e-3)
    module = LICO(**{**options, **kwargs})
    module.attach_task(data.task)
    return module


def first_batch(data: ShapesDataModule) -> dict:
    torch.manual_seed(0)
    return next(iter(data.train_dataloader()))


def test_losses_train_context_mapper_and_image_encoder_but_never_the_text_tower(shapes):
    module = make_lico(shapes)
    out = module.losses(first_batch(shapes))
    assert set(out) == {"ce", "mm", "ot", "loss", "acc"}
    assert float(out["loss"]) == pytest.approx(float(out["ce"] + 10 * out["mm"] + out["ot"]), rel=1e-5)
    out["loss"].backward()
    assert module.prompts.context.grad.abs().sum() > 0
    assert module.mapper[0].weight.grad.abs().sum() > 0
    assert module.mm_log_scale.grad is not None and module.mm_log_scale.grad != 0
    assert module.backbone.clip.visual.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    text = module.backbone.clip.transformer.resblocks[0].attn.in_proj_weight
    assert not text.requires_grad and text.grad is None
    optimised = {id(p) for group in module.parameter_groups() for p in group["params"]}
    assert id(text) not in optimised and id(module.prompts.context) in optimised


def test_the_transport_term_alone_trains_the_mapper(shapes):
    module = make_lico(shapes, alpha=0.0, lambda_ce=0.0)
    module.losses(first_batch(shapes))["loss"].backward()
    assert module.mapper[-1].weight.grad.abs().sum() > 0
    assert module.prompts.context.grad.abs().sum() > 0


@pytest.mark.parametrize("encoder", ["clip", "timm:resnet18"])
def test_one_step_on_the_transport_term_alone_moves_the_image_encoder(shapes, encoder):
    extra = {} if encoder == "clip" else {"input_size": 64}
    module = make_lico(shapes, alpha=0.0, lambda_ce=0.0, image_encoder=encoder, **extra)
    tower = module.backbone.image_tower
    before = {name: p.detach().clone() for name, p in tower.named_parameters()}
    optimizer = torch.optim.SGD(module.parameter_groups(), lr=1.0)
    out = module.losses(first_batch(shapes))
    assert set(out) == {"ce", "ot", "loss", "acc"} and torch.equal(out["loss"].detach(), out["ot"].detach())
    out["loss"].backward()
    optimizer.step()
    moved = [name for name, p in tower.named_parameters() if not torch.equal(p, before[name])]
    assert len(moved) > len(before) // 2, moved  # the transport gradient reaches the encoder, not just its top


def test_ce_baseline_never_runs_the_text_side(shapes, monkeypatch):
    module = make_lico(shapes, alpha=0.0, beta=0.0)
    monkeypatch.setattr(module.prompts, "encode_variants", lambda *a, **k: pytest.fail("text side ran"))
    out = module.losses(first_batch(shapes))
    assert set(out) == {"ce", "loss", "acc"}


def test_prompt_variants_roll_the_context_by_their_index(shapes):
    module = make_lico(shapes).eval()
    classes = torch.tensor([3, 0])
    with torch.no_grad():
        variants = module.prompts.encode_variants(module.backbone, classes, 4)
        singles = [module.prompts.encode(module.backbone, classes, shift=k) for k in range(4)]
    assert variants.shape == (2, 4, module.backbone.embed_dim)
    for k in range(4):
        assert torch.allclose(variants[:, k], singles[k], atol=1e-5)
    assert not torch.allclose(variants[:, 0], variants[:, 1], atol=1e-4)  # the reference's variants coincide
    rolled = module.prompts.embeddings(module.backbone, classes, shift=1)[0, 1:5]
    assert torch.equal(rolled, torch.roll(module.prompts.context, 1, dims=0))


def test_language_tokens_follow_each_samples_label(shapes):
    module = make_lico(shapes).eval()
    labels = torch.tensor([5, 2, 5, 9])
    with torch.no_grad():
        mapped, text = module.language_tokens(*labels.unique(return_inverse=True))
        alone = module.prompts.encode_variants(module.backbone, torch.tensor([2]), 4)
    assert mapped.shape == (4, 4, module.token_dim)
    assert torch.allclose(text[1], alone[0], atol=1e-5)
    assert torch.equal(text[0], text[2])


def test_classifier_scores_seen_classes_only_and_rejects_unseen_training_labels(shapes):
    module = make_lico(shapes)
    logits = module.classify(torch.randn(3, 3, 64, 64))
    unseen = list(shapes.task.unseen)
    assert torch.isinf(logits[:, unseen]).all() and torch.isfinite(logits[:, list(shapes.task.seen)]).all()
    batch = first_batch(shapes)
    batch["label"][0] = unseen[0]
    with pytest.raises(ValueError, match="unseen class"):
        module.losses(batch)


def class_activation_map(module: LICO, maps: torch.Tensor, predicted: torch.Tensor, side: int) -> torch.Tensor:
    """``relu(Σ_k W_ck F_k)`` of the linear head on ``GAP(F)``, upsampled bilinearly and divided by its maximum."""
    weights = module.head.weight[module.seen_position[predicted]]
    cam = torch.relu(torch.einsum("bk,bkhw->bhw", weights, maps))
    cam = F.interpolate(cam[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def test_explainer_gradcam_gives_the_class_activation_map_of_the_predicted_class(shapes):
    # With a timm encoder Grad-CAM's layer is F itself; with a linear head on GAP(F), Grad-CAM is the class
    # activation map relu(Σ_k w_ck F_k), up to scale (deviation 12).
    module = make_lico(shapes, image_encoder="timm:resnet18", input_size=64, explainer="gradcam",
                       encoder_kwargs={"output_stride": 8}).eval()
    assert module.explainer_name == "gradcam"
    batch = first_batch(shapes)
    with torch.no_grad():
        out = module.explain(batch)
        maps = module.feature_maps(batch["image"])
    assert maps.shape[-2:] == (8, 8)
    assert out["saliency"].shape == (6, 64, 64)
    assert torch.equal(out["predicted"], module.classify(batch["image"]).argmax(dim=1))
    assert torch.allclose(out["saliency"], class_activation_map(module, maps, out["predicted"], 64), atol=1e-4)


def test_explainer_option_selects_any_registered_explainer_and_checks_the_tower(shapes):
    from xvlm.explain.explainers import attribution_maps

    module = make_lico(shapes, explainer="gradcam++").eval()
    batch = first_batch(shapes)
    with torch.no_grad():
        out = module.explain(batch)
    expected = attribution_maps(module, batch["image"], out["predicted"], "gradcam++")
    assert torch.equal(out["saliency"], expected)
    assert not torch.equal(out["saliency"], attribution_maps(module, batch["image"], out["predicted"], "gradcam"))
    with pytest.raises(ValueError, match=re.escape("unknown explainer 'gradcam+'; choose one of saliency, ")):
        make_lico(shapes, explainer="gradcam+")
    with pytest.raises(ValueError, match="'attention_rollout' needs an open_clip ViT.*timm:resnet18"):
        make_lico(shapes, explainer="attention_rollout", image_encoder="timm:resnet18", input_size=64)
    with pytest.raises(TypeError, match="saliency"):  # the former option is gone, not silently ignored
        make_lico(shapes, saliency="gradcam++")


def test_timm_encoder_uses_its_channels_as_tokens(shapes):
    module = make_lico(shapes, image_encoder="timm:resnet18", input_size=64)
    assert (module.num_tokens, module.token_dim) == (512, 4)  # 64 px / stride 32 = 2x2 map
    module.losses(first_batch(shapes))["loss"].backward()
    assert module.backbone.image_tower.model.conv1.weight.grad.abs().sum() > 0
    text_tower = [p for name, p in module.backbone.clip.named_parameters() if not name.startswith("logit_")]
    assert text_tower and all(not p.requires_grad for p in text_tower)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="input_size"):
        LICO(image_encoder="timm:resnet18", model="xvlm-tiny", pretrained=None)
    with pytest.raises(ValueError, match="image_encoder"):
        LICO(image_encoder="resnet18", model="xvlm-tiny", pretrained=None)
    with pytest.raises(ValueError, match="no model 'resnet1000'"):
        LICO(image_encoder="timm:resnet1000", input_size=64, model="xvlm-tiny", pretrained=None)


def test_cifar_wide_resnets_have_the_papers_sizes():
    import timm

    import xvlm.wide_resnet  # noqa: F401

    wrn28_2 = timm.create_model("wrn28_2", num_classes=0, global_pool="")
    assert wrn28_2.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 128, 8, 8)
    assert 1.4e6 < sum(p.numel() for p in wrn28_2.parameters()) < 1.55e6  # "WRN-28-2, 1.5 M parameters"
    wrn28_8 = timm.create_model("wrn28_8", num_classes=100)
    assert wrn28_8(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    assert 23.0e6 < sum(p.numel() for p in wrn28_8.parameters()) < 23.6e6  # "WRN-28-8, 23.4 M parameters"
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("wrn28_2", pretrained=True)


def test_head_lr_applies_to_licos_own_parts_only(shapes):
    module = make_lico(shapes, head_lr=0.5)
    groups = module.parameter_groups()
    lr_of = {id(p): g.get("lr") for g in groups for p in g["params"]}
    assert lr_of[id(module.head.weight)] == lr_of[id(module.prompts.context)] == lr_of[id(module.mm_log_scale)] == 0.5
    assert lr_of[id(module.backbone.clip.visual.conv1[0].weight)] is None  # the optimiser's lr
    assert len(lr_of) == sum(p.requires_grad for p in module.parameters())


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """An ``xvlm-tiny`` open_clip state dict on disk: ``pretrained=<file>`` loads it into both towers."""
    from xvlm.backbones import VisionLanguageModel

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("clip") / "xvlm-tiny.pt"
    torch.save(VisionLanguageModel("xvlm-tiny", pretrained=None).clip.state_dict(), path)
    return path


def test_a_timm_encoder_leaves_lazsl_the_frozen_clip(shapes, clip_weights):
    from xvlm.backbones import VisionLanguageModel

    module = make_lico(shapes, image_encoder="timm:resnet18", input_size=64, pretrained=str(clip_weights))
    keys = set(module.state_dict())
    encoder = module.zero_shot_encoder()
    assert isinstance(encoder, VisionLanguageModel) and encoder.text_aligned_images
    assert module.zero_shot_encoder() is encoder  # built once
    saved = torch.load(clip_weights, weights_only=True)
    assert set(encoder.clip.state_dict()) == set(saved)
    assert all(torch.equal(value, saved[name]) for name, value in encoder.clip.state_dict().items())
    assert all(not p.requires_grad for p in encoder.parameters())
    # neither trained nor checkpointed: not a submodule
    assert set(module.state_dict()) == keys
    assert not {id(p) for p in encoder.parameters()} & {id(p) for p in module.parameters()}


def test_lazsl_scores_of_a_timm_lico_stay_constant_while_it_trains(shapes, clip_weights):
    from types import SimpleNamespace

    from xvlm.zeroshot import LaZSL

    module = make_lico(shapes, image_encoder="timm:resnet18", input_size=64, pretrained=str(clip_weights))
    trainer = SimpleNamespace(datamodule=shapes, sanity_checking=False, current_epoch=0,
                              state=SimpleNamespace(fn="validate"))
    callback = LaZSL(n_crops=2)
    callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_start(trainer, module)
    images = next(iter(shapes.val_dataloader()))
    callback.on_validation_batch_end(trainer, module, None, images, 0)
    unseen = int(torch.isin(images["label"], torch.tensor(shapes.task.unseen)).sum())
    assert int(callback._metrics[""].total.sum()) == unseen > 0  # scored
    with torch.no_grad():
        before = callback.score(module.zero_shot_encoder(), images["image"], images["index"]).scores
    optimizer = torch.optim.SGD(module.parameter_groups(), lr=1.0)
    module.losses(first_batch(shapes))["loss"].backward()
    optimizer.step()
    with torch.no_grad():
        after = callback.score(module.zero_shot_encoder(), images["image"], images["index"]).scores
    assert torch.equal(before, after)


def test_init_weights_fill_the_task_dependent_parts_too(shapes, tmp_path):
    source = make_lico(shapes)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "source.ckpt")
    copy = make_lico(shapes, init_weights=str(tmp_path / "source.ckpt"))
    for name in ("head.weight", "prompts.context", "mapper.0.weight", "backbone.clip.visual.proj"):
        assert torch.equal(copy.state_dict()[name], source.state_dict()[name]), name


def test_building_with_a_timm_encoder_leaves_its_batch_norm_statistics_and_mode_alone(tmp_path):
    import timm

    torch.manual_seed(6)
    loaded = timm.create_model("resnet18", num_classes=0, global_pool="")
    statistics = {}
    for name, buffer in loaded.named_buffers():  # loaded weights carry statistics of their own
        buffer.copy_(torch.randint(1, 50, buffer.shape) if buffer.dtype == torch.long else torch.rand(buffer.shape))
        statistics[name] = buffer.clone()
    torch.save(loaded.state_dict(), tmp_path / "resnet18.pt")
    module = LICO(image_encoder="timm:resnet18", encoder_weights=str(tmp_path / "resnet18.pt"), input_size=32,
                  model="xvlm-tiny", pretrained=None, n_ctx=2, mapper_hidden=8)  # 1 x 1 map: train-mode BN fails
    tower = module.backbone.image_tower.model
    assert len(statistics) == 3 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    for name, buffer in tower.named_buffers():
        assert torch.equal(buffer, statistics[name]), name
    assert module.training and tower.training
