"""Grad-CAM family: class activation maps from a layer's feature map and the gradient of the explained class's score.

For a layer whose output is ``A [B, K, h, w]`` inside the model ``f`` and the explained class ``c_b`` of each sample,
with the score ``y_b = f(x)_{b, c_b}`` and gradients ``g_k = ∂y / ∂A_k [h, w]``, the channel weights are

- **Grad-CAM** (Selvaraju et al. 2017): ``w_k = (1 / hw) Σ_ij g_k,ij`` — computed by captum's ``LayerGradCam``
  (:func:`layer_grad_cam`);
- **Grad-CAM++** (Chattopadhay et al. 2018, closed form under the exponential-score assumption; captum has none):
  ``α_k,ij = g_k,ij² / (2 g_k,ij² + (Σ_ab A_k,ab) g_k,ij³)`` (0 where the denominator is 0) and
  ``w_k = Σ_ij α_k,ij relu(g_k,ij)`` — ours (:func:`grad_cam_plus_plus` on features already in a graph,
  :func:`layer_grad_cam_plus_plus` on a layer, as ``LayerGradCam`` takes it);

and the map is ``relu(Σ_k w_k A_k)`` ``[B, h, w]``, upsampled bilinearly to ``size`` when given
(:func:`~xvlm.metrics.saliency.upsample_maps`, ``align_corners=False``) and divided by its maximum per image (an
all-zero map stays zero, :func:`normalise_maps`).

The gradients are taken with ``torch.autograd.grad`` of ``Σ_b y_b``: each sample's score depends on its own
features only (true in eval mode; batch norm in training mode would mix the batch), so
``∂(Σ_b y_b) / ∂A_b = ∂y_b / ∂A_b``. Parameters' ``.grad`` are left untouched. The layer functions enable gradients
themselves (they work under ``torch.no_grad()``, not inside ``torch.inference_mode()``)::

    saliency = layer_grad_cam(model, model.layer4, images, predicted, size=images.shape[-2:])   # [B, H, W]

The explainers of :mod:`xvlm.explain.explainers` apply these to a module's image tower (for a ViT through a token
grid, :func:`tokens_to_map`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from captum.attr import LayerGradCam
from torch import nn

from xvlm.metrics.saliency import upsample_maps

__all__ = ["grad_cam_plus_plus", "layer_grad_cam", "layer_grad_cam_plus_plus", "normalise_maps", "tokens_to_map",
           "upsample"]


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is in a lower precision (autocast), else as it is (float64 stays)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map ``[..., h, w]`` divided by its maximum; a map whose maximum is not positive is left as it is."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def upsample(maps: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """Maps ``[B, h, w]`` resized bilinearly to ``size`` by :func:`~xvlm.metrics.saliency.upsample_maps` (the resize
    the saliency metrics use); unchanged when ``size`` is None."""
    return maps if size is None else upsample_maps(maps, tuple(int(s) for s in size))


def _grad_cam_plus_plus_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``w_k = Σ_ij α_k,ij relu(g_k,ij)``, ``α = g² / (2g² + (Σ_ab A_k,ab) g³)`` (0 where that is 0/0): ``[B, K]``."""
    squared = gradients.square()
    denominator = 2 * squared + activations.sum(dim=(-2, -1), keepdim=True) * squared * gradients
    alpha = torch.where(denominator != 0, squared / denominator, torch.zeros_like(denominator))
    return (alpha * gradients.relu()).sum(dim=(-2, -1))


def grad_cam_plus_plus(
    features: torch.Tensor, score: torch.Tensor, size: Sequence[int] | None = None, *, retain_graph: bool = False
) -> torch.Tensor:
    """Grad-CAM++ maps of features in the graph of the scores (module docstring).

    Args:
        features: ``[B, K, h, w]`` feature maps ``A`` in the graph that produced ``score``.
        score: ``[B]`` explained class's logit per sample ``y``.
        size: ``(H, W)`` to upsample the maps to (bilinear); None keeps ``h × w``.
        retain_graph: keep the graph for another call on the same forward pass.

    Returns:
        ``[B, H, W]`` maps in ``[0, 1]`` with maximum 1 (all-zero maps stay zero), detached.

    Raises:
        ValueError: ``score`` is not in an autograd graph.
    """
    if not score.requires_grad:
        raise ValueError("the score is not in an autograd graph: compute the features and the score under "
                         "torch.enable_grad() (and outside torch.inference_mode())")
    with torch.enable_grad():  # the sum joins the caller's graph even when called under torch.no_grad()
        total = score.sum()
    (gradients,) = torch.autograd.grad(total, features, retain_graph=retain_graph)
    activations = _at_least_float32(features.detach())
    weights = _grad_cam_plus_plus_weights(activations, gradients.to(activations.dtype))
    cam = torch.einsum("bk,bkhw->bhw", weights, activations).relu()
    return normalise_maps(upsample(cam, size))


def _target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits[b, target_b]``: ``[B]``."""
    return logits.gather(1, target.to(logits.device).view(-1, 1))[:, 0]


def layer_grad_cam(
    forward_func: Callable[[torch.Tensor], torch.Tensor],
    layer: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    size: Sequence[int] | None = None,
    *,
    relu: bool = True,
    normalise: bool = True,
) -> torch.Tensor:
    """Grad-CAM of ``layer`` (output ``[B, K, h, w]``) for ``forward_func(inputs)[b, target_b]``, by captum's
    ``LayerGradCam``.

    Args:
        forward_func: ``[B, ...] -> [B, C]`` scores.
        layer: a module called once per forward, whose output is the feature map ``A``.
        inputs: the model's input.
        target: ``[B]`` explained class per sample.
        size: ``(H, W)`` to upsample the maps to; None keeps ``h × w``.
        relu: keep the positive part ``relu(Σ_k w_k A_k)`` (before upsampling), as Grad-CAM does.
        normalise: divide each map by its maximum.

    Returns:
        ``[B, H, W]`` maps (float32, or float64 for a float64 layer), detached.
    """
    with torch.enable_grad():
        cam = LayerGradCam(forward_func, layer).attribute(inputs, target=target, relu_attributions=relu)
    if cam.ndim != 4:
        raise ValueError(f"Grad-CAM needs a layer whose output is a feature map [B, K, h, w]; "
                         f"{type(layer).__name__} gives {list(cam.shape)}")
    maps = upsample(_at_least_float32(cam[:, 0].detach()), size)
    return normalise_maps(maps) if normalise else maps


def layer_grad_cam_plus_plus(
    forward_func: Callable[[torch.Tensor], torch.Tensor],
    layer: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Grad-CAM++ (:func:`grad_cam_plus_plus`) of ``layer``'s output for ``forward_func(inputs)[b, target_b]``;
    arguments as in :func:`layer_grad_cam`. Returns ``[B, H, W]`` maps in ``[0, 1]``, detached."""
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: object, output: torch.Tensor) -> None:
        captured.append(output)

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            score = _target_scores(forward_func(inputs), target)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"Grad-CAM++ needs a layer called once per forward; {type(layer).__name__} was called "
                         f"{len(captured)} times")
    if captured[0].ndim != 4:
        raise ValueError(f"Grad-CAM++ needs a layer whose output is a feature map [B, K, h, w]; "
                         f"{type(layer).__name__} gives {list(captured[0].shape)}")
    return grad_cam_plus_plus(captured[0], score, size)


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
