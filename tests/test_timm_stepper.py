"""The ViT stepper (``embed_patches``, ``run_blocks``, ``norm_tokens``, ``vit_width``) on timm ViT towers.

References are independent of the code under test: timm's own ``forward_features`` and ``forward_head``, the
block outputs read with forward hooks on timm's blocks (whose patch embedding a hook may replace), and attention
recomputed here from each block's ``qkv`` weights. The towers are tiny and random (no weights are downloaded);
their parameters get extra noise so that attention is far from uniform and every token differs.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xvlm.backbones import PatchTokens, VisionLanguageModel

SMALL = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
TOWERS = {
    # name: (timm model, encoder_kwargs, image side)
    "plain": ("vit_tiny_patch16_224", {**SMALL, "img_size": 64}, 64),
    # DINOv2 with registers: 4 register tokens, no position on class/registers (no_embed_class), layer scale
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {**SMALL, "img_size": 32, "init_values": 0.5}, 32),
    # registers with positions, q/k norms, and NHWC patch tokens whose positions timm resamples
    "dynamic_reg": ("vit_tiny_patch16_224",
                    {**SMALL, "img_size": 48, "reg_tokens": 2, "qk_norm": True, "dynamic_img_size": True}, 48),
}
REGISTERS = {"plain": 0, "dinov2_reg": 4, "dynamic_reg": 2}


def images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def timm_model(name: str, kwargs: dict, side: int, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel("xvlm-tiny", pretrained=None, image_encoder=f"timm:{name}", encoder_kwargs=kwargs,
                                image_size=side).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # timm's init leaves attention nearly uniform and class/register tokens nearly equal
        for param in model.timm_encoder.parameters():
            param.add_(0.15 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=list(TOWERS))
def tower(request) -> tuple[str, VisionLanguageModel, int]:
    name, kwargs, side = TOWERS[request.param]
    return request.param, timm_model(name, kwargs, side), side


def vit_of(model: VisionLanguageModel) -> nn.Module:
    return model.timm_encoder.model


def class_patches_registers(x: torch.Tensor, registers: int) -> torch.Tensor:
    """timm's ``[B, 1+R+N, ...]`` order (class, registers, patches) -> class, patches, registers."""
    return torch.cat([x[:, :1], x[:, 1 + registers:], x[:, 1:1 + registers]], dim=1)


def class_and_patches(x: torch.Tensor, registers: int) -> torch.Tensor:
    return torch.cat([x[:, :1], x[:, 1 + registers:]], dim=1)


def block_outputs(vit: nn.Module, x: torch.Tensor, patch_tokens: torch.Tensor | None = None):
    """timm's ``forward_features(x)`` and every block's input and output, read with hooks; ``patch_tokens``
    replaces what ``patch_embed`` returns."""
    inputs, outputs, handles = [], [], []
    for block in vit.blocks:
        handles.append(block.register_forward_pre_hook(lambda module, args: inputs.append(args[0])))
        handles.append(block.register_forward_hook(lambda module, args, out: outputs.append(out)))
    if patch_tokens is not None:
        handles.append(vit.patch_embed.register_forward_hook(lambda module, args, out: patch_tokens))
    try:
        features = vit.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return features, inputs, outputs


def recomputed_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mean_h softmax(q_h k_hᵀ / √d)`` from the block's ``qkv`` weights on its input ``x [B, L, W]``."""
    attn = block.attn
    q, k, _ = (block.norm1(x) @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
    q, k = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k))  # [B, h, L, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = torch.einsum("bhld,bhmd->bhlm", q, k) / q.shape[-1] ** 0.5
    return logits.softmax(dim=-1).mean(dim=1)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 2e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


# ----------------------------------------------------------------- tokens and pooled feature against timm's forward
@pytest.mark.parametrize("attention", [False, True])
def test_run_blocks_computes_timms_forward_features(tower, attention):
    key, model, side = tower
    vit, registers = vit_of(model), REGISTERS[key]
    x = images(2, side)
    with torch.no_grad():
        patches = model.embed_patches(x)
        out = model.run_blocks(patches, attention=attention, normalize=False)
        features, _, block_outs = block_outputs(vit, x)
        pooled = vit.forward_head(features, pre_logits=True)  # global_pool='' (TimmFeatures): the whole sequence
    n, width = patches.grid[0] * patches.grid[1], vit.embed_dim
    assert patches.grid == (side // 8, side // 8) and patches.tokens.shape == (2, n, width)
    assert out.layers == (0, 1) and out.num_registers == registers == model.num_registers
    assert [t.shape for t in out.tokens] == [(2, 1 + n, width)] * 2
    assert [r.shape for r in out.registers] == [(2, registers, width)] * 2
    for ours, theirs in zip(out.tokens, block_outs):
        close(ours, class_and_patches(theirs, registers))
    for ours, theirs in zip(out.registers, block_outs):
        close(ours, theirs[:, 1:1 + registers])
    close(model.norm_tokens(out.tokens[-1]), class_and_patches(features, registers))
    assert pooled.dim() == 3 and out.pooled.shape == (2, width)
    close(out.pooled, pooled[:, 0])
    with torch.no_grad():
        unit = model.run_blocks(patches, attention=attention).pooled
    close(unit, F.normalize(pooled[:, 0], dim=-1))
    assert (out.attention is None) != attention


def test_the_unfused_path_equals_the_fused_one(tower):
    _, model, side = tower
    with torch.no_grad():
        patches = model.embed_patches(images(2, side, seed=1))
        fused = model.run_blocks(patches, normalize=False)
        unfused = model.run_blocks(patches, attention=True, normalize=False)
    assert max(float((a - b).abs().max()) for a, b in zip(fused.tokens, unfused.tokens)) <= 1e-5
    assert float((fused.pooled - unfused.pooled).abs().max()) <= 1e-5


def test_pooled_follows_the_models_head(tower):
    """A head that pools (here average pooling over the patches) is what ``pooled`` reads."""
    key, model, side = tower
    vit = vit_of(model)
    x = images(2, side, seed=2)
    vit.reset_classifier(0, "avg")
    try:
        with torch.no_grad():
            out = model.run_blocks(model.embed_patches(x), normalize=False)
            reference = vit.forward_head(vit.forward_features(x), pre_logits=True)
    finally:
        vit.reset_classifier(0, "")
    assert reference.shape == (2, vit.embed_dim)
    close(out.pooled, reference)
    assert float((out.pooled - out.tokens[-1][:, 0]).abs().max()) > 1e-3  # not the class token


# ----------------------------------------------------------------- attention
def test_attention_equals_a_recomputation_from_qkv(tower):
    key, model, side = tower
    vit, registers = vit_of(model), REGISTERS[key]
    x = images(2, side, seed=3)
    with torch.no_grad():
        out = model.run_blocks(model.embed_patches(x), attention=True)
        _, block_ins, _ = block_outputs(vit, x)
        references = [recomputed_attention(block, y) for block, y in zip(vit.blocks, block_ins)]
    length = 1 + out.grid[0] * out.grid[1] + registers
    assert [a.shape for a in out.attention] == [(2, length, length)] * 2
    for ours, theirs in zip(out.attention, references):
        assert ours.dtype == torch.float32
        reordered = class_patches_registers(class_patches_registers(theirs, registers).transpose(1, 2), registers)
        close(ours, reordered.transpose(1, 2), atol=1e-5)
        close(ours.sum(dim=-1), torch.ones(2, length), atol=1e-5)
    assert float(references[0].amax()) > 4 / length  # far from uniform: the test can tell tokens apart


def test_attention_of_chosen_blocks_only(tower):
    _, model, side = tower
    x = images(1, side, seed=4)
    with torch.no_grad():
        every = model.run_blocks(model.embed_patches(x), attention=True)
        last = model.run_blocks(model.embed_patches(x), attention=True, layers=[-1])
    assert last.layers == (1,) and len(last.attention) == len(last.tokens) == 1
    close(last.attention[0], every.attention[1])
    close(last.tokens[0], every.tokens[1])


def test_register_attention_is_ordered_class_patches_registers():
    """The class token's attention to each register, read from the recomputation at the register's timm index
    ``1 + j``, is column ``1 + N + j`` of the returned map."""
    name, kwargs, side = TOWERS["dinov2_reg"]
    model = timm_model(name, kwargs, side, seed=5)
    vit = vit_of(model)
    x = images(2, side, seed=5)
    with torch.no_grad():
        out = model.run_blocks(model.embed_patches(x), attention=True)
        _, block_ins, _ = block_outputs(vit, x)
        reference = recomputed_attention(vit.blocks[0], block_ins[0])
    n = out.grid[0] * out.grid[1]
    assert out.num_registers == 4 and out.attention[0].shape == (2, 1 + n + 4, 1 + n + 4)
    close(out.attention[0][:, 0, 1 + n:], reference[:, 0, 1:5], atol=1e-5)  # class -> registers
    close(out.attention[0][:, 0, 1:1 + n], reference[:, 0, 5:], atol=1e-5)  # class -> patches
    close(out.attention[0][:, 1 + n:, 0], reference[:, 1:5, 0], atol=1e-5)  # registers -> class


# ----------------------------------------------------------------- edits happen before the position embeddings
def test_an_edited_patch_token_runs_as_timms_blocks_on_the_edited_embedding(tower):
    key, model, side = tower
    vit, registers = vit_of(model), REGISTERS[key]
    x = images(2, side, seed=6)
    with torch.no_grad():
        patches = model.embed_patches(x)
        edited = patches.tokens.clone()
        edited[:, 5] += torch.randn(edited.shape[-1], generator=torch.Generator().manual_seed(6))
        out = model.run_blocks(PatchTokens(tokens=edited, grid=patches.grid), attention=True, normalize=False)
        plain = model.run_blocks(patches, normalize=False)
        # timm's own forward with patch_embed returning the edited tokens (NHWC for a dynamic_img_size model)
        replacement = edited.unflatten(1, patches.grid) if vit.dynamic_img_size else edited
        features, _, block_outs = block_outputs(vit, x, replacement)
    close(out.tokens[-1], class_and_patches(block_outs[-1], registers))
    close(out.registers[-1], block_outs[-1][:, 1:1 + registers])
    close(model.norm_tokens(out.tokens[-1]), class_and_patches(features, registers))
    close(out.pooled, vit.forward_head(features, pre_logits=True)[:, 0])
    assert float((out.tokens[-1] - plain.tokens[-1]).abs().max()) > 1e-2


# ----------------------------------------------------------------- sizes, registers, widths
def test_dynamic_img_size_runs_at_another_input_size():
    name, kwargs, _ = TOWERS["dynamic_reg"]
    model = timm_model(name, kwargs, 48)
    vit = vit_of(model)
    x = images(2, 64, seed=7)  # 8x8 patches instead of the model's 6x6: timm resamples the positions
    with torch.no_grad():
        patches = model.embed_patches(x)
        out = model.run_blocks(patches, normalize=False)
        features = vit.forward_features(x)
    assert patches.grid == (8, 8) and out.tokens[-1].shape == (2, 65, 48) and out.registers[-1].shape == (2, 2, 48)
    close(model.norm_tokens(out.tokens[-1]), class_and_patches(features, 2))


def test_a_fixed_size_model_refuses_another_grid():
    name, kwargs, side = TOWERS["plain"]
    model = timm_model(name, kwargs, side)
    patches = model.embed_patches(images(1, side))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model.run_blocks(PatchTokens(tokens=patches.tokens[:, :36], grid=(6, 6)))


def test_register_tokens_through_encoder_kwargs():
    """``reg_tokens`` on timm's VisionTransformer class (not a register entry point) is handled the same way."""
    model = timm_model("vit_tiny_patch16_224", {**SMALL, "img_size": 32, "reg_tokens": 4}, 32)
    with torch.no_grad():
        out = model.run_blocks(model.embed_patches(images(3, 32)), attention=True)
    assert model.num_registers == out.num_registers == 4
    assert out.tokens[-1].shape == (3, 17, 48) and out.registers[-1].shape == (3, 4, 48)
    assert out.attention[-1].shape == (3, 21, 21)


def test_norm_tokens_is_the_models_final_norm(tower):
    _, model, _ = tower
    tokens = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        close(model.norm_tokens(tokens), vit_of(model).norm(tokens))
        assert float((model.norm_tokens(tokens) - F.layer_norm(tokens, (48,))).abs().max()) > 1e-3  # affine counts


def test_vit_width_for_both_towers(tower):
    _, model, _ = tower
    assert model.vit_width == 48 == model.embed_patches(images(1, model.image_size)).tokens.shape[-1]
    torch.manual_seed(0)
    clip = VisionLanguageModel("xvlm-tiny", pretrained=None)
    assert clip.vit_width == clip.clip.visual.transformer.width == 96


# ----------------------------------------------------------------- what the stepper refuses
def test_a_non_vit_timm_tower_is_refused_by_name():
    model = VisionLanguageModel("xvlm-tiny", pretrained=None, image_encoder="timm:resnet18", image_size=64)
    x = images(1, 64)
    calls = {"embed_patches": lambda: model.embed_patches(x), "norm_tokens": lambda: model.norm_tokens(x),
             "vit_width": lambda: model.vit_width,
             "run_blocks": lambda: model.run_blocks(PatchTokens(tokens=torch.zeros(1, 4, 8), grid=(2, 2)))}
    for what, call in calls.items():
        refusal = rf"{what} needs an open_clip ViT or a timm VisionTransformer.*timm:resnet18.*ResNet"
        with pytest.raises(ValueError, match=refusal):
            call()
    assert model.num_registers == 0


def test_a_timm_vit_without_class_token_is_refused_by_name():
    model = timm_model("vit_tiny_patch16_224", {**SMALL, "img_size": 32, "class_token": False}, 32)
    with pytest.raises(ValueError, match=r"run_blocks needs a ViT with a class token.*vit_tiny_patch16_224.*"
                                         r"class_token=False"):
        model.run_blocks(PatchTokens(tokens=torch.zeros(1, 16, 48), grid=(4, 4)))


def test_other_block_types_are_refused():
    model = timm_model("vit_tiny_patch16_224", {**SMALL, "img_size": 32, "attn_layer": "diff"}, 32)
    with pytest.raises(ValueError, match="embed_patches needs timm's Block with its Attention.*DiffAttention"):
        model.embed_patches(images(1, 32))


def test_open_clip_only_calls_still_need_the_clip_tower(tower):
    _, model, _ = tower
    with pytest.raises(ValueError, match="project_tokens needs an open_clip ViT image tower"):
        model.project_tokens(torch.zeros(1, 2, 48))
