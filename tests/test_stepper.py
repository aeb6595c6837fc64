"""The ViT stepper, block adapters, timm towers and weight sources of ``xvlm.backbones``.

References are independent of the code under test: open_clip's own ``encode_image``, ``forward_intermediates``,
``_embeds`` and checkpoint loader (``resize_pos_embed``), and attention recomputed here from ``in_proj``.
"""

import copy
import re

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed
from torch import nn

from datamodules import transforms
from xvlm import backbones
from xvlm.backbones import PatchTokens, VisionLanguageModel, register_source


def images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def tiny_model(**kwargs) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel("xvlm-tiny", pretrained=None, **kwargs).eval()


def zero_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def small_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.normal_(layer.weight, std=0.05)
    return layer


@pytest.fixture(scope="module")
def tiny() -> VisionLanguageModel:
    return tiny_model()


@pytest.fixture(scope="module")
def vit_b16() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel("ViT-B-16", pretrained=None).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# ----------------------------------------------------------------- pooled features
@pytest.mark.parametrize("name", ["tiny", "vit_b16"])
def test_pooled_equals_encode_image_at_the_native_size(name, request):
    model = request.getfixturevalue(name)
    x = images(2 if name == "tiny" else 1, model.image_size)
    with torch.no_grad():
        patches = model.embed_patches(x)
        out = model.run_blocks(patches)
        reference = model.encode_image(x)
        if name == "tiny":
            assert max_diff(model.run_blocks(patches, normalize=False).pooled, model.encode_image(x, False)) <= 1e-5
    grid = model.clip.visual.grid_size
    assert patches.grid == tuple(grid)
    assert patches.tokens.shape == (len(x), grid[0] * grid[1], model.clip.visual.transformer.width)
    assert out.pooled.shape == (len(x), model.embed_dim)
    assert max_diff(out.pooled, reference) <= 1e-5


@pytest.mark.parametrize(("name", "side"), [("tiny", 96), ("vit_b16", 160)])
def test_other_input_size_matches_open_clips_resized_checkpoint(name, side, request, tmp_path):
    model = request.getfixturevalue(name)
    if name == "tiny":  # through open_clip.load_checkpoint (a file), as pretrained=<file> loads it
        path = tmp_path / "native.pt"
        torch.save(model.clip.state_dict(), path)
        resized = VisionLanguageModel("xvlm-tiny", pretrained=str(path), image_size=side).eval()
    else:  # the same resize_pos_embed on the state dict in memory (saves writing 600 MB)
        resized = VisionLanguageModel("ViT-B-16", pretrained=None, image_size=side).eval()
        state = model.clip.state_dict()
        resize_pos_embed(state, resized.clip)
        resized.clip.load_state_dict(state)
    x = images(1, side, seed=1)
    with torch.no_grad():
        out = model.run_blocks(model.embed_patches(x))
        reference = resized.encode_image(x)
    assert out.grid != tuple(model.clip.visual.grid_size)
    assert max_diff(out.pooled, reference) <= 1e-5


# ----------------------------------------------------------------- attention
def recomputed_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mean_h softmax(q_h k_hᵀ / √d)`` from the block's in_proj weights on its input ``x [B, L, W]``."""
    heads = block.attn.num_heads
    q, k, _ = (block.ln_1(x) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.unflatten(-1, (heads, -1)) for t in (q, k))  # [B, L, H, d]
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
    return logits.softmax(dim=-1).mean(dim=1)


def test_attention_maps_come_from_the_same_forward(tiny):
    x = images(2, 64)
    visual = tiny.clip.visual
    with torch.no_grad():
        patches = tiny.embed_patches(x)
        plain = tiny.run_blocks(patches)
        out = tiny.run_blocks(patches, attention=True)
        inputs = [visual._embeds(x)] + out.tokens[:-1]  # block l's input: open_clip's embeddings, then block l-1
        expected = [recomputed_attention(block, h) for block, h in zip(visual.transformer.resblocks, inputs)]
        subset = tiny.run_blocks(patches, attention=True, layers=[1, -1])
    assert plain.attention is None
    assert len(out.attention) == len(out.tokens) == 4
    for maps, reference in zip(out.attention, expected):
        assert maps.shape == (2, 65, 65)
        torch.testing.assert_close(maps, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(maps.sum(dim=-1), torch.ones(2, 65), atol=1e-5, rtol=0)
    for with_maps, without in zip(out.tokens, plain.tokens):
        assert max_diff(with_maps, without) <= 1e-5
    assert max_diff(out.pooled, plain.pooled) <= 1e-5
    assert subset.layers == (1, 3)
    torch.testing.assert_close(subset.attention[0], out.attention[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(subset.attention[1], out.attention[3], atol=1e-6, rtol=0)


def test_attention_under_bf16_autocast_is_finite_and_close_to_float32(tiny):
    x = images(2, 64)
    with torch.no_grad():
        reference = tiny.run_blocks(tiny.embed_patches(x), attention=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny.run_blocks(tiny.embed_patches(x), attention=True)
    assert all(torch.isfinite(maps).all() for maps in out.attention)
    assert torch.isfinite(out.pooled).all()
    for maps, fp32 in zip(out.attention, reference.attention):
        assert max_diff(maps.float(), fp32) < 5e-2
    assert max_diff(out.pooled.float(), reference.pooled) < 1e-1


# ----------------------------------------------------------------- layers and errors
def test_layer_selection_and_out_of_range_errors(tiny):
    x = images(1, 64)
    with torch.no_grad():
        patches = tiny.embed_patches(x)
        every = tiny.run_blocks(patches)
        last_two = tiny.run_blocks(patches, layers=2)
        chosen = tiny.run_blocks(patches, layers=[-1, 0])
    assert every.layers == (0, 1, 2, 3) and [t.shape for t in every.tokens] == [(1, 65, 96)] * 4
    assert last_two.layers == (2, 3)
    assert chosen.layers == (0, 3)
    for out in (last_two, chosen):
        for index, tokens in zip(out.layers, out.tokens):
            torch.testing.assert_close(tokens, every.tokens[index], atol=0, rtol=0)
    for bad in (5, 0, [4], [0, -5]):
        with pytest.raises(ValueError, match="depth 4"):
            tiny.run_blocks(patches, layers=bad)
    with pytest.raises(ValueError, match="patch tokens for a 4x4 grid"):
        tiny.run_blocks(PatchTokens(patches.tokens, (4, 4)))


def test_towers_that_are_not_vits_are_refused_by_name():
    resnet = VisionLanguageModel("xvlm-tiny-rn", pretrained=None)
    timm_tower = VisionLanguageModel("xvlm-tiny", pretrained=None, image_encoder="timm:resnet18", image_size=64)
    patches = PatchTokens(torch.zeros(1, 4, 16), (2, 2))
    for model, what in ((resnet, "'xvlm-tiny-rn' has a ModifiedResNet"), (timm_tower, "timm:resnet18")):
        with pytest.raises(ValueError, match=f"embed_patches needs an open_clip ViT.*{what}"):
            model.embed_patches(images(1, 64))
        with pytest.raises(ValueError, match=f"run_blocks needs an open_clip ViT.*{what}"):
            model.run_blocks(patches)
        with pytest.raises(ValueError, match=f"add_block_adapters needs an open_clip ViT.*{what}"):
            model.add_block_adapters(zero_linear, zero_linear)


# ----------------------------------------------------------------- block adapters
def test_zero_adapters_change_nothing_and_only_adapters_train():
    model = tiny_model(freeze="image")
    original = copy.deepcopy(model)
    model.add_block_adapters(zero_linear, zero_linear)
    x = images(2, 64)
    with torch.no_grad():
        for attention in (False, True):
            ours = model.run_blocks(model.embed_patches(x), attention=attention)
            theirs = original.run_blocks(original.embed_patches(x), attention=attention)
            assert all(torch.equal(a, b) for a, b in zip(ours.tokens, theirs.tokens))
        assert torch.equal(model.encode_image(x), original.encode_image(x))

    names = {name for name, p in model.named_parameters() if any(p is q for q in model.adapter_parameters())}
    assert len(names) == 4 * 2 * 2
    assert all(re.fullmatch(r"clip\.visual\.transformer\.resblocks\.\d\.adapter_(attn|mlp)\.(weight|bias)", n)
               for n in names)
    added = set(model.clip.state_dict()) - set(original.clip.state_dict())  # and every original key is kept:
    assert {f"clip.{key}" for key in added} == names and set(original.clip.state_dict()) <= set(model.clip.state_dict())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and name.startswith("clip.visual")}
    assert trainable == names

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model.encode_image(x, normalize=False).pow(2).sum()
    assert loss > 0
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == names


def test_adapters_survive_every_freeze_and_act_in_open_clips_forward():
    model = tiny_model()
    model.add_block_adapters(small_linear, small_linear)
    for freeze in ("all", "image", "text", "none"):
        model.set_freeze(freeze)
        assert all(p.requires_grad for p in model.adapter_parameters())
        visual_trains = {p.requires_grad for n, p in model.clip.visual.named_parameters() if ".adapter_" not in n}
        assert visual_trains == {freeze in ("none", "text")}
    x = images(2, 64)
    without = tiny_model()
    with torch.no_grad():
        out = model.run_blocks(model.embed_patches(x))
        with_maps = model.run_blocks(model.embed_patches(x), attention=True)
        intermediates = model.clip.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
        assert max_diff(out.pooled, model.encode_image(x)) <= 1e-5
        assert max_diff(out.pooled, without.encode_image(x)) > 1e-3
    for tokens, cls, patch in zip(out.tokens, intermediates["image_intermediates_prefix"],
                                  intermediates["image_intermediates"]):
        assert max_diff(tokens, torch.cat([cls, patch], dim=1)) <= 1e-5
    assert all(max_diff(a, b) <= 1e-5 for a, b in zip(with_maps.tokens, out.tokens))
    with pytest.raises(ValueError, match="already has block adapters"):
        model.add_block_adapters(small_linear, None)


def test_adapter_checkpoints_round_trip():
    trained = tiny_model()
    plain_state = copy.deepcopy(trained.state_dict())
    trained.add_block_adapters(small_linear, small_linear)
    fresh = tiny_model()
    fresh.add_block_adapters(small_linear, small_linear)  # other random values, overwritten by the load
    fresh.load_state_dict(copy.deepcopy(trained.state_dict()))  # strict
    x = images(2, 64)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(x), trained.encode_image(x))
    tiny_model().load_state_dict(plain_state)  # an adapter-free model loads an adapter-free checkpoint
    missing, unexpected = fresh.load_state_dict(plain_state, strict=False)
    assert not unexpected and missing and all(".adapter_" in key for key in missing)


# ----------------------------------------------------------------- feature maps and timm towers
def test_clip_feature_maps_equal_the_projected_last_block_tokens(tiny):
    x = images(2, 64)
    visual = tiny.clip.visual
    with torch.no_grad():
        maps = tiny.feature_maps(x)
        last = visual.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][-1]
        reference = visual.ln_post(last.permute(0, 2, 3, 1)) @ visual.proj  # open_clip's tokens, [B, h, w, D]
        tokens = tiny.encode_image_tokens(x, layers=1)
        lico = tiny.project_tokens(tokens.patches[-1], normalize=False).transpose(1, 2).unflatten(2, tokens.grid)
    assert tiny.text_aligned_images
    assert maps.shape == (2, tiny.embed_dim, 8, 8)
    torch.testing.assert_close(maps, reference.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps, lico, atol=0, rtol=0)


@pytest.mark.parametrize("freeze", ["image", "text"])
def test_timm_tower_gives_feature_maps_and_keeps_the_text_tower(freeze):
    model = VisionLanguageModel("xvlm-tiny", pretrained=None, freeze=freeze, image_encoder="timm:resnet18",
                                image_size=64)
    assert model.clip.visual is None and not any(k.startswith("clip.visual.") for k in model.state_dict())
    assert not model.text_aligned_images and model.image_size == 64
    assert model.feature_maps(images(2, 64)).shape == (2, 512, 2, 2)
    with pytest.raises(ValueError, match="encode_image needs the CLIP image tower"):
        model.encode_image(images(1, 64))
    timm_trains = {p.requires_grad for p in model.timm_encoder.parameters()}
    text_trains = {p.requires_grad for n, p in model.clip.named_parameters() if n.startswith("transformer.")}
    assert timm_trains == {freeze == "text"} and text_trains == {freeze == "image"}
    assert model.encode_texts(["a red star"]).shape == (1, model.embed_dim)


def test_bad_image_encoders_are_named():
    with pytest.raises(ValueError, match=re.escape("use 'clip' or 'timm:<model name>'")):
        VisionLanguageModel("xvlm-tiny", pretrained=None, image_encoder="resnet18")
    with pytest.raises(ValueError, match="timm has no model 'resnet1000'"):
        VisionLanguageModel("xvlm-tiny", pretrained=None, image_encoder="timm:resnet1000", image_size=64)
    wrn = VisionLanguageModel("xvlm-tiny", pretrained=None, image_encoder="timm:wrn28_2")
    with pytest.raises(ValueError, match="names no input size; pass image_size"):
        wrn.image_size
    with pytest.raises(ValueError, match="encoder_weights and encoder_kwargs configure a timm"):
        VisionLanguageModel("xvlm-tiny", pretrained=None, encoder_kwargs={"output_stride": 8})


# ----------------------------------------------------------------- sources and constants
def test_registered_sources_resolve_and_are_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "LOCAL_SOURCES", dict(backbones.LOCAL_SOURCES))
    source = tiny_model()
    path = tmp_path / "mine.pt"
    torch.save(source.clip.state_dict(), path)
    asked = []
    register_source("mine", lambda model_name: asked.append(model_name) or path)
    loaded = VisionLanguageModel("xvlm-tiny", pretrained="mine").eval()
    assert asked == ["xvlm-tiny"]
    x = images(1, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), source.encode_image(x))
    with pytest.raises(ValueError, match=r"'nope' is not a known source.*registered sources \[.*'mine'.*\]"):
        VisionLanguageModel("xvlm-tiny", pretrained="nope")


def test_clip_statistics_are_open_clips():
    assert backbones.CLIP_MEAN == transforms.CLIP_MEAN == open_clip.OPENAI_DATASET_MEAN
    assert backbones.CLIP_STD == transforms.CLIP_STD == open_clip.OPENAI_DATASET_STD
