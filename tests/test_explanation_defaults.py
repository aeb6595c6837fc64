"""The default explainers point at the object: checked on the shipped Shapes backbone against the exact masks.

The backbone is the one ``pretrained: shapes`` builds (cached under ``checkpoints/backbones/``; built on first use,
about four minutes on two cores), evaluated as users get it, before any fine-tuning.
"""

import pytest
import torch

from datamodules import ShapesDataModule
from xvlm.explain.gallery import explain_batch, named_explainer
from xvlm.methods import CLIPFineTune
from xvlm.metrics.saliency import mass_in_mask, pointing_game, uniform_mass_in_mask
from xvlm.zeroshot.regions import top_descriptor_maps


@pytest.fixture(scope="module")
def shipped():
    """CLIPFineTune with the shipped defaults (xvlm-tiny pretrained on Shapes, the default explainer) and 64 Shapes
    ``attributes`` validation images (64 px) with their masks."""
    module = CLIPFineTune()
    data = ShapesDataModule(task="attributes", val_size=64, batch_size=64)
    data.setup("validate")
    module.attach_task(data.task)
    return module, next(iter(data.val_dataloader()))


def test_clip_default_explainer_points_at_the_object_on_the_shipped_backbone(shipped):
    module, batch = shipped
    explanation = explain_batch(module, batch)
    hits = pointing_game(explanation["saliency"], batch["mask"]).float()
    assert float(hits.mean()) >= 0.8, f"pointing {float(hits.mean()):.3f} with {module.explainer_name}"
    mass = mass_in_mask(explanation["saliency"], batch["mask"]).nanmean()
    assert float(mass) >= 2 * float(uniform_mass_in_mask(batch["mask"]).mean())
    assert torch.equal(explanation["predicted"], explanation["logits"].argmax(dim=1))


def test_lazsl_top_descriptor_map_puts_twice_the_uniform_share_on_the_object(shipped):
    # the gallery's LaZSL maps with the default settings: scored over the LaZSL crops, drawn over the region crops
    module, batch = shipped
    explanation = explain_batch(module, batch, named_explainer(module, "lazsl"))
    mass = float(mass_in_mask(top_descriptor_maps(explanation), batch["mask"]).nanmean())
    uniform = float(uniform_mass_in_mask(batch["mask"]).mean())
    assert mass >= 2 * uniform, f"mass in mask {mass:.3f}, uniform {uniform:.3f}"
    scored_alone = named_explainer(module, "lazsl", region_crops=None)
    flat = explain_batch(module, batch, scored_alone)
    torch.testing.assert_close(flat["logits"], explanation["logits"])  # same scores, only the maps' crops differ
