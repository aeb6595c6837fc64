"""Patch-raster arithmetic of ViTs: attention rollout and super-patches.

A ViT at patch grid ``(h, w)`` has ``N = h·w`` patch tokens in row-major order (patch row ``i``, column ``j`` is
token ``n = i·w + j``). A **super-patch** of side ``s`` is an ``s × s`` block of the raster: patch ``(i, j)`` lies in
super-patch ``g = (i // s)·(w // s) + (j // s)`` of the ``G = (h/s)·(w/s)`` ones, as sub-patch
``k = (i % s)·s + (j % s)`` (sub-patch-major within the block). One definition of that grouping serves every user
(SVIP's selector inputs, its rollout targets, its replacement and its explanation maps), so scores of a 1×4 strip
of the raster can never stand in for a 2×2 block.

- :func:`attention_rollout` (Abnar & Zuidema 2020): ``Â_l = ½A_l + ½I``, ``R = Â_L ⋯ Â_1``;
- :func:`superpatch_scores`: the mean of per-patch scores over each block;
- :func:`group_superpatches` / :func:`ungroup_superpatches`: ``[B, N, W] <-> [B, G, s²·W]`` (a super-patch's
  sub-patch tokens concatenated in sub-patch order), exact inverses;
- :func:`superpatch_index`: the super-patch of every pixel of an image, for maps and masks.
"""

from __future__ import annotations

import torch


def attention_rollout(attentions: torch.Tensor) -> torch.Tensor:
    """Attention rollout ``R = Â_L ⋯ Â_1`` with ``Â_l = ½A_l + ½I``.

    Args:
        attentions: ``[L, B, T, T]`` head-averaged post-softmax attention of blocks ``1..L`` in order (rows sum to
            1, so every ``Â_l`` and ``R`` are row-stochastic).

    Returns:
        ``[B, T, T]``: ``R[b, q, k]``, how much of token ``q``'s final representation flows from input token ``k``.
    """
    if attentions.ndim != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attention_rollout expects [L, B, T, T] attention, got {tuple(attentions.shape)}")
    eye = torch.eye(attentions.shape[-1], dtype=attentions.dtype, device=attentions.device)
    rollout = 0.5 * attentions[0] + 0.5 * eye
    for attention in attentions[1:]:
        rollout = (0.5 * attention + 0.5 * eye) @ rollout
    return rollout


def _check_grid(count: int, grid: tuple[int, int], size: int) -> tuple[int, int]:
    """``(h/s, w/s)``, or a ValueError when the raster does not hold ``count`` tokens or ``s`` does not divide it."""
    h, w = grid
    if count != h * w:
        raise ValueError(f"{count} patch tokens do not fill a {h}x{w} grid")
    if size < 1 or h % size or w % size:
        raise ValueError(f"super-patches of {size}x{size} patches do not tile the {h}x{w} patch grid; choose a "
                         f"super-patch size that divides both sides (or an input size whose grid it divides)")
    return h // size, w // size


def group_superpatches(tokens: torch.Tensor, grid: tuple[int, int], size: int = 2) -> torch.Tensor:
    """``[B, N, W] -> [B, G, s²·W]``: each super-patch's ``s²`` patch tokens concatenated in sub-patch order.

    Row ``g`` holds patches ``(i, j)`` of super-patch ``g`` (module docstring), sub-patch ``k = (i % s)·s + j % s``
    at columns ``k·W .. (k+1)·W``.
    """
    gh, gw = _check_grid(tokens.shape[1], grid, size)
    b, _, width = tokens.shape
    blocks = tokens.reshape(b, gh, size, gw, size, width).permute(0, 1, 3, 2, 4, 5)  # [B, gh, gw, s, s, W]
    return blocks.reshape(b, gh * gw, size * size * width)


def ungroup_superpatches(grouped: torch.Tensor, grid: tuple[int, int], size: int = 2) -> torch.Tensor:
    """``[B, G, s²·W] -> [B, N, W]``: the inverse of :func:`group_superpatches` (row-major patch tokens)."""
    h, w = grid
    gh, gw = _check_grid(h * w, grid, size)
    b = grouped.shape[0]
    width = grouped.shape[-1] // (size * size)
    blocks = grouped.reshape(b, gh, gw, size, size, width).permute(0, 1, 3, 2, 4, 5)  # [B, gh, s, gw, s, W]
    return blocks.reshape(b, h * w, width)


def superpatch_scores(scores: torch.Tensor, grid: tuple[int, int], size: int = 2) -> torch.Tensor:
    """``[B, N] -> [B, G]``: the mean of the patch scores over each ``size × size`` super-patch."""
    return group_superpatches(scores.unsqueeze(-1), grid, size).mean(dim=-1)


def superpatch_index(image_size: tuple[int, int], grid: tuple[int, int], size: int = 2) -> torch.Tensor:
    """``[H, W]`` long: the super-patch of each pixel of an ``H × W`` image tiled by a ``grid`` of patches.

    Pixel ``(y, x)`` is in patch ``(y·h // H, x·w // W)``, hence in super-patch
    ``(y·h // H // s)·(w // s) + (x·w // W // s)``.
    """
    (height, width), (h, w) = image_size, grid
    gh, gw = _check_grid(h * w, grid, size)
    rows = torch.arange(height) * h // height // size
    cols = torch.arange(width) * w // width // size
    return rows[:, None] * gw + cols[None, :]
