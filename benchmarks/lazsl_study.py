"""LaZSL against its DCLIP baseline and CLIP class prompts on Shapes unseen classes: where does the OT help?

``python -m benchmarks.lazsl_study`` (from the repository root; about 3 min on 2 CPU cores) loads the shipped
Shapes backbone (``xvlm-tiny``, ``pretrained: shapes``) as :class:`~xvlm.methods.CLIPFineTune` does, takes the
unseen-class images of the Shapes ``attributes`` validation split of ``configs/clip/shapes.yaml`` and reports the
unseen top-1 (per-class mean, argmax over the unseen classes, as the LaZSL callback's ``lazsl/unseen_top1``) of:

- **CLIP class prompts**: ``CLIPFineTune.classify`` (its default templates) restricted to the unseen classes;
- **DCLIP**: the mean cosine of the global view with the class's descriptor sentences;
- **CLIP class prompts on the crops**: the same prompts against each crop's feature, averaged over the crops
  (a diagnostic: how well the towers read a crop at all);
- **WCA** and **AWT** (:mod:`xvlm.zeroshot.scorers`) on the same crops (all of them; both weight the crops
  themselves) and descriptors, the class-name prompts being CLIPFineTune's class text features;
- **LaZSL** over ``θ ∈ {0, 0.5, 0.8, 1}``, ``α ∈ {0.3, 0.6}`` (``β`` stays 0.9), ``N ∈ {16, 48}`` crops and the
  crop seeds ``--seeds`` (mean ± std over seeds), every other option at its default.

The crops of one ``(α, N, seed)`` are encoded once and scored for every ``θ`` (:func:`xvlm.zeroshot.lazsl_scores`
on the same features :func:`xvlm.zeroshot.score_images` would compute). For the default setting and the best
one it also reports the share of crops that overlap the object mask, of all crops and of those vision selection
keeps. Prints Markdown tables; ``docs/results.md`` holds a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from benchmarks.mass_in_mask import check_backbone  # noqa: E402
from datamodules import ShapesDataModule  # noqa: E402
from xvlm.methods import CLIPFineTune  # noqa: E402
from xvlm.metrics import GZSLMetrics  # noqa: E402
from xvlm.zeroshot import LaZSLSettings, descriptor_sentences, encode_descriptors, lazsl_scores  # noqa: E402
from xvlm.zeroshot.lazsl import image_seeds, make_views  # noqa: E402
from xvlm.zeroshot.scorers import awt_scores, wca_scores  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip" / "shapes.yaml"
THETAS = (0.0, 0.5, 0.8, 1.0)
ALPHAS = (0.3, 0.6)
CROPS = (16, 48)


@dataclass
class Unseen:
    """The unseen-class validation images and what scoring them needs."""

    images: torch.Tensor  # [B, 3, H, W]
    labels: torch.Tensor  # [B]
    indices: torch.Tensor  # [B]
    masks: torch.Tensor  # [B, H, W]
    classes: torch.Tensor  # [C_unseen]
    metric: GZSLMetrics


def unseen_top1(metric: GZSLMetrics, scores: torch.Tensor, data: Unseen) -> float:
    """Per-class mean top-1 over the unseen classes of ``scores [B, C_unseen]``."""
    logits = scores.new_full((len(scores), metric.num_classes), -torch.inf)
    logits[:, data.classes] = scores
    metric.reset()
    metric.update(logits, data.labels)
    return float(metric.compute()["zsl"])


def load_unseen() -> tuple[CLIPFineTune, Unseen]:
    """The shipped CLIPFineTune (eval mode, task attached) and the unseen-class validation samples."""
    config = yaml.safe_load(CONFIG.read_text())
    data = ShapesDataModule(**config["data"]["init_args"])
    data.setup("validate")
    module = CLIPFineTune(**config["model"]["init_args"]).eval()
    module.attach_task(data.task)
    batches = list(data.val_dataloader())
    every = {key: torch.cat([b[key] for b in batches]) for key in ("image", "label", "index", "mask")}
    classes = torch.as_tensor(data.task.unseen)
    member = torch.isin(every["label"], classes)
    metric = GZSLMetrics(data.task.num_classes, data.task.seen, data.task.unseen)
    return module, Unseen(every["image"][member], every["label"][member], every["index"][member],
                          every["mask"][member], classes, metric)


def crop_overlap(boxes: torch.Tensor, keep: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """Shares of all crops and of the kept crops (``keep [B, N]``) whose box ``[B, N, 4]`` holds a mask pixel."""
    hits = torch.stack([torch.stack([mask[int(y0):int(y1), int(x0):int(x1)].any() for x0, y0, x1, y1 in image])
                        for image, mask in zip(boxes.tolist(), masks)])
    return float(hits.float().mean()), float(hits[keep].float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="crop seeds (default: 0 1 2)")
    args = parser.parse_args(argv)
    check_backbone("xvlm-tiny")
    module, data = load_unseen()
    encoder = module.zero_shot_encoder()
    task = module.task
    names = [task.class_names[k] for k in data.classes.tolist()]
    rows: dict[str, list[float]] = {}
    overlaps: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        prompts = module.classify(data.images)[:, data.classes]
        rows["CLIP class prompts"] = [unseen_top1(data.metric, prompts, data)]
        sentences, desc_mask = descriptor_sentences(names, task.descriptors, LaZSLSettings.suffix)
        descriptors = encode_descriptors(encoder, sentences, desc_mask)
        class_text = module.class_text_features(data.classes.tolist())
        for alpha in ALPHAS:
            for n_crops in CROPS:
                for seed in args.seeds:
                    settings = LaZSLSettings(alpha=alpha, n_crops=n_crops, seed=seed)
                    views, boxes = make_views(data.images, n_crops, alpha, settings.beta,
                                              seeds=image_seeds(seed, data.indices.tolist()),
                                              out_size=encoder.image_size)
                    feats = encoder.encode_image(views.flatten(0, 1)).view(*views.shape[:2], -1)
                    on_crops = torch.einsum("bnd,cd->bc", F.normalize(feats[:, 1:], dim=-1),
                                            class_text)
                    rows.setdefault(f"CLIP class prompts on the crops, α={alpha}, N={n_crops}", []).append(
                        unseen_top1(data.metric, on_crops, data))
                    for name, scorer in (("WCA", wca_scores), ("AWT", awt_scores)):
                        scores = scorer(feats[:, 1:], feats[:, 0], descriptors, desc_mask, class_text)
                        rows.setdefault(f"{name}, α={alpha}, N={n_crops}", []).append(
                            unseen_top1(data.metric, scores, data))
                    for theta in THETAS:
                        out = lazsl_scores(feats[:, 1:], feats[:, 0], descriptors, desc_mask,
                                           LaZSLSettings(alpha=alpha, n_crops=n_crops, seed=seed, theta=theta),
                                           return_plans=False)
                        label = f"LaZSL θ={theta}, α={alpha}, N={n_crops}"
                        rows.setdefault(label, []).append(unseen_top1(data.metric, out.scores, data))
                        overlaps.setdefault(label, []).append(crop_overlap(boxes, out.crop_keep, data.masks))
                    if "DCLIP" not in rows:  # the global view only: the same for every crop setting
                        rows["DCLIP"] = [unseen_top1(data.metric, out.dclip_scores, data)]
    default = f"LaZSL θ={LaZSLSettings.theta}, α={LaZSLSettings.alpha}, N={LaZSLSettings.n_crops}"
    best = max(overlaps, key=lambda label: statistics.mean(rows[label]))
    print(f"{len(data.labels)} unseen-class images of {len(data.classes)} classes; crop seeds {args.seeds}\n")
    print("| scorer | unseen top-1 |\n|---|---:|")
    groups = ("CLIP class prompts on the crops", "WCA", "AWT")
    others = sorted((label for label in rows if label.split(",")[0] in groups), key=lambda label: label.split(",")[0])
    for label in ("CLIP class prompts", "DCLIP", *others, *overlaps):
        values = rows[label]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        marks = " (default)" if label == default else " (best)" if label == best else ""
        print(f"| {label}{marks} | {statistics.mean(values):.3f}{spread} |")
    print("\n| setting | crops on the object (all) | crops on the object (kept) |\n|---|---:|---:|")
    for label in dict.fromkeys((default, best)):
        shares = overlaps[label]
        print(f"| {label} | {statistics.mean(s[0] for s in shares):.3f} | {statistics.mean(s[1] for s in shares):.3f} |")


if __name__ == "__main__":
    main()
