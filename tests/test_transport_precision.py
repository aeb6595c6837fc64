"""Transport runs in float32 under any autocast or feature dtype: Sinkhorn, LICO's two losses, LaZSL's scores."""

import pytest
import torch
import torch.nn.functional as F

from datamodules.shapes import ShapesDataModule
from xvlm.methods.lico import LICO, manifold_matching_loss, optimal_transport_loss
from xvlm.ot import float32_region, sinkhorn
from xvlm.zeroshot import LaZSLSettings, lazsl_scores


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _tokens(seed: int, b: int = 3, n: int = 40, m: int = 6, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random visual ``[B, N, d]`` and language ``[B, M, d]`` tokens; their costs ``2 − 2 cos`` spread over ~3."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g)


def test_float32_region_leaves_autocast_and_upcasts_half_precision_only():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(4, 8, dtype=torch.float64)
    with bf16_autocast():
        assert (x.float() @ x.float().T).dtype == torch.bfloat16  # what the region is for (PITFALLS)
        with float32_region(x, y) as (x32, y64):
            product = x32 @ x32.T
            assert (product.dtype, x32.dtype, y64.dtype) == (torch.float32, torch.float32, torch.float64)
    product.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("eps", [0.5, 0.1])  # scaling form (R / ε ≈ 6), log domain (R / ε ≈ 30)
def test_sinkhorn_ignores_autocast_and_upcasts_half_precision_costs(eps):
    visual, language = _tokens(0)
    cost = 2 - 2 * F.normalize(visual, dim=-1) @ F.normalize(language, dim=-1).mT
    plain = sinkhorn(cost, eps=eps, tol=1e-4)
    with bf16_autocast():
        inside = sinkhorn(cost, eps=eps, tol=1e-4)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    rounded = cost.bfloat16()
    assert torch.equal(sinkhorn(rounded, eps=eps, tol=1e-4), sinkhorn(rounded.float(), eps=eps, tol=1e-4))


def test_transport_loss_under_autocast_equals_the_float32_loss_and_reaches_the_features():
    visual, language = _tokens(1)
    visual.requires_grad_(True)
    loss, plan = optimal_transport_loss(visual, language)
    (grad,) = torch.autograd.grad(loss, visual)
    with bf16_autocast():
        amp_loss, amp_plan = optimal_transport_loss(visual, language)
    assert (amp_plan.dtype, amp_loss.dtype) == (torch.float32, torch.float32)
    torch.testing.assert_close(amp_plan, plan, atol=1e-7, rtol=1e-5)
    assert abs(amp_loss.item() - loss.item()) < 1e-6
    (amp_grad,) = torch.autograd.grad(amp_loss, visual)
    torch.testing.assert_close(amp_grad, grad, atol=1e-6, rtol=1e-4)


def test_half_precision_tokens_are_transported_in_float32_with_gradients():
    visual, language = _tokens(2)
    visual = visual.bfloat16().requires_grad_(True)
    language = language.bfloat16()
    with bf16_autocast():
        loss, plan = optimal_transport_loss(visual, language)
    reference_loss, reference_plan = optimal_transport_loss(visual.detach().float(), language.float())
    assert plan.dtype == torch.float32
    torch.testing.assert_close(plan, reference_plan, atol=1e-7, rtol=1e-5)
    assert abs(loss.item() - reference_loss.item()) < 1e-6
    loss.backward()
    assert visual.grad.dtype == torch.bfloat16 and bool(torch.isfinite(visual.grad).all())
    assert bool(visual.grad.abs().sum() > 0)


def test_manifold_matching_under_autocast_equals_the_float32_loss():
    g = torch.Generator().manual_seed(3)
    image, language = torch.randn(6, 5, 8, generator=g), torch.randn(6, 4, 8, generator=g)
    image.requires_grad_(True)
    log_scale = torch.tensor(2.6, requires_grad=True)
    plain = manifold_matching_loss(image, language, log_scale)
    with bf16_autocast():
        amp = manifold_matching_loss(image, language, log_scale)
    assert amp.dtype == torch.float32
    assert abs(amp.item() - plain.item()) < 1e-6
    amp.backward()
    assert bool(image.grad.abs().sum() > 0) and float(log_scale.grad) != 0


@pytest.fixture(scope="module")
def shapes():
    data = ShapesDataModule(task="attributes", image_size=64, batch_size=6, train_size=12, val_size=12)
    data.setup("fit")
    return data


def test_lico_losses_under_bf16_autocast_stay_float32_and_close_to_the_float32_run(shapes):
    torch.manual_seed(0)
    module = LICO(model="xvlm-tiny", pretrained=None, n_ctx=4, mapper_hidden=32)
    module.attach_task(shapes.task)
    module.eval()  # no dropout: both runs see the same network
    torch.manual_seed(0)
    batch = next(iter(shapes.train_dataloader()))
    with torch.no_grad():
        plain = module.losses(batch)
    with bf16_autocast():
        amp = module.losses(batch)
    assert amp["ot"].dtype == amp["mm"].dtype == torch.float32
    assert abs(amp["ot"].item() - plain["ot"].item()) < 1e-3  # only the encoders ran in bfloat16
    amp["loss"].backward()
    assert bool(module.backbone.clip.visual.conv1[0].weight.grad.abs().sum() > 0)
    assert bool(module.mapper[-1].weight.grad.abs().sum() > 0)


def _lazsl_features(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(4)
    crops, glob = torch.randn(2, 7, 12, generator=g), torch.randn(2, 12, generator=g)
    desc = torch.randn(5, 4, 12, generator=g)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True] * 3 + [False], [True] + [False] * 3, [True] * 4])
    return crops.to(dtype), glob.to(dtype), desc.to(dtype), mask


@pytest.mark.parametrize("autocast", [False, True])
def test_lazsl_scores_of_bf16_features_are_the_float32_scores_of_the_same_values(autocast):
    crops, glob, desc, mask = _lazsl_features(torch.bfloat16)
    settings = LaZSLSettings()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        half = lazsl_scores(crops, glob, desc, mask, settings)
    upcast = lazsl_scores(crops.float(), glob.float(), desc.float(), mask, settings)
    for name in ("scores", "dclip_scores", "contributions", "plans"):
        got, expected = getattr(half, name), getattr(upcast, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(half.crop_keep, upcast.crop_keep)
