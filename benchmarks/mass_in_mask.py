"""LaZSL heat-map quality on Shapes: how much of the top descriptor's heat lies on the object (spec §9).

``python benchmarks/mass_in_mask.py [--pretrained PATH|shapes|none] [--images 64]`` explains the true class of
Shapes ``attributes`` validation images (64 px) with :func:`xvlm.zeroshot.regions.explain_lazsl` and prints the
mean :func:`~xvlm.metrics.saliency.mass_in_mask` of the heat map of the descriptor with the largest contribution,
drawn over the shipped region crops and over the scoring crops alone (coverage-normalised and raw), against a
uniform map (the mask's area fraction). ``python -m benchmarks.explanations`` scores the same maps for the
predicted class of every method, with more crop settings.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from datamodules import ShapesDataModule  # noqa: E402
from xvlm.backbones import VisionLanguageModel  # noqa: E402
from xvlm.metrics.saliency import mass_in_mask, uniform_mass_in_mask  # noqa: E402
from xvlm.shapes_pretraining import checkpoint_root  # noqa: E402
from xvlm.zeroshot import LaZSLSettings  # noqa: E402
from xvlm.zeroshot.regions import RegionCrops, explain_lazsl, top_descriptor_maps  # noqa: E402

def check_backbone(name: str) -> None:
    """Warn when the Shapes weights of ``name`` are not cached: ``pretrained: shapes`` will build them first."""
    path = checkpoint_root() / "backbones" / f"{name}-shapes.pt"
    if not path.is_file():
        print(f"note: {path} is not cached; building the Shapes backbone first can take a long time (set "
              "XVLM_CHECKPOINT_DIR to a folder that has it, or pass --pretrained PATH).", flush=True)


def load_encoder(pretrained: str) -> VisionLanguageModel:
    """The ``xvlm-tiny`` towers from ``pretrained`` ("none" = random weights), in eval mode."""
    if pretrained == "shapes":
        check_backbone("xvlm-tiny")
    source = None if pretrained.lower() == "none" else pretrained
    return VisionLanguageModel("xvlm-tiny", pretrained=source).eval()


def measure(encoder: VisionLanguageModel, images: int, n_crops: int) -> dict[str, float]:
    """Mean mass in the object mask of the true class's top-descriptor map, per crops and normalisation, and
    uniform (``n_crops``: the scoring crops)."""
    datamodule = ShapesDataModule(task="attributes", image_size=64, batch_size=images, val_size=images, augment=False)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    rows = {}
    with torch.no_grad():
        for label, crops, normalise in (
            ("top descriptor, region crops (shipped), coverage-normalised", RegionCrops(), True),
            ("top descriptor, scoring crops alone, coverage-normalised", None, True),
            ("top descriptor, scoring crops alone, raw sum", None, False),
        ):
            explanation = explain_lazsl(encoder, batch["image"], batch["index"], datamodule.task, batch["label"],
                                        settings=LaZSLSettings(n_crops=n_crops), region_crops=crops,
                                        normalise_by_coverage=normalise)
            rows[label] = float(mass_in_mask(top_descriptor_maps(explanation), batch["mask"]).mean())
    rows["uniform map (mask area)"] = float(uniform_mass_in_mask(batch["mask"]).mean())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="shapes", help="'shapes', a weights file, or 'none' (random).")
    parser.add_argument("--images", type=int, default=64, help="Validation images (default 64).")
    parser.add_argument("--n_crops", type=int, default=16, help="Scoring crops per image (default 16).")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(load_encoder(args.pretrained), args.images, args.n_crops)
    print(f"pretrained={args.pretrained}, {args.images} images, {args.n_crops} scoring crops, {RegionCrops()}, "
          "true class explained\n")
    print("| heat map | mean mass in mask |\n|---|---:|")
    for label, value in rows.items():
        print(f"| {label} | {value:.3f} |")


if __name__ == "__main__":
    main()
