"""The default explainers point at the object: checked on the shipped Shapes backbone against the exact masks.

The backbone is the one ``pretrained: shapes`` builds (cached under ``checkpoints/backbones/``; built on first use,
about four minutes on two cores), evaluated as users get it, before any fine-tuning.
"""

import torch

from datamodules import ShapesDataModule
from xvlm.explain.gallery import explain_batch
from xvlm.methods import CLIPFineTune
from xvlm.metrics.saliency import mass_in_mask, pointing_game, uniform_mass_in_mask


def test_clip_default_explainer_points_at_the_object_on_the_shipped_backbone():
    module = CLIPFineTune()  # the shipped defaults: xvlm-tiny, pretrained on Shapes, the default explainer
    data = ShapesDataModule(task="attributes", val_size=64, batch_size=64)
    data.setup("validate")
    module.attach_task(data.task)
    batch = next(iter(data.val_dataloader()))
    explanation = explain_batch(module, batch)
    hits = pointing_game(explanation["saliency"], batch["mask"]).float()
    assert float(hits.mean()) >= 0.8, f"pointing {float(hits.mean()):.3f} with {module.explainer_name}"
    mass = mass_in_mask(explanation["saliency"], batch["mask"]).nanmean()
    assert float(mass) >= 2 * float(uniform_mass_in_mask(batch["mask"]).mean())
    assert torch.equal(explanation["predicted"], explanation["logits"].argmax(dim=1))
