import pytest
import torch

from xvlm.backbones import VisionLanguageModel, available_models, conv_stem

PROMPTS = ["a photo of a red striped star.", "a blue circle", "an image of a green dotted hexagon on clutter."]


def test_registered_configs_are_available():
    assert {"xvlm-tiny", "xvlm-tiny-rn", "ViT-B-16"} <= set(available_models())


@pytest.mark.parametrize("name", ["xvlm-tiny", "xvlm-tiny-rn"])
def test_prompt_embeddings_of_real_tokens_equal_encode_text(name):
    model = VisionLanguageModel(name, pretrained=None).eval()
    tokens = model.tokenize(PROMPTS)
    with torch.no_grad():
        direct = model.clip.encode_text(tokens, normalize=True)  # open_clip's own path over all positions
        ours = model.encode_text(tokens)
        via_embeddings = model.encode_prompt_embeddings(model.token_embeddings(tokens), tokens.argmax(dim=-1))
    assert model.pools_causal_eot
    assert direct.shape == (len(PROMPTS), model.embed_dim)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(via_embeddings, direct, atol=1e-5, rtol=0)


def test_soft_prompt_gradients_reach_the_context_vectors(tiny_vit):
    tokens = tiny_vit.tokenize(["X X X red star."])
    embeddings = tiny_vit.token_embeddings(tokens).detach().clone()
    context = torch.zeros(1, 3, tiny_vit.text_width, requires_grad=True)
    prompt = torch.cat([embeddings[:, :1], embeddings[:, 1:4] + context, embeddings[:, 4:]], dim=1)
    tiny_vit.encode_prompt_embeddings(prompt, tokens.argmax(-1)).sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_intermediate_tokens_have_documented_shapes(tiny_vit):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tiny_vit.encode_image_tokens(images, layers=[0, 3])
        last = tiny_vit.encode_image_tokens(images, layers=1)
        pooled = tiny_vit.encode_image(images, normalize=False)
    width = tiny_vit.clip.visual.transformer.width
    assert out.grid == (8, 8)
    assert [p.shape for p in out.patches] == [(2, 64, width)] * 2
    assert [c.shape for c in out.cls] == [(2, width)] * 2
    torch.testing.assert_close(last.patches[0], out.patches[1])
    # The pooled feature is the projected class token of the last block.
    torch.testing.assert_close(tiny_vit.project_tokens(out.cls[1], normalize=False), pooled, atol=1e-5, rtol=1e-5)
    assert tiny_vit.project_tokens(out.patches[1]).shape == (2, 64, tiny_vit.embed_dim)
    # norm_tokens is the LayerNorm before the projection: a zero-mean, unit-variance row, gain and bias applied
    visual = tiny_vit.clip.visual
    x = out.patches[1]
    standard = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + visual.ln_post.eps).sqrt()
    normed = tiny_vit.norm_tokens(x)
    torch.testing.assert_close(normed, standard * visual.ln_post.weight + visual.ln_post.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed @ visual.proj, tiny_vit.project_tokens(x, normalize=False))


def test_conv_stem_keeps_the_patch_grid():
    stem = conv_stem(width=40, patch_size=8, channels=(8, 16, 24))
    assert stem(torch.randn(1, 3, 64, 64)).shape == (1, 40, 8, 8)
    with pytest.raises(ValueError, match="patch_size=16"):
        conv_stem(width=40, patch_size=16, channels=(8, 16, 24))


def test_conv_stem_runs_channels_last_with_the_results_and_names_of_a_plain_stack():
    torch.manual_seed(0)
    stem = conv_stem(width=40, patch_size=8, channels=(8, 16, 24)).eval()
    plain = torch.nn.Sequential(*stem).to(memory_format=torch.contiguous_format)  # the same layers, NCHW
    images = torch.randn(2, 3, 64, 64)
    out = stem(images)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert list(stem.state_dict()) == list(plain.state_dict())  # checkpoints of either load into the other
    torch.testing.assert_close(out, plain(images), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in stem.parameters())


def test_local_file_pretrained_round_trips(tmp_path):
    torch.manual_seed(0)
    source = VisionLanguageModel("xvlm-tiny", pretrained=None).eval()
    path = tmp_path / "weights.pt"
    torch.save(source.clip.state_dict(), path)
    loaded = VisionLanguageModel("xvlm-tiny", pretrained=str(path)).eval()
    images, tokens = torch.randn(2, 3, 64, 64), source.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), source.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))


def test_unknown_model_name_lists_available_models():
    with pytest.raises(ValueError, match="Unknown model 'ViT-Q-99'.*xvlm-tiny"):
        VisionLanguageModel("ViT-Q-99", pretrained=None)


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match=f"file '{missing}' does not exist"):
        VisionLanguageModel("xvlm-tiny", pretrained=str(missing))


def test_unknown_tag_lists_the_known_tags():
    with pytest.raises(ValueError, match="openai"):
        VisionLanguageModel("ViT-B-32", pretrained="not-a-tag")


@pytest.mark.parametrize(
    ("freeze", "image_trains", "text_trains"),
    [("none", True, True), ("image", False, True), ("text", True, False), ("all", False, False)],
)
def test_freeze_policies(freeze, image_trains, text_trains):
    model = VisionLanguageModel("xvlm-tiny", pretrained=None, freeze=freeze)
    params = dict(model.clip.named_parameters())
    assert all(p.requires_grad == image_trains for n, p in params.items() if n.startswith("visual."))
    text = [p for n, p in params.items() if n.startswith(("transformer.", "token_embedding", "ln_final"))]
    assert text and all(p.requires_grad == text_trains for p in text)
    assert params["logit_scale"].requires_grad == (freeze != "all")
    with pytest.raises(ValueError, match="freeze='some'"):
        model.set_freeze("some")


def test_every_weight_has_one_name_and_legacy_text_aliases_still_load(tiny_vit):
    state = tiny_vit.state_dict()
    assert not any(key.startswith("text.") for key in state)
    assert "clip.token_embedding.weight" in state
    legacy = {**state, **{"text." + key[len("clip."):]: value for key, value in state.items()
                          if key.startswith("clip.") and not key.startswith("clip.visual.")}}
    fresh = VisionLanguageModel("xvlm-tiny", pretrained=None)
    fresh.load_state_dict(legacy)  # strict: the aliases are dropped, every real weight is loaded
    assert torch.equal(fresh.text.token_embedding.weight, tiny_vit.text.token_embedding.weight)
