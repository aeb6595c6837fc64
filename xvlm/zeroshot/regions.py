"""Region-level explanation of LaZSL: descriptor contributions and per-descriptor heat maps (spec §9).

For the explained class ``k`` of an image, with OT plan ``T [N, M]`` and hybrid similarity
``H = θ P Q_kᵀ + (1 − θ) 1 (Q_k p_g)ᵀ`` (:func:`xvlm.zeroshot.hybrid_similarity`):

- **contribution** of descriptor ``j``: ``c_j = Σ_n T_nj H_nj``, so ``Σ_j c_j = ψ_k``, the class score (computed
  alongside the score in :func:`xvlm.zeroshot.lazsl_scores` by :func:`xvlm.zeroshot.descriptor_contributions`);
- **heat map** of descriptor ``j``: ``R_j(p) = Σ_n T_nj 1[p ∈ box_n]``, divided (by default) by the coverage
  ``cov(p) = Σ_n keep_n 1[p ∈ box_n]``, the number of kept crops over pixel ``p`` (0 where none covers it), so
  that central pixels are not favoured just because more crops overlap there.

Pixel ``p = (y, x)`` is the unit square ``[x, x + 1) × [y, y + 1)``; it lies in box ``(x0, y0, x1, y1)`` iff its
centre does. Mass bookkeeping: ``Σ_p R_j(p) = Σ_n T_nj w_n`` with the crop weight ``w_n = |box_n|`` (raw sum) or
``w_n = Σ_{p ∈ box_n} 1 / cov(p)`` (normalised, :func:`crop_weights`). As the plan's rows are ``μ`` (uniform
``1 / N_kept`` on kept crops), the normalised maps of all descriptors add up to ``1 / N_kept`` on every covered
pixel: the total heat is flat and only its split between descriptors varies.

The quality check (:func:`xvlm.metrics.saliency.mass_in_mask`) is the share of a map's mass inside the object mask;
a uniform map scores the mask's area fraction (:func:`xvlm.metrics.saliency.uniform_mass_in_mask`).

:func:`explain_lazsl` scores through :func:`xvlm.zeroshot.score_images`, the path of the :class:`~xvlm.zeroshot.LaZSL`
callback, with a :class:`~xvlm.zeroshot.LaZSLSettings`: given the callback's ``settings``, its scores (``logits``,
``predicted``) are the callback's. The heat maps come from a second pass over **region crops** (:class:`RegionCrops`:
the same settings with smaller and more crops). The scoring crops (side 0.6–0.9 of the short side) each cover most
of the image, so every pixel is covered by nearly the same crops and the maps come out flat: on 64 Shapes validation
images the top descriptor's map put 1.1× the uniform share on the object. 48 crops of side 0.1–0.2 put 2.9× there
with the Shapes backbone and 2.3× / 2.9× after fine-tuning CLIPFineTune / LICO (3 seeds; more or larger crops
average more of them over each pixel and flatten the map again; docs/explanations.md for the grid), while LaZSL's
top-1 with such crops falls, hence the two passes. The defaults are the grid's best on Shapes validation images,
whose objects cover about 12 % of the image; for photos where the object fills most of the frame, larger region
crops suit better. ``region_crops=None`` makes one pass with ``settings`` alone.

Given the samples' original images (``originals``; :func:`lazsl_explainer` reads them from a datamodule's
``original_image``, :class:`xvlm.contracts.OriginalImages`), both passes cut their crops from the originals, as the
callback does, and the heat maps are drawn at each original's size with boxes in its pixels; the explanation then
carries the originals (``original_image``), which the renderer shows under the maps.
Modules are used through the :class:`xvlm.contracts.ExplainableModule` protocol only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from datamodules.task import Task
from xvlm.backbones import VisionLanguageModel
from xvlm.contracts import ExplainableModule
from xvlm.prompts import descriptor_sentences, encode_descriptors
from xvlm.zeroshot.lazsl import LaZSLSettings, read_originals, score_images

__all__ = [
    "RegionCrops",
    "box_indicators",
    "crop_weights",
    "descriptor_heatmaps",
    "explain_lazsl",
    "lazsl_explainer",
    "top_descriptor_maps",
]


def box_indicators(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel masks of boxes: ``1[x0 ≤ x + ½ < x1 and y0 ≤ y + ½ < y1]``.

    Args:
        boxes: ``[..., N, 4]`` boxes ``(x0, y0, x1, y1)`` in pixel-edge coordinates.
        image_size: ``(H, W)``.

    Returns:
        ``[..., N, H, W]`` float indicators in the boxes' dtype.
    """
    height, width = image_size
    ys = torch.arange(height, dtype=boxes.dtype, device=boxes.device) + 0.5
    xs = torch.arange(width, dtype=boxes.dtype, device=boxes.device) + 0.5
    in_y = (ys >= boxes[..., 1:2]) & (ys < boxes[..., 3:4])
    in_x = (xs >= boxes[..., 0:1]) & (xs < boxes[..., 2:3])
    return (in_y[..., :, None] & in_x[..., None, :]).to(boxes.dtype)


def _coverage(indicators: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``cov(p) = Σ_n keep_n 1[p ∈ box_n]``, ``[..., H, W]`` from indicators ``[..., N, H, W]``."""
    if keep is None:
        return indicators.sum(dim=-3)
    return torch.einsum("...n,...nhw->...hw", keep.to(indicators.dtype), indicators)


def _safe_inverse(coverage: torch.Tensor) -> torch.Tensor:
    """``1 / cov`` where ``cov > 0``, else 0."""
    return torch.where(coverage > 0, 1 / coverage.clamp_min(1), torch.zeros_like(coverage))


def crop_weights(
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    keep: torch.Tensor | None = None,
    normalise_by_coverage: bool = True,
) -> torch.Tensor:
    """Heat-map mass a unit of plan on crop ``n`` produces: ``Σ_p R_j(p) = Σ_n T_nj w_n``.

    Args:
        boxes: ``[..., N, 4]`` crop boxes.
        image_size: ``(H, W)``.
        keep: ``[..., N]`` bool, the crops counted in the coverage (all if None).
        normalise_by_coverage: ``w_n = Σ_{p ∈ box_n} 1 / cov(p)`` if True, else the box area ``|box_n|``.

    Returns:
        ``[..., N]`` weights ``w``.
    """
    indicators = box_indicators(boxes, image_size)
    if not normalise_by_coverage:
        return indicators.sum(dim=(-2, -1))
    inverse = _safe_inverse(_coverage(indicators, keep))
    return torch.einsum("...nhw,...hw->...n", indicators, inverse)


def descriptor_heatmaps(
    plan: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    normalise_by_coverage: bool = True,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-descriptor heat maps ``R_j(p) = Σ_n T_nj 1[p ∈ box_n] / cov(p)`` (module docstring).

    Args:
        plan: ``[..., N, M]`` OT plan ``T`` of one class (zero rows on dropped crops).
        boxes: ``[..., N, 4]`` crop boxes ``(x0, y0, x1, y1)`` in pixel-edge coordinates.
        image_size: ``(H, W)`` of the maps.
        normalise_by_coverage: divide by ``cov(p)`` (0 where no counted crop covers ``p``); else the raw sum.
        keep: ``[..., N]`` bool, the crops counted in ``cov`` (the kept crops; all if None).

    Returns:
        ``[..., M, H, W]`` maps; ``Σ_p R_j(p) = Σ_n T_nj w_n`` with ``w`` from :func:`crop_weights`.
    """
    indicators = box_indicators(boxes.to(plan.dtype), image_size)
    maps = torch.einsum("...nm,...nhw->...mhw", plan, indicators)
    if not normalise_by_coverage:
        return maps
    return maps * _safe_inverse(_coverage(indicators, keep)).unsqueeze(-3)


@dataclasses.dataclass(frozen=True)
class RegionCrops:
    """Crop options of LaZSL's heat maps: ``n_crops`` crops with sides from ``alpha`` to ``beta`` of the short side
    (module docstring); every other option is the scoring settings'. The defaults were chosen on Shapes validation
    images (docs/explanations.md).

    Raises:
        ValueError: naming an option out of range (as :class:`~xvlm.zeroshot.LaZSLSettings` does).
    """

    n_crops: int = 48
    alpha: float = 0.1
    beta: float = 0.2

    def __post_init__(self) -> None:
        self.applied_to(LaZSLSettings())

    def applied_to(self, settings: LaZSLSettings) -> LaZSLSettings:
        """``settings`` with these crop options."""
        return dataclasses.replace(settings, **dataclasses.asdict(self))


def explain_lazsl(
    encoder: VisionLanguageModel,
    images: torch.Tensor | None,
    indices: torch.Tensor,
    task: Task,
    class_index: torch.Tensor | None = None,
    *,
    settings: LaZSLSettings | None = None,
    region_crops: RegionCrops | None = RegionCrops(),
    normalise_by_coverage: bool = True,
    originals: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """LaZSL explanation of a batch over all the task's classes, in the renderer's conventions.

    Scores the images by :func:`xvlm.zeroshot.score_images` with every option of ``settings`` (sentence suffix,
    crops, vision selection, Sinkhorn), so with a :class:`~xvlm.zeroshot.LaZSL` callback's ``settings`` the scores
    of its classes are the callback's; then explains class ``class_index`` (the prediction if None) by its
    descriptors' contributions and heat maps over the ``region_crops`` (a second pass with ``settings`` but those
    crops; the scoring crops themselves if None). Call in eval mode under ``torch.no_grad()``.

    Args:
        encoder: the towers to score with.
        images: ``[B, 3, H, W]`` CLIP-normalised images.
        indices: ``[B]`` dataset indices (they seed the crops).
        task: the label space; needs ``descriptors``.
        class_index: ``[B]`` class to explain per image, or None for the predicted one.
        settings: every scoring option (the defaults of :class:`~xvlm.zeroshot.LaZSLSettings` if None).
        region_crops: crops of the heat maps (module docstring); None: the scoring pass's.
        normalise_by_coverage: divide the heat maps by the kept-crop coverage (spec default).
        originals: ``B`` original images ``[3, H_i, W_i]`` uint8 to cut the crops from (module docstring), or None
            (crops from ``images``, which are then not read and may be None).

    Returns:
        ``predicted [B]``, ``logits [B, C]`` (LaZSL scores with ``settings``), ``explained [B]`` (the class
        explained), and of the region pass: ``descriptor_maps [B, M, H, W]``, ``descriptor_names`` (``B`` lists of
        ``M`` descriptors, "" for padding), ``descriptor_contributions [B, M]`` (``Σ_j c_j = ψ``, the region pass's
        score of the explained class), ``descriptor_mask [B, M]`` (bool, the real descriptors; a padded one's 0 can
        outrank negative contributions), ``plans [B, N, M]``, ``crop_keep [B, N]`` and ``boxes [B, N, 4]``. Padded
        descriptors have zero maps and contributions (their plan columns are zero). With ``originals``: the boxes
        are in their pixels, ``descriptor_maps`` is a list of ``B`` maps ``[M, H_i, W_i]`` and ``original_image``
        the ``B`` originals.
    """
    descriptors = task.require("descriptors", "explain_lazsl")
    settings = LaZSLSettings() if settings is None else settings
    sentences, desc_mask = descriptor_sentences(task.class_names, descriptors, settings.suffix)
    desc_feats = encode_descriptors(encoder, sentences, desc_mask)
    out = score_images(encoder, images, indices, desc_feats, desc_mask, settings, return_plans=region_crops is None,
                       originals=originals)
    regions = out if region_crops is None else score_images(encoder, images, indices, desc_feats, desc_mask,
                                                            region_crops.applied_to(settings), return_plans=True,
                                                            originals=originals)
    predicted = out.scores.argmax(dim=1)
    explained = predicted if class_index is None else class_index.to(predicted.device)
    rows = torch.arange(len(predicted), device=predicted.device)
    plan = regions.plans[rows, explained]
    if originals is None:
        maps = descriptor_heatmaps(plan, regions.boxes, tuple(images.shape[-2:]), normalise_by_coverage,
                                   keep=regions.crop_keep)
        shown = {}
    else:
        maps = [descriptor_heatmaps(plan[i], regions.boxes[i], tuple(image.shape[-2:]), normalise_by_coverage,
                                    keep=regions.crop_keep[i]) for i, image in enumerate(originals)]
        shown = {"original_image": list(originals)}
    return {
        **shown,
        "predicted": predicted,
        "logits": out.scores,
        "explained": explained,
        "descriptor_maps": maps,
        "descriptor_names": [_descriptor_names(task.class_names[k], descriptors, plan.shape[-1])
                             for k in explained.tolist()],
        "descriptor_contributions": regions.contributions[rows, explained],
        "descriptor_mask": desc_mask.to(plan.device)[explained],
        "plans": plan,
        "crop_keep": regions.crop_keep,
        "boxes": regions.boxes,
    }


def top_descriptor_maps(explanation: dict[str, Any]) -> torch.Tensor:
    """``[B, H, W]`` heat map of each image's real descriptor with the largest contribution, from an
    :func:`explain_lazsl` output over batch images (padded descriptors never win, even against negative
    contributions)."""
    contributions = explanation["descriptor_contributions"].masked_fill(~explanation["descriptor_mask"], -torch.inf)
    top = contributions.argmax(dim=1)
    return explanation["descriptor_maps"][torch.arange(len(top)), top]


def _descriptor_names(name: str, descriptors: dict[str, list[str]], width: int) -> list[str]:
    """Class ``name``'s descriptor phrases (its name if it has none, deviation 8) padded with "" to ``width``."""
    phrases = descriptors[name] or [name]
    return phrases + [""] * (width - len(phrases))


def lazsl_explainer(
    module: ExplainableModule,
    settings: LaZSLSettings | None = None,
    region_crops: RegionCrops | None = RegionCrops(),
    originals: Callable[[int], torch.Tensor | None] | None = None,
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``explain(batch)`` by LaZSL on ``module``'s zero-shot towers (gallery ``explainer='lazsl'``, ``xvlm explain
    --lazsl``), with ``settings`` (pass the LaZSL callback's, :func:`xvlm.zeroshot.lazsl_settings_of`; defaults if
    None) and heat maps over ``region_crops`` (:func:`explain_lazsl`).

    The batch needs ``image``; ``index`` (dataset indices, which seed the crops) defaults to the positions.
    ``originals(index)`` gives the original image ``[3, H, W]`` uint8 of a sample, e.g.
    ``functools.partial(datamodule.original_image, "val")`` (:class:`xvlm.contracts.OriginalImages`); when it
    serves every sample of the batch, crops, boxes and maps are those of the originals (:func:`explain_lazsl`).

    Raises:
        ValueError: if the module has no task yet or no zero-shot encoder.
    """
    if module.task is None:
        raise ValueError(f"LaZSL explanations need the module's task; {type(module).__name__} has none yet")
    if module.zero_shot_encoder() is None:
        raise ValueError(f"LaZSL explanations need a zero-shot encoder; {type(module).__name__} has none (its "
                         "image encoder is not text-aligned)")

    def explain(batch: dict[str, Any]) -> dict[str, Any]:
        images = batch["image"]
        indices = batch.get("index", torch.arange(len(images)))
        return explain_lazsl(module.zero_shot_encoder(), images, indices, module.task, settings=settings,
                             region_crops=region_crops, originals=read_originals(originals, indices))

    return explain
