"""LaZSL evaluation cost: images per second against the DCLIP global-view pass, the share of optimal transport, and
how the transport grows with classes × descriptors × crops, with its memory held to the budget at 21k classes.

- **Evaluation step**: :func:`xvlm.zeroshot.score_images` (``N`` crops and the global view through the image tower,
  then :func:`xvlm.zeroshot.lazsl_scores`) against the DCLIP pass (the global view alone, its mean descriptor
  similarity), both on the same images and precomputed descriptor features (``C`` classes × ``M`` descriptors);
  the OT share is :func:`lazsl_scores` alone over the whole step.
- **Scaling**: :func:`lazsl_scores` on random unit features (crop–descriptor similarities spread like CLIP's), one
  of ``C``, ``M``, ``N`` varied over three sizes at a time; the exponent ``k`` of ``time ∝ size^k`` is the
  least-squares slope of ``log time`` on ``log size``.
- **21k classes**: ImageNet-21k's 21,843 classes at two memory budgets (``LaZSLSettings.memory_budget_mb``): time
  and the peak memory of the call above the memory before it (``VmHWM`` on a CPU, ``max_memory_allocated`` on a
  GPU), which must stay near the budget whatever ``C`` is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.rates import median_seconds, peak, reset_peak
from benchmarks.steps import Setting
from xvlm.backbones import VisionLanguageModel
from xvlm.zeroshot import LaZSLSettings, lazsl_scores, score_images

BASE = {"B": 8, "C": 1000, "N": 16, "M": 6}
SIZES = {"C": (250, 1000, 4000), "M": (2, 6, 18), "N": (8, 16, 32)}
IMAGENET_21K = 21843


def clip_like_features(b: int, c: int, n: int, m: int, d: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Unit ``crops [B, N, D]``, ``glob [B, D]``, ``desc [C, M, D]`` sharing a common direction, so that their
    cosines spread by a few hundredths around 0.25 as CLIP's do, and an all-true ``[C, M]`` mask."""
    g = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(d, generator=g), dim=0)

    def unit(*shape: int) -> torch.Tensor:  # cos ≈ (1/3) / (1/3 + 1) = 0.25, spread ≈ 0.75 / sqrt(D)
        return F.normalize(common / math.sqrt(3) + torch.randn(*shape, d, generator=g) / math.sqrt(d), dim=-1)

    return (unit(b, n).to(device), unit(b).to(device), unit(c, m).to(device),
            torch.ones(c, m, dtype=torch.bool, device=device))


def evaluation_step(setting: Setting, images: int = 32, classes: int = 1000, descriptors: int = 6,
                    crops: int = 16) -> dict[str, float]:
    """Images per second of the LaZSL step and the DCLIP pass, their cost ratio and the OT share (docstring)."""
    encoder = VisionLanguageModel(setting.model, pretrained=None).to(setting.device).eval()
    side = encoder.image_size
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(images, 3, side, side, generator=g).to(setting.device)
    indices = torch.arange(images)
    desc = F.normalize(torch.randn(classes, descriptors, encoder.embed_dim, generator=g), dim=-1).to(setting.device)
    mask = torch.ones(classes, descriptors, dtype=torch.bool, device=setting.device)
    settings = LaZSLSettings(n_crops=crops)

    def lazsl() -> None:
        with torch.no_grad(), setting.autocast():
            score_images(encoder, batch, indices, desc, mask, settings)

    def dclip() -> None:
        with torch.no_grad(), setting.autocast():
            glob = encoder.encode_image(batch)
            torch.einsum("bd,cmd->bcm", glob.float(), desc).mean(dim=-1)

    crop_feats, glob, clip_like, _ = clip_like_features(images, classes, crops, descriptors, encoder.embed_dim,
                                                        setting.device)
    transport = median_seconds(lambda: lazsl_scores(crop_feats, glob, clip_like, mask, settings), setting, 3)
    step, single = median_seconds(lazsl, setting, 3), median_seconds(dclip, setting, 3)
    return {"images": images, "classes": classes, "descriptors": descriptors, "crops": crops,
            "lazsl_images_per_s": images / step, "dclip_images_per_s": images / single,
            "cost_ratio": step / single, "ot_share": transport / step}


def fitted_exponent(sizes: tuple[int, ...], seconds: list[float]) -> float:
    """Least-squares slope of ``log seconds`` on ``log size``."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def scaling(setting: Setting, dim: int) -> dict[str, tuple[tuple[int, ...], list[float], float]]:
    """Per varied size (``C``, ``M``, ``N``): the sizes, the seconds of :func:`lazsl_scores` and the exponent."""
    out = {}
    for name, sizes in SIZES.items():
        seconds = []
        for size in sizes:
            shape = {**BASE, name: size}
            crops, glob, desc, mask = clip_like_features(shape["B"], shape["C"], shape["N"], shape["M"], dim,
                                                         setting.device)
            seconds.append(median_seconds(lambda: lazsl_scores(crops, glob, desc, mask), setting, 3))
        out[name] = (sizes, seconds, fitted_exponent(sizes, seconds))
    return out


def bounded_memory(setting: Setting, dim: int, budgets: tuple[float, ...] = (256.0, 1024.0)) -> list[dict[str, float]]:
    """Seconds and peak memory above the start of :func:`lazsl_scores` at 21,843 classes per memory budget."""
    crops, glob, desc, mask = clip_like_features(BASE["B"], IMAGENET_21K, BASE["N"], BASE["M"], dim, setting.device)
    rows = []
    for budget in budgets:
        settings = LaZSLSettings(memory_budget_mb=budget)
        before = reset_peak(setting)
        seconds = median_seconds(lambda: lazsl_scores(crops, glob, desc, mask, settings), setting, 1)
        rows.append({"budget_mb": budget, "seconds": seconds, "peak_mb": (peak(setting) - before) / 2**20})
    return rows
