"""Pointing game, mass in mask, top-k IoU and the centred Gaussian against plain numpy/loop references (CPU).

Every reference here is written apart from :mod:`xvlm.metrics.saliency`: python loops over pixels in raster order,
so that ties (first maximum wins, first ``k`` pixels win) follow from the loop order rather than from a sort.
"""

import math

import numpy as np
import pytest
import torch

from xvlm.metrics.saliency import (
    centred_gaussian_map,
    localisation_scores,
    mass_in_mask,
    pointing_game,
    top_pixels,
    topk_iou,
)


# --------------------------------------------------------------------------------------------- references
def reference_pointing(saliency: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the first pixel (raster order) holding the map's maximum lies in the mask."""
    best, where = -math.inf, None
    for y in range(saliency.shape[0]):
        for x in range(saliency.shape[1]):
            if saliency[y, x] > best:
                best, where = saliency[y, x], (y, x)
    return bool(mask[where])


def reference_mass(saliency: np.ndarray, mask: np.ndarray) -> float:
    """``Σ inside / Σ all`` by a loop (NaN for an all-zero map)."""
    inside = total = 0.0
    for y in range(saliency.shape[0]):
        for x in range(saliency.shape[1]):
            total += saliency[y, x]
            inside += saliency[y, x] * bool(mask[y, x])
    return inside / total if total else math.nan


def reference_top(saliency: np.ndarray, count: int) -> set[tuple[int, int]]:
    """The ``count`` pixels picked one at a time: each pick is the first remaining maximum in raster order."""
    remaining = [(y, x) for y in range(saliency.shape[0]) for x in range(saliency.shape[1])]
    chosen = set()
    for _ in range(count):
        pick = remaining[0]
        for pixel in remaining:
            if saliency[pixel] > saliency[pick]:
                pick = pixel
        chosen.add(pick)
        remaining.remove(pick)
    return chosen


def reference_iou(saliency: np.ndarray, mask: np.ndarray, fraction: float) -> float:
    """IoU of :func:`reference_top` with ``round(f·HW)`` pixels (at least one) and the mask's pixel set."""
    count = max(1, round(fraction * saliency.size))
    top = reference_top(saliency, count)
    inside = {(y, x) for y, x in zip(*np.nonzero(mask))}
    return len(top & inside) / len(top | inside)


# --------------------------------------------------------------------------------------------- hand-made cases
def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    """Five ``6 × 6`` maps and masks: a peak in the mask, a peak outside, a flat (all-tied) map, an all-zero map,
    and a map whose top values tie across the mask's border."""
    maps = torch.zeros(5, 6, 6)
    masks = torch.zeros(5, 6, 6, dtype=torch.bool)
    masks[:, 2:5, 1:4] = True
    maps[0, 3, 2] = 1.0
    maps[0, 0, 0] = 0.5
    maps[1, 0, 5] = 1.0
    maps[1, 3, 2] = 0.9
    maps[2] = 0.25
    maps[4, 1:4, 2:5] = 0.8
    maps[4, 0, 0] = 0.1
    return maps, masks


def random_cases(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight ``7 × 9`` maps with coarse values (many ties) and random rectangular masks."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 4, (8, 7, 9), generator=g).float() / 3
    masks = torch.zeros(8, 7, 9, dtype=torch.bool)
    for mask in masks:
        y0, x0 = torch.randint(0, 5, (2,), generator=g).tolist()
        mask[y0 : y0 + 3, x0 : x0 + 4] = True
    return maps, masks


CASES = [hand_made(), random_cases(0), random_cases(1)]


@pytest.mark.parametrize("maps, masks", CASES)
def test_pointing_matches_the_first_maximum_in_raster_order(maps, masks):
    expected = [reference_pointing(m.numpy(), k.numpy()) for m, k in zip(maps, masks)]
    assert pointing_game(maps, masks).tolist() == expected


@pytest.mark.parametrize("maps, masks", CASES)
def test_mass_in_mask_matches_the_loop_and_is_nan_for_all_zero_maps(maps, masks):
    expected = torch.tensor([reference_mass(m.numpy(), k.numpy()) for m, k in zip(maps, masks)])
    torch.testing.assert_close(mass_in_mask(maps, masks), expected, equal_nan=True)


@pytest.mark.parametrize("fraction", [1 / 36, 0.117, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("maps, masks", CASES)
def test_topk_iou_matches_greedy_picks_with_raster_order_ties(maps, masks, fraction):
    expected = torch.tensor([reference_iou(m.numpy(), k.numpy(), fraction) for m, k in zip(maps, masks)])
    torch.testing.assert_close(topk_iou(maps, masks, fraction), expected)


def test_hand_made_top_k_values():
    maps, masks = hand_made()
    # k = round(0.25 · 36) = 9 pixels; the mask has 9 pixels.
    iou = topk_iou(maps, masks, 0.25)
    # The flat and the all-zero map both keep rows 0 and 1 (first 9 in raster order), none in the mask.
    assert iou[2] == iou[3] == 0.0
    # Map 4: its 9 pixels of 0.8 are the block rows 1–3 × cols 2–4, 4 of which lie in the mask: 4 / (9 + 9 − 4).
    assert iou[4] == pytest.approx(4 / 14)
    assert top_pixels(maps, 0.25).sum(dim=(1, 2)).tolist() == [9] * 5


def test_topk_iou_of_the_mask_itself_is_one_and_of_its_complement_zero():
    _, masks = hand_made()
    area = float(masks[0].float().mean())
    assert topk_iou(masks.float(), masks, area).tolist() == [1.0] * 5
    assert topk_iou((~masks).float(), masks, area).tolist() == [0.0] * 5


def test_topk_iou_upsamples_maps_to_the_mask():
    _, masks = hand_made()
    coarse = torch.zeros(5, 3, 3)
    coarse[:, 1, 1] = 1.0
    expected = topk_iou(torch.nn.functional.interpolate(coarse[:, None], size=(6, 6), mode="bilinear")[:, 0],
                        masks, 0.1)
    torch.testing.assert_close(topk_iou(coarse, masks, 0.1), expected)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_topk_iou_rejects_fractions_outside_the_unit_interval(fraction):
    maps, masks = hand_made()
    with pytest.raises(ValueError, match="fraction"):
        topk_iou(maps, masks, fraction)


def test_localisation_scores_are_the_three_metrics():
    maps, masks = random_cases(2)
    scores = localisation_scores(maps, masks, 0.2)
    assert scores["pointing"].tolist() == pointing_game(maps, masks).float().tolist()
    torch.testing.assert_close(scores["mass_in_mask"], mass_in_mask(maps, masks))
    torch.testing.assert_close(scores["topk_iou"], topk_iou(maps, masks, 0.2))


@pytest.mark.parametrize("height, width", [(8, 8), (7, 10)])
def test_centred_gaussian_matches_the_formula(height, width):
    sigma = 0.25
    expected = np.empty((height, width))
    for y in range(height):
        for x in range(width):
            dy = (y + 0.5 - height / 2) / (sigma * height)
            dx = (x + 0.5 - width / 2) / (sigma * width)
            expected[y, x] = math.exp(-(dy * dy + dx * dx) / 2)
    expected /= expected.max()
    gauss = centred_gaussian_map(height, width, sigma)
    torch.testing.assert_close(gauss, torch.from_numpy(expected).float())
    torch.testing.assert_close(gauss, gauss.flip(0).flip(1))
