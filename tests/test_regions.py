import pytest
import torch
import torch.nn.functional as F

from datamodules import ShapesDataModule
from xvlm.backbones import VisionLanguageModel
from xvlm.zeroshot import LaZSLSettings, descriptor_contributions, hybrid_similarity, lazsl_scores
from xvlm.zeroshot.regions import RegionCrops, crop_weights, descriptor_heatmaps, explain_lazsl, top_descriptor_maps


def _features(b=3, c=5, n=6, m=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    crops = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    glob = torch.randn(b, d, generator=g, dtype=torch.float64)
    desc = torch.randn(c, m, d, generator=g, dtype=torch.float64)
    mask = torch.arange(m) < torch.randint(1, m + 1, (c,), generator=g)[:, None]
    return crops, glob, desc * mask[..., None], mask


def _boxes(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(2, size + 1, (n,), generator=g)
    x0 = (torch.rand(n, generator=g) * (size - side + 1)).floor()
    y0 = (torch.rand(n, generator=g) * (size - side + 1)).floor()
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=-1).double()


def test_contributions_sum_to_the_lazsl_score_of_the_explained_class():
    crops, glob, desc, mask = _features()
    out = lazsl_scores(crops, glob, desc, mask)
    explained = torch.tensor([4, 0, 2])
    rows = torch.arange(3)
    unit = [F.normalize(t, dim=-1) for t in (crops, glob, desc[explained])]
    hybrid = hybrid_similarity(*unit, theta=0.8)
    contributions = descriptor_contributions(out.plans[rows, explained], hybrid)
    torch.testing.assert_close(contributions.sum(-1), out.scores[rows, explained], atol=1e-5, rtol=0)
    assert (contributions[~mask[explained]] == 0).all()


def test_a_plan_on_one_crop_maps_that_crop_box():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 8.0, 8.0]], dtype=torch.float64)
    plan = torch.tensor([[0.25, 0.5], [0.0, 0.0]], dtype=torch.float64)
    box = torch.zeros(8, 8, dtype=torch.float64)
    box[2:6, 1:5] = 1
    raw = descriptor_heatmaps(plan, boxes, (8, 8), normalise_by_coverage=False)
    torch.testing.assert_close(raw, torch.stack([0.25 * box, 0.5 * box]))
    alone = descriptor_heatmaps(plan, boxes, (8, 8), keep=torch.tensor([True, False]))
    torch.testing.assert_close(alone, raw)
    halved = descriptor_heatmaps(plan, boxes, (8, 8))
    torch.testing.assert_close(halved, raw / 2)


def test_coverage_normalisation_matches_a_direct_loop():
    n, m, size = 7, 3, 9
    boxes = _boxes(n, size)
    plan = torch.rand(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True, False, True, True, False, True, True])
    plan[~keep] = 0
    expected = torch.zeros(m, size, size, dtype=torch.float64)
    for y in range(size):
        for x in range(size):
            inside = [k for k in range(n) if boxes[k, 0] <= x < boxes[k, 2] and boxes[k, 1] <= y < boxes[k, 3]]
            cover = sum(bool(keep[k]) for k in inside)
            for j in range(m):
                expected[j, y, x] = sum(float(plan[k, j]) for k in inside) / cover if cover else 0.0
    maps = descriptor_heatmaps(plan, boxes, (size, size), keep=keep)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(maps.sum((-2, -1)), plan.T @ crop_weights(boxes, (size, size), keep))


@pytest.fixture(scope="module")
def shapes_explanation():
    torch.manual_seed(0)
    datamodule = ShapesDataModule(task="attributes", image_size=32, batch_size=6, val_size=6, augment=False)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    encoder = VisionLanguageModel("xvlm-tiny", pretrained=None, image_size=32).eval()
    with torch.no_grad():
        settings = LaZSLSettings(n_crops=5)
        explanation = explain_lazsl(encoder, batch["image"], batch["index"], datamodule.task, settings=settings,
                                    region_crops=None)
        chosen = explain_lazsl(encoder, batch["image"], batch["index"], datamodule.task, batch["label"],
                               settings=settings, region_crops=None)
    return datamodule.task, batch, explanation, chosen


def test_heat_maps_come_from_the_region_crops_and_scores_from_the_settings():
    torch.manual_seed(0)
    datamodule = ShapesDataModule(task="attributes", image_size=48, batch_size=4, val_size=4, augment=False)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    images = batch["image"][..., 5:42, :]  # 37 x 48: odd and not square
    encoder = VisionLanguageModel("xvlm-tiny", pretrained=None, image_size=32).eval()
    settings, crops = LaZSLSettings(n_crops=3, eps=0.05), RegionCrops(n_crops=7, alpha=0.2, beta=0.4)
    with torch.no_grad():
        two_passes = explain_lazsl(encoder, images, batch["index"], datamodule.task, settings=settings,
                                   region_crops=crops)
        scoring = explain_lazsl(encoder, images, batch["index"], datamodule.task, settings=settings,
                                region_crops=None)
        regional = explain_lazsl(encoder, images, batch["index"], datamodule.task, scoring["predicted"],
                                 settings=LaZSLSettings(n_crops=7, alpha=0.2, beta=0.4, eps=0.05), region_crops=None)
    for key in ("logits", "predicted", "explained"):
        torch.testing.assert_close(two_passes[key], scoring[key], msg=key)
    for key in ("descriptor_maps", "descriptor_contributions", "plans", "boxes", "crop_keep"):
        torch.testing.assert_close(two_passes[key], regional[key], msg=key)
    sides = two_passes["boxes"][..., 2] - two_passes["boxes"][..., 0]
    assert two_passes["boxes"].shape[1] == 7 and scoring["boxes"].shape[1] == 3
    assert (sides >= int(0.2 * 37)).all() and (sides <= 0.4 * 37).all()
    assert (two_passes["boxes"][..., 3] <= 37).all() and (two_passes["boxes"][..., 2] <= 48).all()


@pytest.mark.parametrize("options, named", [
    ({"n_crops": 0}, "n_crops=0"), ({"alpha": 0.5, "beta": 0.2}, "alpha=0.5, beta=0.2"), ({"alpha": 0.0}, "alpha=0.0"),
])
def test_bad_region_crops_are_refused_naming_the_option(options, named):
    with pytest.raises(ValueError, match=named):
        RegionCrops(**options)


def test_explanation_shapes_and_padding(shapes_explanation):
    task, batch, out, _ = shapes_explanation
    b, c = len(batch["label"]), task.num_classes
    m = out["descriptor_maps"].shape[1]
    assert out["logits"].shape == (b, c) and out["predicted"].shape == (b,)
    assert out["descriptor_maps"].shape == (b, m, 32, 32) and out["descriptor_contributions"].shape == (b, m)
    assert len(out["descriptor_names"]) == b and all(len(names) == m for names in out["descriptor_names"])
    torch.testing.assert_close(out["predicted"], out["logits"].argmax(1))
    padded = torch.tensor([[name == "" for name in names] for names in out["descriptor_names"]])
    torch.testing.assert_close(out["descriptor_mask"], ~padded)
    assert padded.any()
    assert (out["descriptor_maps"][padded] == 0).all() and (out["descriptor_contributions"][padded] == 0).all()
    rows = torch.arange(b)
    scores = out["logits"][rows, out["predicted"]]
    torch.testing.assert_close(out["descriptor_contributions"].sum(-1), scores, atol=1e-5, rtol=0)


def test_explaining_given_classes_names_their_descriptors(shapes_explanation):
    task, batch, _, out = shapes_explanation
    torch.testing.assert_close(out["explained"], batch["label"])
    for names, label in zip(out["descriptor_names"], batch["label"].tolist()):
        assert [name for name in names if name] == task.descriptors[task.class_names[label]]


def test_map_masses_follow_the_plan_columns_and_crop_weights(shapes_explanation):
    _, _, out, _ = shapes_explanation
    maps, plans, keep = out["descriptor_maps"], out["plans"], out["crop_keep"]
    weights = crop_weights(out["boxes"], (32, 32), keep)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.einsum("bnm,bn->bm", plans, weights), atol=1e-5, rtol=1e-5)
    real = torch.tensor([[name != "" for name in names] for names in out["descriptor_names"]])
    column_mass = plans.sum(1)
    torch.testing.assert_close(column_mass, real / real.sum(1, keepdim=True), atol=1e-5, rtol=0)
    kept_plan = keep[..., None].to(plans.dtype)
    kept_boxes = descriptor_heatmaps(kept_plan, out["boxes"], (32, 32), normalise_by_coverage=False)
    covered = kept_boxes[:, 0] > 0
    flat = covered / keep.sum(1)[:, None, None]
    torch.testing.assert_close(maps.sum(1), flat.to(maps.dtype), atol=1e-5, rtol=0)


def test_top_descriptor_map_is_the_real_descriptor_with_the_largest_contribution():
    # image 0: real descriptors 0-1 with negative contributions, padding (0) must not win; image 1: descriptor 2
    explanation = {
        "descriptor_contributions": torch.tensor([[-0.3, -0.1, 0.0], [0.1, 0.2, 0.5]]),
        "descriptor_mask": torch.tensor([[True, True, False], [True, True, True]]),
        "descriptor_maps": torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2),
    }
    expected = torch.stack([explanation["descriptor_maps"][0, 1], explanation["descriptor_maps"][1, 2]])
    torch.testing.assert_close(top_descriptor_maps(explanation), expected)
