"""The explainer registry: each explainer against a reference computed here, and every one on every method (CPU)."""

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules import ShapesDataModule
from xvlm.explain import (
    SaliencyEvaluation,
    attribution_maps,
    explain_with,
    explainer_names,
    grad_cam_plus_plus,
    raw_attribution,
)
from xvlm.explain.gallery import ExplanationGallery, named_explainer
from xvlm.methods import LICO, CLIPFineTune

NAMES = ["saliency", "input_x_gradient", "integrated_gradients", "occlusion", "gradcam", "gradcam++",
         "attention_rollout", "patch_prompt", "dense_clip"]
VIT_ONLY = {"attention_rollout", "patch_prompt", "dense_clip"}
SIDE = 32
FAST = {"occlusion": {"window": 8, "stride": 8}, "integrated_gradients": {"n_steps": 4}}
"""Cheaper options for the sweeps over every method (the defaults are checked against references above)."""


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[h, w]`` map divided by its maximum (a reference written apart from the library's)."""
    return torch.stack([m / m.max() if m.max() > 0 else m for m in maps])


def bilinear(maps: torch.Tensor, side: int = SIDE) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]


def min_max(maps: torch.Tensor) -> torch.Tensor:
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    return (maps - low) / (high - low)


class ConvModule(nn.Module):
    """A small CNN with the members the explainers use: ``classify``, ``task`` and a ``backbone`` whose image tower
    is a feature map ``[B, 5, H/2, W/2]`` (batch norm, so eval mode matters)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                                       nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Tanh())
        self.head = nn.Linear(5, 4)
        with torch.no_grad():
            self.head.weight.mul_(20)  # pooled features vary little: large weights make the scores move
            self.features[1].running_mean.uniform_(-0.2, 0.2)
            self.features[1].running_var.uniform_(0.5, 2.0)
        self.backbone = SimpleNamespace(image_tower=self.features, text_aligned_images=False, image_encoder="conv")
        self.task = None

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def conv():
    module = ConvModule()
    images = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    return module, images, torch.tensor([1, 3])


def input_gradient(module, images, target):
    """``∂y/∂x`` by autograd, in eval mode."""
    module.eval()
    x = images.clone().requires_grad_(True)
    score = module.classify(x).gather(1, target[:, None]).sum()
    (gradient,) = torch.autograd.grad(score, x)
    return gradient


@pytest.fixture(scope="module")
def shapes():
    data = ShapesDataModule(task="objects", image_size=SIDE, batch_size=2, train_size=4, val_size=4, augment=False)
    data.setup("validate")
    return data


@pytest.fixture(scope="module")
def batch(shapes):
    return next(iter(shapes.val_dataloader()))


@pytest.fixture(scope="module")
def clip(shapes):
    torch.manual_seed(0)
    module = CLIPFineTune(pretrained=None, input_size=SIDE)
    module.attach_task(shapes.task)
    return module.eval()


def lico(shapes, **kwargs):
    torch.manual_seed(0)
    module = LICO(pretrained=None, input_size=SIDE, n_ctx=4, mapper_hidden=16, **kwargs)
    module.attach_task(shapes.task)
    return module


# --------------------------------------------------------------------------------------------- registry
def test_registry_names_and_unknown_names():
    assert explainer_names() == NAMES
    with pytest.raises(ValueError, match=re.escape("unknown explainer 'gradcamm'; choose one of " + ", ".join(NAMES))):
        attribution_maps(ConvModule(), torch.zeros(1, 3, 8, 8), torch.tensor([0]), "gradcamm")
    with pytest.raises(ValueError, match="unknown explainer 'lime'"):
        SaliencyEvaluation(explainer="lime")
    with pytest.raises(ValueError, match="choose one of module, lazsl, saliency, "):
        ExplanationGallery(explainer="lime")
    ExplanationGallery(explainer="dense_clip")
    with pytest.raises(ValueError, match="unknown explainer 'lime'"):
        CLIPFineTune(pretrained=None, input_size=SIDE, explainer="lime")


# --------------------------------------------------------------------------------------------- captum, by hand
def test_saliency_is_the_largest_absolute_gradient_over_channels(conv):
    module, images, target = conv
    gradient = input_gradient(module, images, target)
    torch.testing.assert_close(raw_attribution(module, images, target, "saliency"), gradient.abs())
    torch.testing.assert_close(attribution_maps(module, images, target, "saliency"),
                               normalised(gradient.abs().amax(dim=1)))


def test_input_x_gradient_is_the_positive_channel_sum_of_input_times_gradient(conv):
    module, images, target = conv
    gradient = input_gradient(module, images, target)
    torch.testing.assert_close(raw_attribution(module, images, target, "input_x_gradient"), images * gradient)
    expected = normalised((images * gradient).sum(dim=1).clamp_min(0))
    torch.testing.assert_close(attribution_maps(module, images, target, "input_x_gradient"), expected)


def test_integrated_gradients_are_complete_from_the_mean_colour(conv):
    module, images, target = conv
    raw = raw_attribution(module, images, target, "integrated_gradients", n_steps=64)
    module.eval()
    with torch.no_grad():
        logits, baseline = module.classify(images), module.classify(torch.zeros_like(images))
    rows = torch.arange(2)
    difference = logits[rows, target] - baseline[rows, target]
    assert difference.abs().min() > 1e-2  # the check below is not 0 = 0
    torch.testing.assert_close(raw.sum(dim=(1, 2, 3)), difference, rtol=1e-3, atol=1e-5)
    default = raw_attribution(module, images, target, "integrated_gradients")  # 16 steps, still close
    torch.testing.assert_close(default.sum(dim=(1, 2, 3)), difference, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(attribution_maps(module, images, target, "integrated_gradients"),
                               normalised(default.sum(dim=1).clamp_min(0)))


def test_occlusion_is_the_mean_score_drop_of_the_windows_over_each_pixel(conv):
    module, images, target = conv
    window, stride = SIDE // 8, SIDE // 16  # the defaults: 1/8 of the side, half the window
    module.eval()
    rows = torch.arange(2)
    total, count = torch.zeros(2, SIDE, SIDE), torch.zeros(SIDE, SIDE)
    with torch.no_grad():
        clean = module.classify(images)[rows, target]
        for top in range(0, SIDE - window + 1, stride):
            for left in range(0, SIDE - window + 1, stride):
                occluded = images.clone()
                occluded[:, :, top : top + window, left : left + window] = 0
                drop = clean - module.classify(occluded)[rows, target]
                total[:, top : top + window, left : left + window] += drop[:, None, None]
                count[top : top + window, left : left + window] += 1
    expected = total / count
    raw = raw_attribution(module, images, target, "occlusion")
    for channel in range(3):
        torch.testing.assert_close(raw[:, channel], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attribution_maps(module, images, target, "occlusion"),
                               normalised(expected.clamp_min(0)), rtol=1e-4, atol=1e-5)


def test_gradcam_of_a_feature_map_tower_is_the_hand_grad_cam_and_gradcam_plus_plus_our_closed_form(conv):
    module, images, target = conv
    module.eval()
    x = images.clone().requires_grad_(True)
    features = module.features(x)
    score = module.head(features.mean(dim=(2, 3))).gather(1, target[:, None])[:, 0]
    (gradient,) = torch.autograd.grad(score.sum(), features, retain_graph=True)
    weights = gradient.mean(dim=(2, 3))
    cam = torch.einsum("bk,bkhw->bhw", weights, features.detach())
    torch.testing.assert_close(raw_attribution(module, images, target, "gradcam"), cam)
    torch.testing.assert_close(attribution_maps(module, images, target, "gradcam"), normalised(bilinear(cam.relu())))
    # linear head on GAP: Grad-CAM is the class activation map Σ_k W_ck A_k / hw
    class_map = torch.einsum("bk,bkhw->bhw", module.head.weight[target], features.detach()) / 16**2
    torch.testing.assert_close(cam, class_map)
    plus = attribution_maps(module, images, target, "gradcam++")
    torch.testing.assert_close(plus, grad_cam_plus_plus(features, score, size=(SIDE, SIDE)))
    with pytest.raises(ValueError, match="block=-2 applies to ViT towers"):
        attribution_maps(module, images, target, "gradcam", block=-2)


def test_vit_explainers_need_a_vit(conv):
    module, images, target = conv
    for name in VIT_ONLY:
        with pytest.raises(ValueError, match=f"explainer '{name}' needs an open_clip ViT image tower; ConvModule "
                                             r"has image_encoder='conv' \(Sequential\)"):
            attribution_maps(module, images, target, name)


# --------------------------------------------------------------------------------------------- ViT, by hand
def block_inputs(module, images, indices):
    """The tokens ``[B, L, W]`` entering the tower's blocks ``indices`` in open_clip's own ``encode_image``."""
    blocks = module.backbone.image_tower.transformer.resblocks
    seen = {}
    handles = [blocks[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
               for i in indices]
    try:
        module.backbone.encode_image(images)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in indices]


def test_gradcam_of_a_vit_uses_the_patch_tokens_entering_the_block(clip, batch):
    images, target = batch["image"], torch.tensor([1, 0])
    text = clip._text_for_scoring()
    for block in (-1, -2):
        out = clip.backbone.run_blocks(clip.backbone.embed_patches(images), layers=[block - 1])
        tokens = out.tokens[0]  # output of the block before = input of `block`
        score = (clip.backbone.logit_scale.exp() * out.pooled @ text.T).gather(1, target[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, tokens)
        weights = gradient[:, 1:].mean(dim=1)  # [B, W]: mean over the h·w patch tokens
        expected = torch.einsum("bw,bnw->bn", weights, tokens[:, 1:].detach()).view(-1, *out.grid)
        raw = raw_attribution(clip, images, target, "gradcam", block=block)
        torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-6)
        assert raw.abs().max() > 0


def test_attention_rollout_is_the_product_of_the_mixed_attention_of_every_block(clip, batch):
    images = batch["image"]
    tower = clip.backbone.image_tower
    x = block_inputs(clip, images, [0])[0]
    rollout = torch.eye(x.shape[1]).expand(len(x), -1, -1)
    with torch.no_grad():
        for block in tower.transformer.resblocks:
            attn = block.attn
            heads, width = attn.num_heads, x.shape[-1]
            q, k, _ = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
            k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
            attention = (q @ k.transpose(-2, -1) / (width // heads) ** 0.5).softmax(dim=-1).mean(dim=1)
            mixed = 0.5 * attention + 0.5 * torch.eye(x.shape[1])
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = mixed @ rollout
            x = block(x)
    expected = rollout[:, 0, 1:].reshape(-1, 4, 4)
    raw = raw_attribution(clip, images, torch.tensor([0, 0]), "attention_rollout")
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attribution_maps(clip, images, torch.tensor([3, 1]), "attention_rollout"),
                               normalised(bilinear(expected)), rtol=1e-4, atol=1e-5)  # class-agnostic


def test_dense_clip_is_the_value_path_of_the_last_block_against_the_class_text(clip, batch):
    images, target = batch["image"], torch.tensor([2, 0])
    tower = clip.backbone.image_tower
    last = tower.transformer.resblocks[-1]
    x = block_inputs(clip, images, [-1])[0][:, 1:]  # the patch tokens entering the last block
    attn = last.attn
    width = x.shape[-1]
    with torch.no_grad():
        value = last.ln_1(x) @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
        dense = value @ attn.out_proj.weight.T + attn.out_proj.bias
        projected = F.normalize(tower.ln_post(dense) @ tower.proj, dim=-1)
        text = clip.class_text_features(target.tolist())
    expected = torch.einsum("bnd,bd->bn", projected, text).view(-1, 4, 4)
    torch.testing.assert_close(raw_attribution(clip, images, target, "dense_clip"), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attribution_maps(clip, images, target, "dense_clip"),
                               normalised(bilinear(min_max(expected))), rtol=1e-4, atol=1e-5)


def test_patch_prompt_is_the_cosine_of_the_projected_last_tokens_with_the_class_text(clip, batch):
    images, target = batch["image"], torch.tensor([2, 0])
    tower = clip.backbone.image_tower
    with torch.no_grad():
        last = clip.backbone.encode_image_tokens(images, layers=1).patches[-1]
        projected = F.normalize(tower.ln_post(last) @ tower.proj, dim=-1)
        expected = torch.einsum("bnd,bd->bn", projected, clip.class_text_features(target.tolist())).view(-1, 4, 4)
    torch.testing.assert_close(raw_attribution(clip, images, target, "patch_prompt"), expected, rtol=1e-4, atol=1e-5)
    assert clip.explainer_name == type(clip).default_explainer == "integrated_gradients"
    out = clip.explain(batch)
    torch.testing.assert_close(out["logits"], clip.classify(images).detach())
    assert torch.equal(out["predicted"], out["logits"].argmax(dim=1))
    torch.testing.assert_close(out["saliency"], attribution_maps(clip, images, out["predicted"], clip.explainer_name))


# --------------------------------------------------------------------------------------------- every method
def check_maps(module, batch, names):
    """Every named explainer under ``torch.no_grad()`` in train mode: ``[B, S, S]`` finite maps in [0, 1] with a
    maximum of 1 or 0, parameters' ``.grad`` and every submodule's mode unchanged."""
    module.train()
    marked = next(p for p in module.parameters() if p.requires_grad)
    marked.grad = torch.full_like(marked, 0.5)
    modes = [m.training for m in module.modules()]
    for name in names:
        with torch.no_grad():
            out = explain_with(module, batch, name, **FAST.get(name, {}))
        maps = out["saliency"]
        assert maps.shape == (2, SIDE, SIDE) and maps.dtype == torch.float32, name
        assert bool(maps.isfinite().all()) and maps.min() >= 0 and maps.max() <= 1, name
        assert all(float(peak) in (0.0, 1.0) for peak in maps.amax(dim=(1, 2))), name
        assert [m.training for m in module.modules()] == modes, name
        assert torch.equal(marked.grad, torch.full_like(marked, 0.5)), name
        assert all(p.grad is None for p in module.parameters() if p is not marked), name
    marked.grad = None
    module.eval()


def test_every_explainer_on_clip_fine_tune(clip, batch):
    check_maps(clip, batch, NAMES)


def test_every_explainer_on_a_vit_with_register_tokens(shapes, batch):
    from xvlm.backbones import available_models

    if "xvlm-tiny-reg" not in available_models():
        pytest.skip("no ViT config with register tokens")
    torch.manual_seed(0)
    module = CLIPFineTune(model="xvlm-tiny-reg", pretrained=None, input_size=SIDE)
    module.attach_task(shapes.task)
    check_maps(module, batch, NAMES)


def test_every_explainer_on_lico_with_the_clip_tower(shapes, batch):
    module = lico(shapes)
    check_maps(module, batch, NAMES)
    assert module.explainer_name == "integrated_gradients"


def test_every_explainer_on_lico_with_a_timm_cnn_or_a_clear_error(shapes, batch):
    # output_stride 16: a 2x2 map at 32 px (LICO probes its map size in train mode, where batch norm needs > 1 value)
    module = lico(shapes, image_encoder="timm:resnet18", encoder_kwargs={"output_stride": 16})
    check_maps(module, batch, [name for name in NAMES if name not in VIT_ONLY])
    for name in VIT_ONLY:
        with pytest.raises(ValueError, match=f"explainer '{name}' needs an open_clip ViT image tower; LICO has "
                                             r"image_encoder='timm:resnet18' \(TimmFeatures\)"):
            explain_with(module, batch, name)


def test_named_explainers_work_inside_inference_mode(clip, batch):
    with torch.inference_mode():
        images = batch["image"].clone()
        out = explain_with(clip, {"image": images}, "input_x_gradient")
        lazsl = named_explainer(clip, "lazsl")
        assert named_explainer(clip, "module") is None
    assert out["saliency"].shape == (2, SIDE, SIDE) and out["saliency"].max() == 1
    assert callable(lazsl)


def test_input_x_gradient_under_bf16_autocast_is_close_to_float32(clip, batch):
    images, target = batch["image"], torch.tensor([1, 2])
    exact = attribution_maps(clip, images, target, "input_x_gradient")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attribution_maps(clip, images, target, "input_x_gradient")
    assert low.dtype == torch.float32 and bool(low.isfinite().all())
    assert (low - exact).abs().mean() < 0.05
    assert F.cosine_similarity(low.flatten(1), exact.flatten(1)).min() > 0.95
