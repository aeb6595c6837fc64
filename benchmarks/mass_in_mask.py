"""LaZSL heat-map quality on Shapes: how much of the top descriptor's heat lies on the object (spec §9).

``python benchmarks/mass_in_mask.py [--pretrained PATH|shapes|none] [--images 64]`` explains the true class of
Shapes ``attributes`` validation images (64 px) with :func:`xvlm.zeroshot.regions.explain_lazsl` and prints the
mean :func:`~xvlm.metrics.saliency.mass_in_mask` of the heat map of the descriptor with the largest contribution,
coverage-normalised and raw, against a uniform map (the mask's area fraction).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from datamodules import ShapesDataModule  # noqa: E402
from xvlm.backbones import VisionLanguageModel  # noqa: E402
from xvlm.metrics.saliency import mass_in_mask, uniform_mass_in_mask  # noqa: E402
from xvlm.zeroshot import LaZSLSettings  # noqa: E402
from xvlm.zeroshot.regions import explain_lazsl  # noqa: E402

CACHED_SHAPES = Path(__file__).resolve().parents[1] / "checkpoints" / "backbones" / "xvlm-tiny-shapes.pt"


def load_encoder(pretrained: str) -> VisionLanguageModel:
    """The ``xvlm-tiny`` towers from ``pretrained`` ("none" = random weights), in eval mode."""
    if pretrained == "shapes" and not CACHED_SHAPES.is_file():
        print(f"note: {CACHED_SHAPES} is not cached; building the Shapes backbone first can take a long time "
              "(pass --pretrained PATH to use an existing file).", flush=True)
    source = None if pretrained.lower() == "none" else pretrained
    return VisionLanguageModel("xvlm-tiny", pretrained=source).eval()


def top_descriptor_maps(explanation: dict) -> torch.Tensor:
    """``[B, H, W]`` heat map of each image's real descriptor with the largest contribution."""
    contributions = explanation["descriptor_contributions"].masked_fill(~explanation["descriptor_mask"], -torch.inf)
    top = contributions.argmax(dim=1)
    return explanation["descriptor_maps"][torch.arange(len(top)), top]


def measure(encoder: VisionLanguageModel, images: int, n_crops: int) -> dict[str, float]:
    """Mean mass in the object mask of the true class's top-descriptor map, per normalisation, and uniform."""
    datamodule = ShapesDataModule(task="attributes", image_size=64, batch_size=images, val_size=images, augment=False)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    rows = {}
    with torch.no_grad():
        for label, normalise in (("top descriptor, coverage-normalised", True), ("top descriptor, raw sum", False)):
            explanation = explain_lazsl(encoder, batch["image"], batch["index"], datamodule.task, batch["label"],
                                        settings=LaZSLSettings(n_crops=n_crops),
                                        normalise_by_coverage=normalise)
            rows[label] = float(mass_in_mask(top_descriptor_maps(explanation), batch["mask"]).mean())
    rows["uniform map (mask area)"] = float(uniform_mass_in_mask(batch["mask"]).mean())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="shapes", help="'shapes', a weights file, or 'none' (random).")
    parser.add_argument("--images", type=int, default=64, help="Validation images (default 64).")
    parser.add_argument("--n_crops", type=int, default=16, help="Crops per image (default 16).")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(load_encoder(args.pretrained), args.images, args.n_crops)
    print(f"pretrained={args.pretrained}, {args.images} images, {args.n_crops} crops, true class explained\n")
    print("| heat map | mean mass in mask |\n|---|---:|")
    for label, value in rows.items():
        print(f"| {label} | {value:.3f} |")


if __name__ == "__main__":
    main()
