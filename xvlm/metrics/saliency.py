"""Saliency-map quality: insertion/deletion curves, pointing game and mass in mask (LICO spec §6).

For an image ``x [3, H, W]``, a saliency map ``s`` (upsampled bilinearly to ``H × W``) and the explained class
``c``, pixels are ranked by descending ``s`` (ties in raster order) and moved ``k = ⌈HW / T⌉`` at a time over
``T`` steps, all channels together; ``x_t`` has the first ``t·k`` ranked pixels moved:

- **deletion** starts at ``x`` and sets moved pixels to the substrate 0 (the mean image in normalised input space);
- **insertion** starts at ``blur(x)`` (Gaussian) and copies moved pixels from ``x``.

The curve is ``y_t = softmax(f(x_t))_c`` for ``t = 0..T`` and its area ``AUC = (1/T) Σ_{t<T} (y_t + y_{t+1}) / 2``
(:func:`auc`). Insertion is better high, deletion low; ``overall = insertion − deletion``.

On data with object masks: the **pointing game** asks whether the map's argmax lies in the mask, and
**mass in mask** is the share ``Σ_p s(p) 1[p ∈ mask] / Σ_p s(p)`` of the map inside it (a uniform map scores the
mask's area fraction). **Top-k IoU** ranks the pixels as above, keeps the ``k = round(f·HW)`` first (the top
``f`` share, ties in raster order) and scores their intersection over union with the mask.
:func:`localisation_scores` gives the three mask scores at once; :func:`centred_gaussian_map` is the
centre-bias baseline map they are compared against.

:func:`saliency_scores` computes all of them per image; :class:`SaliencyMetrics` accumulates their means.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchvision.transforms.functional import gaussian_blur

__all__ = [
    "SaliencyMetrics",
    "auc",
    "centred_gaussian_map",
    "insertion_deletion",
    "localisation_scores",
    "mass_in_mask",
    "pixel_ranks",
    "pointing_game",
    "saliency_scores",
    "top_pixels",
    "topk_iou",
    "uniform_mass_in_mask",
    "upsample_maps",
]


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of maps ``[B, h, w]`` to ``[B, *size]``; unchanged if equal."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def pixel_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel by descending saliency, 0 = most salient, ties in raster order: ``[B, H, W]`` long."""
    order = saliency.flatten(1).sort(dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks.view_as(saliency)


def _moving_curve(
    classify: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    end: torch.Tensor,
    ranks: torch.Tensor,
    per_step: int,
    steps: int,
    target: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """``[B, T+1]`` target probabilities of ``x_t = where(rank < t·k, end, start)``, classified ``chunk`` at a time."""
    count = len(start) * (steps + 1)
    probabilities = []
    for pairs in torch.arange(count, device=start.device).split(chunk):
        image, step = pairs // (steps + 1), pairs % (steps + 1)
        moved = ranks[image] < (step * per_step)[:, None, None]
        perturbed = torch.where(moved[:, None], end[image], start[image])
        logits = classify(perturbed).float()
        probabilities.append(logits.softmax(dim=1).gather(1, target[image][:, None])[:, 0])
    return torch.cat(probabilities).view(len(start), steps + 1)


def insertion_deletion(
    classify: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    target: torch.Tensor,
    steps: int = 16,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insertion and deletion curves of ``softmax(classify(x_t))[target]`` (module docstring).

    Runs ``classify`` under ``torch.no_grad()`` as it is (put the module in eval mode first).

    Args:
        classify: images ``[n, 3, H, W]`` to logits ``[n, C]``.
        images: ``[B, 3, H, W]`` normalised images ``x``.
        saliency: ``[B, H', W']`` maps (upsampled bilinearly to ``H × W``).
        target: ``[B]`` class explained per image ``c``.
        steps: ``T``; ``k = ⌈HW / T⌉`` pixels move per step (when ``T`` does not divide ``HW`` the last steps may
            repeat the fully moved image). The spec's ``k = 10`` at 32 px is ``T = 103``; ``k = 224·8`` at 224 px
            is ``T = 28``.
        blur_kernel: side of the Gaussian kernel of the insertion start ``blur(x)`` (reflect padding: needs
            ``blur_kernel // 2 < min(H, W)``).
        blur_sigma: its standard deviation in pixels.
        chunk: most perturbed images per ``classify`` call.

    Returns:
        ``(insertion, deletion)``, each ``[B, T+1]``; ``deletion[:, 0]`` is the clean image's probability,
        ``deletion[:, T]`` the all-zero image's, ``insertion[:, T]`` the clean image's.
    """
    height, width = images.shape[-2:]
    ranks = pixel_ranks(upsample_maps(saliency.to(images), (height, width)))
    per_step = math.ceil(height * width / steps)
    target = target.to(images.device)
    with torch.no_grad():
        blurred = gaussian_blur(images, [blur_kernel, blur_kernel], [blur_sigma, blur_sigma])
        insertion = _moving_curve(classify, blurred, images, ranks, per_step, steps, target, chunk)
        deletion = _moving_curve(classify, images, torch.zeros_like(images), ranks, per_step, steps, target, chunk)
    return insertion, deletion


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area ``(1/T) Σ_{t<T} (y_t + y_{t+1}) / 2`` of curves ``[B, T+1]`` over ``[0, 1]``: ``[B]``."""
    return ((curve[:, :-1] + curve[:, 1:]) / 2).mean(dim=1)


def pointing_game(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whether each map's argmax (first in raster order on ties) lies in the mask.

    Args:
        saliency: ``[B, h, w]`` maps (upsampled bilinearly to the mask's size if it differs).
        mask: ``[B, H, W]`` object masks (non-zero = object).

    Returns:
        ``[B]`` bool hits.
    """
    maps = upsample_maps(saliency.float(), tuple(mask.shape[-2:]))
    peak = maps.flatten(1).argmax(dim=1)
    return mask.flatten(1).gather(1, peak[:, None].to(mask.device))[:, 0].bool()


def mass_in_mask(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside the mask, ``Σ_p R(p) 1[p ∈ mask] / Σ_p R(p)`` (NaN for an all-zero map).

    Args:
        maps: ``[..., H, W]`` non-negative maps.
        mask: ``[H, W]`` bool mask, or any shape that broadcasts against ``maps`` (e.g. ``[B, 1, H, W]``).

    Returns:
        ``[...]`` shares in ``[0, 1]``.
    """
    inside = (maps * mask.to(maps.dtype)).sum(dim=(-2, -1))
    return inside / maps.sum(dim=(-2, -1))


def uniform_mass_in_mask(mask: torch.Tensor) -> torch.Tensor:
    """The :func:`mass_in_mask` of a uniform map: the mask's area fraction, ``[...]`` from ``mask [..., H, W]``."""
    return mask.float().mean(dim=(-2, -1))


def top_pixels(saliency: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``k = max(1, round(f·HW))`` most salient pixels of each map, ties in raster order (:func:`pixel_ranks`).

    Args:
        saliency: ``[B, H, W]`` maps.
        fraction: ``f`` in ``(0, 1]``, the share of pixels kept.

    Returns:
        ``[B, H, W]`` bool, exactly ``k`` True per map (an all-zero map keeps its first ``k`` pixels in raster order).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    count = max(1, round(fraction * saliency.shape[-2] * saliency.shape[-1]))
    return pixel_ranks(saliency) < count


def topk_iou(saliency: torch.Tensor, mask: torch.Tensor, fraction: float = 0.117) -> torch.Tensor:
    """IoU of each map's top-``f`` pixels ``S`` (:func:`top_pixels`) with the mask ``M``: ``|S ∩ M| / |S ∪ M|``.

    Taking ``f`` = the mean mask area (0.117 on Shapes at 64 px) makes ``|S| ≈ |M|``, so a map that ranks the
    object first scores close to 1 whatever its values are; only the ranking counts.

    Args:
        saliency: ``[B, h, w]`` maps (upsampled bilinearly to the mask's size if it differs).
        mask: ``[B, H, W]`` object masks (non-zero = object).
        fraction: ``f`` in ``(0, 1]``.

    Returns:
        ``[B]`` IoUs in ``[0, 1]``.

    Example:
        >>> maps = torch.tensor([[[0.0, 0.9], [0.5, 0.1]]])
        >>> topk_iou(maps, torch.tensor([[[0, 1], [1, 0]]]), fraction=0.25)
        tensor([0.5000])
    """
    maps = upsample_maps(saliency.float(), tuple(mask.shape[-2:]))
    top = top_pixels(maps, fraction)
    inside = mask.to(top.device).bool()
    intersection = (top & inside).flatten(1).sum(dim=1)
    union = (top | inside).flatten(1).sum(dim=1)
    return intersection / union


def localisation_scores(saliency: torch.Tensor, mask: torch.Tensor, fraction: float) -> dict[str, torch.Tensor]:
    """The mask scores of maps: ``pointing`` (:func:`pointing_game`), ``mass_in_mask`` (:func:`mass_in_mask`, NaN
    for an all-zero map) and ``topk_iou`` (:func:`topk_iou` at ``fraction``), each ``[B]`` (pointing as float).

    Args:
        saliency: ``[B, h, w]`` non-negative maps (upsampled bilinearly to the mask's size if it differs).
        mask: ``[B, H, W]`` object masks.
        fraction: share of pixels kept by the top-k IoU.
    """
    maps = upsample_maps(saliency.float(), tuple(mask.shape[-2:]))
    return {"pointing": pointing_game(maps, mask).float(), "mass_in_mask": mass_in_mask(maps, mask.to(maps.device)),
            "topk_iou": topk_iou(maps, mask, fraction)}


def centred_gaussian_map(height: int, width: int, sigma: float = 0.25) -> torch.Tensor:
    """The centre-bias baseline ``G(y, x) = exp(−(y − c_y)² / (2 (σH)²) − (x − c_x)² / (2 (σW)²))``, ``[H, W]``.

    ``(y, x)`` are pixel centres ``(i + ½, j + ½)`` and ``(c_y, c_x) = (H/2, W/2)`` the image centre, so the map is
    symmetric; it is divided by its maximum (1 at the centre pixels).

    Args:
        height: ``H``.
        width: ``W``.
        sigma: standard deviation as a fraction of each side.
    """
    ys = (torch.arange(height) + 0.5 - height / 2) / (sigma * height)
    xs = (torch.arange(width) + 0.5 - width / 2) / (sigma * width)
    gauss = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / 2)
    return gauss / gauss.max()


def saliency_scores(
    classify: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    **curve_options: int | float,
) -> dict[str, torch.Tensor]:
    """Per-image scores of saliency maps, keyed as :meth:`SaliencyMetrics.update` takes them.

    Args:
        classify: images ``[n, 3, H, W]`` to logits ``[n, C]`` (in eval mode).
        images: ``[B, 3, H, W]`` normalised images.
        saliency: ``[B, H', W']`` non-negative maps.
        target: ``[B]`` explained (usually predicted) classes.
        mask: ``[B, H, W]`` object masks, if the data has them.
        **curve_options: ``steps``, ``blur_kernel``, ``blur_sigma``, ``chunk`` of :func:`insertion_deletion`.

    Returns:
        ``insertion [B]`` and ``deletion [B]`` AUCs, plus ``mass_in_mask [B]`` and ``pointing [B]`` when ``mask``
        is given (the maps upsampled to the mask's size).
    """
    insertion, deletion = insertion_deletion(classify, images, saliency, target, **curve_options)
    scores = {"insertion": auc(insertion), "deletion": auc(deletion)}
    if mask is not None:
        maps = upsample_maps(saliency.float(), tuple(mask.shape[-2:]))
        scores["mass_in_mask"] = mass_in_mask(maps, mask.to(maps.device))
        scores["pointing"] = pointing_game(maps, mask)
    return scores


class SaliencyMetrics(Metric):
    """Means of per-image saliency scores (:func:`saliency_scores`) over everything updated since the last reset.

    ``kwargs`` go to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute=False`` when every rank scores the same
    samples).

    ``compute()`` returns ``insertion`` (↑), ``deletion`` (↓), ``overall = insertion − deletion`` (↑) and, only
    if they were ever updated, ``mass_in_mask`` (↑) and ``pointing`` (↑, the hit rate). Mass-in-mask values that
    are NaN (all-zero maps) are left out of the mean and counted in the ``mass_skipped`` state. Since the keys do
    not all improve in the same direction, ``higher_is_better`` is None.

    Example:
        >>> m = SaliencyMetrics()
        >>> m.update(torch.tensor([0.8, 0.6]), torch.tensor([0.2, 0.4]), pointing=torch.tensor([True, False]))
        >>> {k: round(float(v), 2) for k, v in m.compute().items()}
        {'insertion': 0.7, 'deletion': 0.3, 'overall': 0.4, 'pointing': 0.5}
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("insertion", "deletion", "count", "mass", "mass_count", "mass_skipped", "hits", "pointed"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(
        self,
        insertion: torch.Tensor,
        deletion: torch.Tensor,
        mass_in_mask: torch.Tensor | None = None,
        pointing: torch.Tensor | None = None,
    ) -> None:
        """``insertion [B]`` and ``deletion [B]`` AUCs; optional ``mass_in_mask [B]`` shares, ``pointing [B]`` hits."""
        self.insertion += insertion.float().sum()
        self.deletion += deletion.float().sum()
        self.count += insertion.numel()
        if mass_in_mask is not None:
            valid = ~mass_in_mask.isnan()
            self.mass += mass_in_mask[valid].float().sum()
            self.mass_count += valid.sum()
            self.mass_skipped += (~valid).sum()
        if pointing is not None:
            self.hits += pointing.float().sum()
            self.pointed += pointing.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        insertion, deletion = self.insertion / self.count, self.deletion / self.count
        out = {"insertion": insertion, "deletion": deletion, "overall": insertion - deletion}
        if self.mass_count + self.mass_skipped > 0:
            out["mass_in_mask"] = self.mass / self.mass_count
        if self.pointed > 0:
            out["pointing"] = self.hits / self.pointed
        return out
