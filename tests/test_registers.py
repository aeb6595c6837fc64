"""Register tokens (Darcet et al. 2024) on open_clip ViTs: ``xvlm-tiny-reg`` and the stepper's register contract.

References are independent of the code under test where possible: open_clip's own ``encode_image``,
``forward_intermediates`` and checkpoint loader, and attention recomputed here from ``in_proj``.
"""

import copy

import pytest
import torch
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn

from xvlm.backbones import REGISTER_TOKENS, RegisterVisionTransformer, VisionLanguageModel

R = REGISTER_TOKENS["xvlm-tiny-reg"]
N = 64  # 8 x 8 tokens at 64 px
WIDTH = 96


def images(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def model(name: str = "xvlm-tiny-reg", **kwargs) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(name, pretrained=None, **kwargs).eval()


@pytest.fixture(scope="module")
def reg() -> VisionLanguageModel:
    return model()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def recomputed_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mean_h softmax(q_h k_hᵀ / √d)`` from the block's in_proj weights on its input ``x [B, L, W]``."""
    heads = block.attn.num_heads
    q, k, _ = (block.ln_1(x) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.unflatten(-1, (heads, -1)) for t in (q, k))
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
    return logits.softmax(dim=-1).mean(dim=1)


# ----------------------------------------------------------------- nothing changes without registers
def test_towers_without_registers_are_unchanged():
    tiny, reg = model("xvlm-tiny"), model()
    assert type(tiny.clip.visual) is VisionTransformer and tiny.num_registers == 0
    assert "xvlm-tiny" not in REGISTER_TOKENS and REGISTER_TOKENS == {"xvlm-tiny-reg": 4}
    assert not any("register" in key for key in tiny.clip.state_dict())
    # xvlm-tiny-reg is xvlm-tiny plus one parameter
    assert set(reg.clip.state_dict()) - set(tiny.clip.state_dict()) == {"visual.register_tokens"}
    assert set(tiny.clip.state_dict()) <= set(reg.clip.state_dict())
    x = images(2)
    with torch.no_grad():
        out = tiny.run_blocks(tiny.embed_patches(x), attention=True)
        prefix = tiny.clip.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
    assert out.num_registers == 0 and [r.shape for r in out.registers] == [(2, 0, WIDTH)] * 4
    assert [a.shape for a in out.attention] == [(2, 1 + N, 1 + N)] * 4
    assert max_diff(out.pooled, tiny.encode_image(x)) <= 1e-5
    assert prefix["image_intermediates_prefix"][0].shape == (2, 1, WIDTH)
    assert model("xvlm-tiny-rn").num_registers == 0
    timm_tower = VisionLanguageModel("xvlm-tiny", pretrained=None, image_encoder="timm:resnet18", image_size=64)
    assert timm_tower.num_registers == 0


def test_the_register_config_is_xvlm_tiny_with_the_same_build_recipe(reg):
    from xvlm.shapes_pretraining import RECIPES

    assert RECIPES["xvlm-tiny-reg"] == RECIPES["xvlm-tiny"]
    tiny = model("xvlm-tiny")
    shapes = {k: v.shape for k, v in tiny.clip.state_dict().items()}
    assert {k: v.shape for k, v in reg.clip.state_dict().items() if k != "visual.register_tokens"} == shapes
    assert isinstance(reg.clip.visual, RegisterVisionTransformer) and reg.num_registers == R
    assert reg.clip.visual.register_tokens.shape == (R, WIDTH)
    assert "register_tokens" in reg.clip.visual.no_weight_decay()


# ----------------------------------------------------------------- stepper == open_clip's forward
def test_pooled_equals_encode_image(reg):
    x = images(2)
    with torch.no_grad():
        out = reg.run_blocks(reg.embed_patches(x))
        raw = reg.run_blocks(reg.embed_patches(x), normalize=False)
        assert max_diff(out.pooled, reg.encode_image(x)) <= 1e-5
        assert max_diff(raw.pooled, reg.encode_image(x, normalize=False)) <= 1e-5
        assert max_diff(raw.pooled, reg.clip.visual.forward_intermediates(x)["image_features"]) <= 1e-5
    assert out.num_registers == R
    assert [t.shape for t in out.tokens] == [(2, 1 + N, WIDTH)] * 4
    assert [r.shape for r in out.registers] == [(2, R, WIDTH)] * 4


def test_registers_change_the_image_feature(reg):
    x = images(2)
    changed = copy.deepcopy(reg)
    with torch.no_grad():
        # new directions (ln_pre removes a constant shift and a common scale of each register)
        changed.clip.visual.register_tokens.normal_(generator=torch.Generator().manual_seed(5))
        assert max_diff(changed.encode_image(x), reg.encode_image(x)) > 1e-4
        assert max_diff(changed.run_blocks(changed.embed_patches(x)).pooled, changed.encode_image(x)) <= 1e-5


def test_tokens_and_registers_are_open_clips_intermediates(reg):
    x = images(2)
    with torch.no_grad():
        out = reg.run_blocks(reg.embed_patches(x))
        theirs = reg.clip.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
        grid = reg.clip.visual.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"]
    assert grid[-1].shape == (2, WIDTH, 8, 8)
    for tokens, registers, prefix, patches in zip(out.tokens, out.registers, theirs["image_intermediates_prefix"],
                                                  theirs["image_intermediates"]):
        assert prefix.shape == (2, 1 + R, WIDTH) and patches.shape == (2, N, WIDTH)
        assert max_diff(tokens, torch.cat([prefix[:, :1], patches], dim=1)) <= 1e-5
        assert max_diff(registers, prefix[:, 1:]) <= 1e-5


def test_other_input_size_matches_open_clips_resized_checkpoint(reg, tmp_path):
    path = tmp_path / "reg.pt"
    torch.save(reg.clip.state_dict(), path)
    resized = VisionLanguageModel("xvlm-tiny-reg", pretrained=str(path), image_size=96).eval()
    x = images(1, 96, seed=1)
    with torch.no_grad():
        out = reg.run_blocks(reg.embed_patches(x))
        assert out.grid == (12, 12)
        assert max_diff(out.pooled, resized.encode_image(x)) <= 1e-5


def test_patch_dropout_keeps_the_registers_in_both_forwards():
    reg = model()
    reg.clip.visual.patch_dropout = PatchDropout(0.5)
    reg.train()
    x = images(2)
    with torch.no_grad():
        torch.manual_seed(1)
        out = reg.run_blocks(reg.embed_patches(x))
        torch.manual_seed(1)
        reference = reg.encode_image(x)
    assert out.tokens[-1].shape == (2, 1 + N // 2, WIDTH) and out.registers[-1].shape == (2, R, WIDTH)
    assert max_diff(out.pooled, reference) <= 1e-5


# ----------------------------------------------------------------- attention with register columns
def test_attention_is_ordered_class_patches_registers(reg):
    x = images(2)
    blocks = reg.clip.visual.transformer.resblocks
    with torch.no_grad():
        patches = reg.embed_patches(x)
        plain = reg.run_blocks(patches)
        out = reg.run_blocks(patches, attention=True)
        # the blocks' inputs in the transformer's own order [class; registers; patches]: open_clip's embeddings,
        # then block l-1's outputs put back together
        inputs = [reg.clip.visual._embeds(x)] + [torch.cat([t[:, :1], r, t[:, 1:]], dim=1)
                                                  for t, r in zip(out.tokens[:-1], out.registers[:-1])]
        inside = [recomputed_attention(block, h) for block, h in zip(blocks, inputs)]
    order = [0, *range(1 + R, 1 + R + N), *range(1, 1 + R)]
    for maps, reference in zip(out.attention, inside):
        assert maps.shape == (2, 1 + N + R, 1 + N + R) and maps.dtype == torch.float32
        torch.testing.assert_close(maps.sum(dim=-1), torch.ones(2, 1 + N + R), atol=1e-5, rtol=0)
        torch.testing.assert_close(maps, reference[:, order][:, :, order], atol=1e-5, rtol=0)
        # class row: patch columns are the class token's attention to tokens[:, 1:], the rest goes to registers
        torch.testing.assert_close(maps[:, 0, 1:1 + N], reference[:, 0, 1 + R:], atol=1e-5, rtol=0)
        torch.testing.assert_close(maps[:, 0, 1 + N:], reference[:, 0, 1:1 + R], atol=1e-5, rtol=0)
        assert float(maps[:, :, 1 + N:].sum()) > 0  # registers take part in the attention
    for a, b in zip(out.tokens + out.registers, plain.tokens + plain.registers):
        assert max_diff(a, b) <= 1e-5
    assert max_diff(out.pooled, plain.pooled) <= 1e-5
    subset = reg.run_blocks(patches, attention=True, layers=[-1])
    torch.testing.assert_close(subset.attention[0], out.attention[-1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------- training and weights
def test_registers_receive_gradients_and_follow_the_image_freeze():
    reg = model()
    registers = reg.clip.visual.register_tokens
    x = images(2)
    for loss in (reg.encode_image(x, normalize=False).pow(2).sum(),
                 reg.run_blocks(reg.embed_patches(x), normalize=False).pooled.pow(2).sum()):
        registers.grad = None
        loss.backward()
        assert registers.grad is not None and float(registers.grad.abs().min()) > 0
    reg.set_freeze("image")
    assert not registers.requires_grad
    reg.set_freeze("text")
    assert registers.requires_grad


def test_state_dict_round_trips_through_a_weights_file(reg, tmp_path):
    trained = copy.deepcopy(reg)
    with torch.no_grad():
        trained.clip.visual.register_tokens.normal_(generator=torch.Generator().manual_seed(5))
    state = trained.clip.state_dict()
    assert "visual.register_tokens" in state and "clip.visual.register_tokens" in trained.state_dict()
    path = tmp_path / "xvlm-tiny-reg.pt"
    torch.save(state, path)
    loaded = VisionLanguageModel("xvlm-tiny-reg", pretrained=str(path)).eval()
    assert all(torch.equal(value, loaded.clip.state_dict()[key]) for key, value in state.items())
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), trained.encode_image(x))
        assert torch.equal(loaded.run_blocks(loaded.embed_patches(x)).pooled,
                           trained.run_blocks(trained.embed_patches(x)).pooled)
    fresh = model()
    fresh.load_state_dict(trained.state_dict())  # strict, through the wrapper
    assert torch.equal(fresh.clip.visual.register_tokens, trained.clip.visual.register_tokens)
    plain = tmp_path / "xvlm-tiny.pt"
    torch.save(model("xvlm-tiny").clip.state_dict(), plain)
    with pytest.raises(RuntimeError, match="register_tokens"):
        VisionLanguageModel("xvlm-tiny-reg", pretrained=str(plain))


def test_patch_token_outputs_drop_the_registers(reg):
    x = images(2)
    with torch.no_grad():
        tokens = reg.encode_image_tokens(x, layers=2)
        maps = reg.feature_maps(x)
        last = reg.clip.visual.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][-1]
        reg.clip.visual.output_tokens = True
        try:
            pooled, open_clip_tokens = reg.clip.visual(x)
        finally:
            reg.clip.visual.output_tokens = False
    assert tokens.grid == (8, 8)
    assert [p.shape for p in tokens.patches] == [(2, 8 * 8, WIDTH)] * 2
    assert [c.shape for c in tokens.cls] == [(2, WIDTH)] * 2
    assert [r.shape for r in tokens.registers] == [(2, R, WIDTH)] * 2
    assert open_clip_tokens.shape == (2, N, WIDTH)  # ln_post'ed patch tokens of open_clip's forward
    torch.testing.assert_close(open_clip_tokens, reg.clip.visual.ln_post(tokens.patches[-1]), atol=1e-5, rtol=0)
    reference = reg.clip.visual.ln_post(last.permute(0, 2, 3, 1)) @ reg.clip.visual.proj
    assert maps.shape == (2, reg.embed_dim, 8, 8)
    torch.testing.assert_close(maps, reference.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_pretrained_shapes_builds_and_loads_the_register_backbone(tmp_path, monkeypatch):
    from dataclasses import replace

    from open_clip.model import resize_pos_embed

    from xvlm import shapes_pretraining

    quick = replace(shapes_pretraining.RECIPES["xvlm-tiny-reg"], steps=2, batch_size=8, val_size=32)
    monkeypatch.setenv("XVLM_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setattr(shapes_pretraining, "RECIPES", {"xvlm-tiny-reg": quick})
    loaded = VisionLanguageModel("xvlm-tiny-reg", pretrained="shapes")
    path = tmp_path / "backbones" / "xvlm-tiny-reg-shapes.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["visual.register_tokens"].shape == (R, WIDTH)
    resize_pos_embed(saved, loaded.clip)  # trained at 48 px, loaded at 64 px
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.clip.state_dict().items())
