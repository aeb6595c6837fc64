"""Grad-CAM maps, insertion/deletion, pointing game, mass in mask and the saliency evaluation callback (CPU)."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from datamodules import ShapesDataModule
from xvlm.explain import (
    SaliencyEvaluation,
    grad_cam_plus_plus,
    layer_grad_cam,
    layer_grad_cam_plus_plus,
    tokens_to_map,
)
from xvlm.methods import CLIPFineTune
from xvlm.metrics import (
    SaliencyMetrics,
    auc,
    insertion_deletion,
    mass_in_mask,
    pointing_game,
    uniform_mass_in_mask,
)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[h, w]`` map divided by its maximum (a reference written apart from the library's)."""
    return torch.stack([m / m.max() if m.max() > 0 else m for m in maps])


def region(size: int, rows: slice, cols: slice) -> torch.Tensor:
    """``[S, S]`` float indicator of one rectangle."""
    out = torch.zeros(size, size)
    out[rows, cols] = 1.0
    return out


# --------------------------------------------------------------------------------------------- Grad-CAM
class FeatureHead(nn.Module):
    """``features -> head(GAP(features))``: Grad-CAM of ``self.layer`` (an identity) is Grad-CAM of the features."""

    def __init__(self, head: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer(features).mean(dim=(2, 3)) @ self.head.T


def test_grad_cam_of_a_linear_pooled_head_is_the_hand_weighted_feature_sum():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    head = torch.randn(7, 5, generator=g, dtype=torch.float64)
    target = torch.tensor([2, 0, 6])
    model = FeatureHead(head)

    maps = layer_grad_cam(model, model.layer, features, target)  # captum's LayerGradCam
    upsampled = layer_grad_cam(model, model.layer, features, target, size=(8, 12))

    # d score / d A_k,ij = v_k / (hw) everywhere, so w_k = v_k / (hw) for the sample's own class.
    weights = head[target] / (4 * 6)
    expected = sum(weights[:, k, None, None] * features[:, k] for k in range(5)).clamp_min(0)
    torch.testing.assert_close(maps, normalised(expected))
    resized = F.interpolate(expected[:, None], size=(8, 12), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(upsampled, normalised(resized))


def test_grad_cam_finds_the_only_region_with_evidence():
    image = torch.zeros(1, 3, 8, 8)
    image[:, :, 5:7, 1:4] = torch.tensor([0.5, 1.0, 2.0])[:, None, None]
    conv = nn.Conv2d(3, 4, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(4, 3, 1, 1) + 0.1)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, 0.5, 1.0], [-1.0, 0.0, 0.0, 0.0]]))
    features = nn.Sequential(conv, nn.ReLU())

    def classify(images: torch.Tensor) -> torch.Tensor:
        return head(features(images).mean(dim=(2, 3)))

    target = torch.tensor([0])
    maps = layer_grad_cam(classify, features, image, target)
    large = layer_grad_cam(classify, features, image, target, size=(32, 32))

    torch.testing.assert_close(maps[0], region(8, slice(5, 7), slice(1, 4)))
    peak = divmod(int(large[0].argmax()), 32)
    assert 20 <= peak[0] < 28 and 4 <= peak[1] < 16  # inside the region scaled by 4
    assert large[0, :16].max() == 0 and large.max() == 1


def test_grad_cam_plus_plus_matches_the_closed_form_by_channel():
    g = torch.Generator().manual_seed(1)
    features = torch.rand(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[0.7, -0.3, 0.0, 1.5], [0.2, 0.9, -1.1, 0.0]], dtype=torch.float64)
    # score_b = Σ_k v_bk Σ_ij A_bkij²  →  g_bkij = 2 v_bk A_bkij (channels with v = 0 have g = 0: α = 0, not 0/0)
    score = (v[:, :, None, None] * features.square()).sum(dim=(1, 2, 3))
    maps = grad_cam_plus_plus(features, score)

    activations = features.detach()
    expected = torch.zeros(2, 3, 5, dtype=torch.float64)
    for b in range(2):
        for k in range(4):
            a = activations[b, k]
            grad = 2 * v[b, k] * a
            if v[b, k] == 0:
                continue
            alpha = grad**2 / (2 * grad**2 + a.sum() * grad**3)
            expected[b] += (alpha * grad.clamp_min(0)).sum() * a
    assert not maps.isnan().any()
    torch.testing.assert_close(maps, normalised(expected.clamp_min(0)))


def test_grad_cam_plus_plus_of_a_linear_pooled_head():
    g = torch.Generator().manual_seed(2)
    features = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    maps = grad_cam_plus_plus(features, features.mean(dim=(2, 3)) @ v)
    # g_k = v_k / 16 everywhere: α_k = 1 / (2 + S_k g_k), w_k = 16 α_k relu(g_k)
    activations = features.detach()[0]
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for k in range(3):
        grad = float(v[k]) / 16
        weight = 16 * max(grad, 0.0) / (2 + float(activations[k].sum()) * grad)
        expected += weight * activations[k]
    torch.testing.assert_close(maps[0], expected / expected.max())


def test_layer_grad_cam_plus_plus_is_the_closed_form_on_the_layers_output():
    torch.manual_seed(3)
    features = nn.Sequential(nn.Conv2d(3, 4, kernel_size=3, padding=1), nn.Softplus())
    head = nn.Linear(4, 3)

    def classify(images: torch.Tensor) -> torch.Tensor:
        return head(features(images).square().mean(dim=(2, 3)))  # not linear in A: Grad-CAM++ ≠ Grad-CAM

    images, target = torch.randn(2, 3, 6, 6), torch.tensor([2, 0])
    maps = layer_grad_cam_plus_plus(classify, features, images, target, size=(12, 12))
    activations = features(images)
    score = head(activations.square().mean(dim=(2, 3))).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(maps, grad_cam_plus_plus(activations, score, size=(12, 12)))
    assert not torch.allclose(maps, layer_grad_cam(classify, features, images, target, size=(12, 12)))


def test_grad_cam_needs_no_grad_mode_and_leaves_parameter_grads_alone():
    layer = nn.Conv2d(3, 2, kernel_size=3, padding=1)
    images = torch.randn(2, 3, 6, 6)
    target = torch.zeros(2, dtype=torch.long)

    def classify(x: torch.Tensor) -> torch.Tensor:
        return layer(x).sum(dim=(1, 2, 3))[:, None]

    with torch.no_grad():
        maps = layer_grad_cam(classify, layer, images, target)
        plus = layer_grad_cam_plus_plus(classify, layer, images, target)
        assert maps.shape == plus.shape == (2, 6, 6) and maps.amax(dim=(1, 2)).tolist() == [1.0, 1.0]
        untracked = layer(images)
    assert layer.weight.grad is None and not images.requires_grad
    with pytest.raises(ValueError, match="enable_grad"):
        grad_cam_plus_plus(untracked, untracked.sum(dim=(1, 2, 3)))


def test_all_zero_maps_stay_zero():
    features = torch.rand(1, 2, 3, 3)
    model = FeatureHead(-torch.ones(1, 2))  # every weight negative: relu kills the whole map
    assert layer_grad_cam(model, model.layer, features, torch.tensor([0]), size=(6, 6)).abs().sum() == 0


def test_tokens_to_map_puts_token_n_at_row_n_div_w_column_n_mod_w():
    tokens = torch.randn(2, 6, 4)
    maps = tokens_to_map(tokens, (2, 3))
    assert maps.shape == (2, 4, 2, 3)
    for n in range(6):
        torch.testing.assert_close(maps[:, :, n // 3, n % 3], tokens[:, n])
    with pytest.raises(ValueError, match="7 tokens"):
        tokens_to_map(torch.randn(1, 7, 4), (2, 3))


# --------------------------------------------------------------------------------------------- insertion/deletion
def constant_model(logits: torch.Tensor):
    return lambda images: logits.expand(len(images), -1)


def test_a_constant_model_has_flat_curves_at_its_probability():
    logits = torch.tensor([0.5, 2.0, -1.0])
    images, saliency = torch.randn(2, 3, 12, 12), torch.rand(2, 3, 3)
    insertion, deletion = insertion_deletion(constant_model(logits), images, saliency, torch.tensor([1, 2]), steps=5)
    total = sum(math.exp(z) for z in (0.5, 2.0, -1.0))
    expected = torch.tensor([math.exp(2.0) / total, math.exp(-1.0) / total])
    assert insertion.shape == deletion.shape == (2, 6)
    torch.testing.assert_close(auc(insertion), expected)
    torch.testing.assert_close(auc(deletion), expected)


def original_fraction_model(originals: torch.Tensor):
    """p(class 0) = the largest fraction of pixels (all channels) equal to one of the ``originals``."""

    def classify(images: torch.Tensor) -> torch.Tensor:
        same = (images[:, None] == originals[None]).all(dim=2).float().mean(dim=(2, 3))
        fraction = same.amax(dim=1)
        return torch.stack([fraction.log(), (1 - fraction).log()], dim=1)

    return classify


@pytest.mark.parametrize(("side", "steps"), [(8, 16), (10, 16), (9, 4)])
def test_curves_follow_the_fraction_of_original_pixels(side, steps):
    images = torch.rand(2, 3, side, side) + 0.5  # never 0 (the substrate) nor equal to its blur
    saliency = torch.rand(2, side, side)
    insertion, deletion = insertion_deletion(original_fraction_model(images), images, saliency,
                                             torch.zeros(2, dtype=torch.long), steps=steps)
    per_step = -(-side * side // steps)
    moved = [min(t * per_step, side * side) / (side * side) for t in range(steps + 1)]
    torch.testing.assert_close(insertion, torch.tensor([moved, moved]))
    torch.testing.assert_close(deletion, 1 - torch.tensor([moved, moved]))
    area = sum((moved[t] + moved[t + 1]) / 2 for t in range(steps)) / steps
    torch.testing.assert_close(auc(insertion), torch.tensor([area, area]))
    torch.testing.assert_close(auc(deletion), torch.tensor([1 - area, 1 - area]))


def reference_blur(images: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, written from the definition."""
    offsets = torch.arange(kernel, dtype=images.dtype) - (kernel - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    padded = F.pad(images, [kernel // 2] * 4, mode="reflect")
    channels = images.shape[1]
    rows = F.conv2d(padded, weights.view(1, 1, kernel, 1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, weights.view(1, 1, 1, kernel).repeat(channels, 1, 1, 1), groups=channels)


def test_curves_start_and_end_at_the_clean_blurred_and_empty_images():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).eval()
    images, target = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 4])
    with torch.no_grad():
        model(images)
    insertion, deletion = insertion_deletion(model, images, torch.rand(3, 4, 4), target, steps=6, blur_kernel=7,
                                             blur_sigma=2.0)

    def probability(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).softmax(dim=1)[torch.arange(3), target]

    torch.testing.assert_close(deletion[:, 0], probability(images))
    torch.testing.assert_close(deletion[:, -1], probability(torch.zeros_like(images)))
    torch.testing.assert_close(insertion[:, 0], probability(reference_blur(images, 7, 2.0)))
    torch.testing.assert_close(insertion[:, -1], probability(images))


def test_deletion_removes_the_most_salient_pixels_first_in_bounded_chunks():
    side, steps, chunk = 6, 4, 3
    image = torch.rand(1, 3, side, side) + 0.5
    saliency = torch.randperm(side * side).float().view(1, side, side)
    seen: list[torch.Tensor] = []

    def classify(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return torch.zeros(len(images), 2)

    insertion_deletion(classify, image, saliency, torch.tensor([0]), steps=steps, chunk=chunk)
    assert max(len(batch) for batch in seen) <= chunk and sum(len(batch) for batch in seen) == 2 * (steps + 1)

    order = sorted(range(side * side), key=lambda p: -float(saliency.flatten()[p]))
    deleted = [(x == 0).all(dim=0).flatten() for x in torch.cat(seen) if (x == 0).any()]
    assert len(deleted) == steps
    for removed in deleted:
        count = int(removed.sum())
        assert count % 9 == 0 and set(removed.nonzero()[:, 0].tolist()) == set(order[:count])


def test_ties_are_broken_in_raster_order():
    side = 4
    image = torch.rand(1, 3, side, side) + 0.5
    seen: list[torch.Tensor] = []

    def classify(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return torch.zeros(len(images), 2)

    insertion_deletion(classify, image, torch.ones(1, side, side), torch.tensor([0]), steps=4, blur_kernel=3)
    deleted = sorted(int((x == 0).all(dim=0).sum()) for x in torch.cat(seen) if (x == 0).any())
    for x in torch.cat(seen):
        removed = (x == 0).all(dim=0).flatten()
        assert removed.tolist() == [p < int(removed.sum()) for p in range(side * side)]
    assert deleted == [4, 8, 12, 16]


def region_model(mask: torch.Tensor):
    """Logits ``[4 · (mean of channel 0 over the region − ½), 0]``: the class is read from one region only."""
    return lambda images: torch.stack([4 * ((images[:, 0] * mask).sum(dim=(1, 2)) / mask.sum() - 0.5),
                                       torch.zeros(len(images))], dim=1)


def test_the_true_region_beats_its_inverse_on_a_model_that_reads_it():
    mask = region(16, slice(2, 9), slice(5, 12))
    images = torch.rand(2, 3, 16, 16) * 0.1 + mask  # bright object on a dark ground: blur and zeros lower its mean
    target = torch.zeros(2, dtype=torch.long)
    model = region_model(mask)
    right = insertion_deletion(model, images, mask.expand(2, -1, -1), target, steps=8)
    wrong = insertion_deletion(model, images, (1 - mask).expand(2, -1, -1), target, steps=8)
    assert (auc(right[0]) > auc(wrong[0]) + 0.05).all()  # insertion: higher is better
    assert (auc(right[1]) < auc(wrong[1]) - 0.05).all()  # deletion: lower is better


# --------------------------------------------------------------------------------------------- masks
def test_pointing_game_on_hand_built_maps():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 2] = 1.0
    maps[1, 3, 0] = 1.0
    maps[2, 0, 0] = 1.0
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, :2, 1:] = True
    assert pointing_game(maps, masks).tolist() == [True, False, False]

    # 4 × 4 map against an 8 × 8 mask: the peak at cell (0, 0) lands in the top-left corner
    corner = torch.zeros(2, 8, 8, dtype=torch.bool)
    corner[0, :2, :2] = True
    corner[1, 4:, 4:] = True
    assert pointing_game(maps[2:].expand(2, -1, -1), corner).tolist() == [True, False]


def test_mass_in_mask_by_hand():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [False, True]])
    shares = mass_in_mask(maps, mask)
    torch.testing.assert_close(shares[:2], torch.tensor([5 / 8, 0.5]))
    assert shares[2].isnan()
    torch.testing.assert_close(uniform_mass_in_mask(mask), torch.tensor(0.5))


def test_saliency_metrics_accumulate_the_mean_over_all_updates():
    g = torch.Generator().manual_seed(0)
    ins, dels = torch.rand(5, generator=g), torch.rand(5, generator=g)
    mass = torch.tensor([0.2, float("nan"), 0.8, 0.5, 0.1])
    hits = torch.tensor([True, False, True, True, False])
    metric = SaliencyMetrics()
    metric.update(ins[:2], dels[:2], mass[:2], hits[:2])
    metric.update(ins[2:], dels[2:], mass[2:], hits[2:])
    out = metric.compute()

    torch.testing.assert_close(out["insertion"], ins.mean())
    torch.testing.assert_close(out["deletion"], dels.mean())
    torch.testing.assert_close(out["overall"], ins.mean() - dels.mean())
    torch.testing.assert_close(out["mass_in_mask"], torch.tensor((0.2 + 0.8 + 0.5 + 0.1) / 4))
    torch.testing.assert_close(out["pointing"], torch.tensor(0.6))
    assert int(metric.mass_skipped) == 1

    metric.reset()
    metric.update(ins, dels)
    assert sorted(metric.compute()) == ["deletion", "insertion", "overall"]


# --------------------------------------------------------------------------------------------- callback
class TinyGradCAM(L.LightningModule):
    """Conv features, pooled linear head; ``explain`` is Grad-CAM, so it needs autograd inside validation."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, kernel_size=4, stride=4), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))

    def explain(self, batch: dict) -> dict:
        images = batch["image"]
        logits = self.classify(images)
        predicted = logits.argmax(dim=1)
        saliency = layer_grad_cam(self.classify, self.features, images, predicted, images.shape[-2:])
        return {"saliency": saliency, "predicted": predicted, "logits": logits.detach()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.classify(batch["image"]), batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self.classify(batch["image"]), batch["label"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Snapshot(Callback):
    """Records weights, gradients and train/eval modes at ``on_validation_epoch_end``."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.states.append({
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
            "modes": [m.training for m in pl_module.modules()],
        })


def assert_untouched(before: Snapshot, after: Snapshot) -> None:
    """The one pair of snapshots around the saliency callback agree: same weights, gradients and modes."""
    (first,), (second,) = before.states, after.states
    assert first["modes"] == second["modes"]
    assert first["weights"].keys() == second["weights"].keys()
    for name, value in first["weights"].items():
        assert torch.equal(value, second["weights"][name]), name
    for name, grad in first["grads"].items():
        other = second["grads"][name]
        assert (grad is None and other is None) or torch.equal(grad, other), name


# Validation inside fit runs under no_grad, trainer.validate under inference mode: Grad-CAM must work in both.
# A named explainer (here Grad-CAM of the ViT) is scored instead of the module's own explain.
@pytest.mark.parametrize(("method", "stages", "explainer"),
                         [("grad_cam", ("fit", "validate"), None), ("clip", ("fit",), None),
                          ("clip", ("validate",), "gradcam")])
def test_callback_logs_saliency_scores_without_touching_the_module(method, stages, explainer):
    torch.manual_seed(0)
    data = ShapesDataModule(task="attributes", image_size=32, batch_size=8, train_size=16, val_size=16, augment=False)
    if method == "grad_cam":
        model = TinyGradCAM(data.task.num_classes)
    else:
        model = CLIPFineTune(pretrained=None, input_size=32, lr=1e-3, warmup_steps=1)
    for stage in stages:
        before, after = Snapshot(), Snapshot()
        trainer = L.Trainer(max_steps=2, max_epochs=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            callbacks=[before, SaliencyEvaluation(max_batches=1, steps=4, explainer=explainer), after])
        getattr(trainer, stage)(model, datamodule=data)

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("saliency/")}
        keys = ["deletion", "insertion", "mass_in_mask", "overall", "pointing"]
        assert sorted(metrics) == [f"saliency/{k}" for k in keys]
        for key in ("insertion", "deletion", "mass_in_mask", "pointing"):
            assert 0 <= metrics[f"saliency/{key}"] <= 1
        overall = metrics["saliency/insertion"] - metrics["saliency/deletion"]
        assert metrics["saliency/overall"] == pytest.approx(overall)
        assert_untouched(before, after)
