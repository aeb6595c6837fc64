"""Grad-CAM family: class activation maps from a feature map and the gradient of the explained class's score.

For features ``A [B, K, h, w]`` inside the autograd graph that produced the scores ``y [B]`` (the explained class's
logit per sample), with gradients ``g_k = ∂y / ∂A_k [h, w]``, the channel weights are

- **Grad-CAM** (Selvaraju et al. 2017): ``w_k = (1 / hw) Σ_ij g_k,ij``;
- **Grad-CAM++** (Chattopadhay et al. 2018, closed form under the exponential-score assumption):
  ``α_k,ij = g_k,ij² / (2 g_k,ij² + (Σ_ab A_k,ab) g_k,ij³)`` (0 where the denominator is 0) and
  ``w_k = Σ_ij α_k,ij relu(g_k,ij)``;

and the map is ``relu(Σ_k w_k A_k)`` ``[B, h, w]``, upsampled bilinearly to ``size`` when given and divided by its
maximum per image (an all-zero map stays zero).

The gradients are ``torch.autograd.grad(Σ_b y_b, A)``: each sample's score depends on its own features only
(true in eval mode; batch norm in training mode would mix the batch), so
``∂(Σ_b y_b) / ∂A_b = ∂y_b / ∂A_b``. Parameters' ``.grad`` are left untouched. ``explain`` runs under
``torch.no_grad()``, so the caller builds the graph under ``torch.enable_grad()``; the maps themselves can be taken
outside it::

    with torch.enable_grad():
        features = backbone(images)                                   # [B, K, h, w]
        score = head(features).gather(1, predicted[:, None])[:, 0]    # [B]
    saliency = grad_cam(features, score, size=images.shape[-2:])       # [B, H, W]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from xvlm.metrics.saliency import upsample_maps

__all__ = ["grad_cam", "grad_cam_plus_plus", "tokens_to_map"]

ChannelWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grad_cam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``w_k = (1 / hw) Σ_ij g_k,ij``: ``[B, K]``."""
    return gradients.mean(dim=(-2, -1))


def _grad_cam_plus_plus_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``w_k = Σ_ij α_k,ij relu(g_k,ij)``, ``α = g² / (2g² + (Σ_ab A_k,ab) g³)`` (0 where that is 0/0): ``[B, K]``."""
    squared = gradients.square()
    denominator = 2 * squared + activations.sum(dim=(-2, -1), keepdim=True) * squared * gradients
    alpha = torch.where(denominator != 0, squared / denominator, torch.zeros_like(denominator))
    return (alpha * gradients.relu()).sum(dim=(-2, -1))


def _class_activation_map(
    features: torch.Tensor,
    score: torch.Tensor,
    size: tuple[int, int] | None,
    retain_graph: bool,
    channel_weights: ChannelWeights,
) -> torch.Tensor:
    """``relu(Σ_k w_k A_k)`` with ``w = channel_weights(A, g)``, upsampled and max-normalised (module docstring)."""
    if not score.requires_grad:
        raise ValueError("the score is not in an autograd graph: compute the features and the score under "
                         "torch.enable_grad() (and outside torch.inference_mode())")
    with torch.enable_grad():  # the sum joins the caller's graph even when called under torch.no_grad()
        total = score.sum()
    (gradients,) = torch.autograd.grad(total, features, retain_graph=retain_graph)
    activations = features.detach()
    cam = torch.einsum("bk,bkhw->bhw", channel_weights(activations, gradients), activations).relu()
    if size is not None:
        cam = upsample_maps(cam, tuple(size))
    peak = cam.amax(dim=(-2, -1), keepdim=True)
    return cam / torch.where(peak > 0, peak, torch.ones_like(peak))


def grad_cam(
    features: torch.Tensor, score: torch.Tensor, size: tuple[int, int] | None = None, *, retain_graph: bool = False
) -> torch.Tensor:
    """Grad-CAM maps (module docstring).

    Args:
        features: ``[B, K, h, w]`` feature maps ``A`` in the graph that produced ``score``.
        score: ``[B]`` explained class's logit per sample ``y``.
        size: ``(H, W)`` to upsample the maps to (bilinear); None keeps ``h × w``.
        retain_graph: keep the graph for another call on the same forward pass.

    Returns:
        ``[B, H, W]`` maps in ``[0, 1]`` with maximum 1 (all-zero maps stay zero), detached.
    """
    return _class_activation_map(features, score, size, retain_graph, _grad_cam_weights)


def grad_cam_plus_plus(
    features: torch.Tensor, score: torch.Tensor, size: tuple[int, int] | None = None, *, retain_graph: bool = False
) -> torch.Tensor:
    """Grad-CAM++ maps (module docstring); arguments and output as in :func:`grad_cam`."""
    return _class_activation_map(features, score, size, retain_graph, _grad_cam_plus_plus_weights)


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT patch tokens ``[B, N, D]`` (row-major over the grid, class token removed) as a map ``[B, D, h, w]``.

    Differentiable: for Grad-CAM of a ViT, compute the score from the returned map (e.g. pool it for the head), so
    that ``∂y / ∂A`` exists.
    """
    batch, count, dim = tokens.shape
    height, width = grid
    if count != height * width:
        raise ValueError(f"tokens_to_map got {count} tokens for a {height}×{width} grid")
    return tokens.transpose(1, 2).reshape(batch, dim, height, width)
