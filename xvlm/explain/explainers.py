"""Explainers by name: saliency maps of a module's own decision, for every method.

One entry point, :func:`attribution_maps`, turns images ``x [B, 3, H, W]`` and the explained classes ``c [B]`` into
maps ``[B, H, W]`` that are non-negative, at the image size and divided by their maximum per image (an all-zero map
stays zero); :func:`explain_with` does it for the predicted class of a batch (the ``explain`` contract). The score
explained is the module's own decision ``y_b = f(x)_{b, c_b}`` with ``f = module.classify`` (captum's
``forward_func = module.classify``, ``target = c``). The registry :data:`EXPLAINERS` names them; the names are the
interface of ``explainer:`` options everywhere (methods, :class:`~xvlm.explain.SaliencyEvaluation`,
:class:`~xvlm.explain.ExplanationGallery`, ``xvlm explain --explainer``).

Gradient and perturbation attributions, by captum (``x`` is in normalised input space, so ``0`` is the dataset's
mean colour):

- ``saliency`` (Simonyan et al. 2014): ``S_ij = max_ch |∂y/∂x_ch,ij|``;
- ``input_x_gradient``: ``S_ij = relu(Σ_ch x_ch,ij · ∂y/∂x_ch,ij)``;
- ``integrated_gradients`` (Sundararajan et al. 2017): ``IG_ch,ij = x_ch,ij · (1/m) Σ_k ∂y/∂x_ch,ij(α_k x)``, the
  baseline ``x' = 0`` (the mean colour), ``m = n_steps`` (16) Gauss–Legendre points ``α_k``; then
  ``S = relu(Σ_ch IG_ch)``. Completeness: ``Σ IG = y(x) − y(0)`` as ``m`` grows;
- ``occlusion`` (Zeiler & Fergus 2014): windows of side ``w = max(1, side/8)`` and stride ``max(1, w/2)`` over all
  channels set to 0; ``S_ij = relu(mean over the windows P ∋ (i, j) of y(x) − y(x with P = 0))``;
- ``gradcam`` (Selvaraju et al. 2017; captum ``LayerGradCam``): ``S = up(relu(Σ_k w_k A_k))``, ``w_k = mean_ij
  ∂y/∂A_k,ij`` of a layer ``A [B, K, h, w]`` of the image tower: for an open_clip ViT the patch tokens that *enter*
  block ``block`` (default −1, the last block: the output of the one before), laid out as ``[B, W, h, w]`` (class
  token and register tokens dropped); for a feature-map tower (timm) its output feature map (``block`` must be −1).
  ``up`` is bilinear upsampling (:func:`~xvlm.metrics.saliency.upsample_maps`).

Ours (captum has none):

- ``gradcam++`` (Chattopadhay et al. 2018): the closed form of :mod:`xvlm.explain.saliency` on the same layer as
  ``gradcam``;
- ``attention_rollout`` (Abnar & Zuidema 2020): per block the head-averaged attention ``A_l [B, L, L]``
  (:meth:`~xvlm.backbones.VisionLanguageModel.run_blocks`), ``Â_l = ½ A_l + ½ I``, ``R = Â_L ⋯ Â_1``
  (:func:`xvlm.patches.attention_rollout`, the one SVIP's selector learns from); ``S = R[class, patches]`` on the ``h × w`` grid. Class-agnostic (the target is ignored), no
  gradient; open_clip ViT only;
- ``patch_prompt``: ``S_n = cos(ln_post(x_L,n) P, t_c)`` between each projected last-block patch token and the class
  text feature ``t_c [D]``, min–max normalised;
- ``dense_clip`` (MaskCLIP, Zhou et al. ECCV 2022; ClearCLIP, Lan et al. ECCV 2024): the last block's value path
  only, ``z_n = ls_1(W_o (W_v LN_1(x_{L−1,n}) + b_v) + b_o)`` (no attention mixing, no residual, no MLP), then
  ``S_n = cos(ln_post(z_n) P, t_c)``, min–max normalised. Text-aligned open_clip ViT only.

``patch_prompt`` and ``dense_clip`` read the class text features from ``module.class_text_features(classes)`` when
the module has it (an :class:`~xvlm.methods.base.XVLMModule`: its templates, its current towers), else they encode
``"a photo of a {}."`` with ``module.zero_shot_encoder()``.

Deviations, all deliberate:

1. ``gradcam`` of a ViT uses the tokens entering a block (the residual stream before its ``ln_1``), not a block's
   output: with class-token pooling the last block's output patch tokens do not reach the score at all
   (``∂y/∂x_L,n = 0``), which is why ViT Grad-CAM recipes hook ``blocks[-1].norm1``; we take the stream before that
   LayerNorm, which is the block input captum would see.
2. ``patch_prompt`` and ``dense_clip`` are min–max normalised (cosines may all be negative), the others keep their
   positive part and are divided by their maximum.
3. ``occlusion`` windows cover all three channels at once; its baseline is 0 (the mean colour), as the insertion /
   deletion substrate of :mod:`xvlm.metrics.saliency`.
4. ``dense_clip`` keeps the block's layer scale ``ls_1`` (identity in CLIP) and drops parallel block adapters with
   the residual branch; ClearCLIP's query–query attention is not used (MaskCLIP's value path is attention-free).
5. Register tokens (:data:`xvlm.backbones.REGISTER_TOKENS`) take part in every block but are never explained: the
   patch tokens are the last ``h·w`` tokens of a block's input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients, Occlusion, Saliency
from open_clip.transformer import VisionTransformer
from torch import nn

from xvlm.contracts import ExplainableModule
from xvlm.explain.saliency import (
    layer_grad_cam,
    layer_grad_cam_plus_plus,
    normalise_maps,
    tokens_to_map,
    upsample,
)
from xvlm.patches import attention_rollout

__all__ = [
    "EXPLAINERS",
    "Explainer",
    "GRADIENT",
    "TEXT",
    "VIT",
    "attribution_maps",
    "check_explainer",
    "explain_with",
    "explainer_names",
    "get_explainer",
    "raw_attribution",
]

GRADIENT = "gradient"
"""Needs autograd through ``module.classify`` to the images."""
VIT = "vit"
"""Needs an open_clip ViT image tower (``module.backbone.image_tower``)."""
TEXT = "text"
"""Needs an image tower aligned with the text tower (``module.backbone.text_aligned_images``)."""
PROMPT = "a photo of a {}."
"""Class prompt of modules without ``class_text_features``."""


@dataclass(frozen=True)
class Explainer:
    """One registered explainer.

    Attributes:
        name: its registry name.
        attribute: ``(module, images [B, 3, H, W], target [B], **options) -> raw`` attribution: per pixel
            ``[B, 3, H, W]`` or per cell ``[B, h, w]``, before the reduction (:func:`raw_attribution`).
        reduce: ``raw -> [B, h, w]`` non-negative map (channel reduction, positive part or min–max), before
            upsampling and normalising.
        description: one line.
        needs: what it needs of the module: :data:`GRADIENT`, :data:`VIT`, :data:`TEXT`.
    """

    name: str
    attribute: Callable[..., torch.Tensor]
    reduce: Callable[[torch.Tensor], torch.Tensor]
    description: str
    needs: frozenset[str]


# --------------------------------------------------------------------------------------------- towers
def _tower_name(module: ExplainableModule) -> str:
    backbone = module.backbone
    tower = backbone.image_tower
    return f"image_encoder={getattr(backbone, 'image_encoder', '?')!r} ({type(tower).__name__})"


def _vit(module: ExplainableModule, name: str) -> VisionTransformer:
    """The open_clip ViT image tower, or a ValueError naming the explainer and the module's tower."""
    tower = module.backbone.image_tower
    if not isinstance(tower, VisionTransformer):
        raise ValueError(f"explainer {name!r} needs an open_clip ViT image tower; {type(module).__name__} has "
                         f"{_tower_name(module)}")
    return tower


def check_explainer(name: str, module: Any) -> Explainer:
    """The registry entry ``name`` after checking that ``module`` (anything with a ``backbone``) has what it needs.

    Raises:
        ValueError: unknown name (the choices are listed), or the module's image tower is not an open_clip ViT or
            not text-aligned where the explainer needs it (explainer and tower are named).
    """
    entry = get_explainer(name)
    if VIT in entry.needs:
        _vit(module, name)
    if TEXT in entry.needs and not module.backbone.text_aligned_images:
        raise ValueError(f"explainer {name!r} needs an image tower aligned with the text tower; "
                         f"{type(module).__name__} has {_tower_name(module)}, which is not")
    return entry


def _batch_first(tower: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    return x if getattr(tower.transformer, "batch_first", True) else x.transpose(0, 1)


def _block(tower: VisionTransformer, block: int, name: str) -> nn.Module:
    blocks = tower.transformer.resblocks
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"explainer {name!r}: block={block} is outside the image tower's depth {len(blocks)} "
                         f"(indices -{len(blocks)}..{len(blocks) - 1})")
    return blocks[block]


@contextmanager
def _block_input(tower: VisionTransformer, block: nn.Module,
                 edit: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor | None]) -> Iterator[None]:
    """While open, every call of ``block`` passes its input tokens ``[B, L, W]`` (batch first, class token and any
    registers first, the ``h·w`` patch tokens last) and the patch grid ``(h, w)`` to ``edit``, which may return
    replacement tokens. The grid is read from the tower's patch embedding ``conv1`` in the same forward."""
    grid: list[tuple[int, int]] = []

    def remember_grid(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        grid.append((int(output.shape[-2]), int(output.shape[-1])))

    def on_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not grid:
            raise ValueError("the ViT's patch embedding did not run before its blocks")
        positional = len(args) > 0
        x = args[0] if positional else kwargs["q_x"]
        out = edit(_batch_first(tower, x), grid[-1])
        if out is None:
            return None
        out = _batch_first(tower, out)
        if positional:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "q_x": out}

    handles = [tower.conv1.register_forward_hook(remember_grid),
               block.register_forward_pre_hook(on_input, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _cam_layer(module: ExplainableModule, block: int, name: str) -> Iterator[nn.Module]:
    """The layer Grad-CAM hooks: for a ViT an identity module that the patch tokens entering block ``block`` pass
    through as a map ``[B, W, h, w]`` (installed while open); for another tower, the tower (its output feature map)."""
    tower = module.backbone.image_tower
    if not isinstance(tower, VisionTransformer):
        if block != -1:
            raise ValueError(f"explainer {name!r}: block={block} applies to ViT towers; {type(module).__name__} has "
                             f"{_tower_name(module)}, whose output feature map is used (block=-1)")
        yield tower
        return
    grid_layer = nn.Identity()

    def through_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        count = grid[0] * grid[1]
        maps = grid_layer(tokens_to_map(tokens[:, -count:], grid))
        return torch.cat([tokens[:, :-count], maps.flatten(2).transpose(1, 2)], dim=1)

    with _block_input(tower, _block(tower, block, name), through_grid):
        yield grid_layer


# --------------------------------------------------------------------------------------------- text
def class_text(module: ExplainableModule, classes: torch.Tensor) -> torch.Tensor:
    """Unit-norm text features ``[B, D]`` of ``classes [B]``: ``module.class_text_features(classes)`` when the
    module has it, else ``"a photo of a {}."`` by its zero-shot towers (each distinct class encoded once)."""
    present, position = classes.unique(return_inverse=True)
    indices = present.tolist()
    own = getattr(module, "class_text_features", None)
    with torch.no_grad():
        if callable(own):
            text = own(indices)
        else:
            encoder = module.zero_shot_encoder()
            if encoder is None:
                raise ValueError(f"{type(module).__name__} has neither class_text_features nor a zero-shot encoder")
            names = module.task.class_names
            text = encoder.encode_texts([PROMPT.format(names[c]) for c in indices])
    return F.normalize(text.float(), dim=-1)[position.to(text.device)]


def _cosine_map(features: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``cos(features_n, text)``: ``[B, N, D]`` and ``[B, D]`` -> ``[B, h, w]``."""
    features = F.normalize(features.float(), dim=-1)
    return torch.einsum("bnd,bd->bn", features, text.to(features.device)).view(-1, *grid)


# --------------------------------------------------------------------------------------------- explainers
def _images_for_gradient(images: torch.Tensor) -> torch.Tensor:
    return images.detach().clone().requires_grad_(True)


def _saliency(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|∂y/∂x|`` ``[B, 3, H, W]`` (captum ``Saliency``, ``abs=True``)."""
    return Saliency(module.classify).attribute(_images_for_gradient(images), target=target, abs=True)


def _input_x_gradient(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x ⊙ ∂y/∂x`` ``[B, 3, H, W]`` (captum ``InputXGradient``)."""
    return InputXGradient(module.classify).attribute(_images_for_gradient(images), target=target)


def _integrated_gradients(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor, n_steps: int = 16,
                          internal_batch_size: int | None = None) -> torch.Tensor:
    """Integrated gradients ``[B, 3, H, W]`` from the baseline 0 (captum ``IntegratedGradients``, Gauss–Legendre).

    Args:
        n_steps: points of the path integral.
        internal_batch_size: images per forward pass (default ``max(B, 64)``; captum then takes
            ``max(1, internal_batch_size // B)`` steps per pass).
    """
    if n_steps < 1:
        raise ValueError(f"integrated_gradients needs n_steps >= 1; got {n_steps}")
    return IntegratedGradients(module.classify).attribute(
        _images_for_gradient(images), baselines=0.0, target=target, n_steps=n_steps,
        internal_batch_size=internal_batch_size or max(len(images), 64))


def _occlusion(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor, window: int | None = None,
               stride: int | None = None, perturbations_per_eval: int = 16) -> torch.Tensor:
    """Occlusion ``[B, 3, H, W]`` (captum ``Occlusion``, baseline 0, windows over all channels).

    Args:
        window: window side in pixels (default ``max(1, side // 8)`` per side).
        stride: window step (default ``max(1, window // 2)``).
        perturbations_per_eval: occluded copies per forward pass.
    """
    channels, height, width = images.shape[1:]
    sides = (window, window) if window is not None else (max(1, height // 8), max(1, width // 8))
    steps = (stride, stride) if stride is not None else tuple(max(1, side // 2) for side in sides)
    return Occlusion(module.classify).attribute(
        images.detach(), sliding_window_shapes=(channels, *sides), strides=(channels, *steps), baselines=0.0,
        target=target, perturbations_per_eval=perturbations_per_eval)


def _gradcam(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Grad-CAM ``Σ_k w_k A_k`` ``[B, h, w]`` before its positive part (captum ``LayerGradCam``; module docstring)."""
    with _cam_layer(module, block, "gradcam") as layer:
        return layer_grad_cam(module.classify, layer, _images_for_gradient(images), target, relu=False,
                              normalise=False)


def _gradcam_plus_plus(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor,
                       block: int = -1) -> torch.Tensor:
    """Grad-CAM++ ``[B, h, w]`` (our closed form) on the layer of ``gradcam``."""
    with _cam_layer(module, block, "gradcam++") as layer:
        return layer_grad_cam_plus_plus(module.classify, layer, _images_for_gradient(images), target)


def _attention_rollout(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The class token's rollout over the patches ``[B, h, w]`` (module docstring); ``target`` is not used."""
    _vit(module, "attention_rollout")
    backbone = module.backbone
    out = backbone.run_blocks(backbone.embed_patches(images), attention=True)
    rollout = attention_rollout(torch.stack(out.attention))
    count = out.grid[0] * out.grid[1]
    return rollout[:, 0, 1 : 1 + count].reshape(-1, *out.grid)  # rows and columns: class, patches, registers


def _patch_prompt(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``cos(ln_post(x_L,n) P, t_c)`` ``[B, h, w]``."""
    _vit(module, "patch_prompt")
    backbone = module.backbone
    out = backbone.run_blocks(backbone.embed_patches(images), layers=1)
    patches = backbone.project_tokens(out.tokens[-1][:, 1:])  # tokens: class token, then the patches
    return _cosine_map(patches, class_text(module, target), out.grid)


def _dense_clip(module: ExplainableModule, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``cos(ln_post(ls_1(W_o (W_v LN_1(x_{L−1,n}) + b_v) + b_o)) P, t_c)`` ``[B, h, w]`` (module docstring)."""
    tower = _vit(module, "dense_clip")
    last = tower.transformer.resblocks[-1]
    attn = last.attn
    if not isinstance(attn, nn.MultiheadAttention) or getattr(attn, "in_proj_weight", None) is None:
        raise ValueError(f"explainer 'dense_clip' needs the last block's packed attention weights (in_proj_weight); "
                         f"{type(module).__name__} has {type(attn).__name__}")
    captured: list[tuple[torch.Tensor, tuple[int, int]]] = []

    def keep(tokens: torch.Tensor, grid: tuple[int, int]) -> None:
        captured.append((tokens, grid))

    backbone = module.backbone
    with _block_input(tower, last, keep):
        backbone.run_blocks(backbone.embed_patches(images), layers=1)
    tokens, grid = captured[-1]
    patches = tokens[:, -grid[0] * grid[1]:]
    width = patches.shape[-1]
    bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    values = F.linear(last.ln_1(patches), attn.in_proj_weight[2 * width :], bias)
    dense = last.ls_1(attn.out_proj(values))
    return _cosine_map(backbone.project_tokens(dense), class_text(module, target), grid)


def _channel_max(raw: torch.Tensor) -> torch.Tensor:
    return raw.amax(dim=1)


def _channel_sum_positive(raw: torch.Tensor) -> torch.Tensor:
    return raw.sum(dim=1).relu()


def _channel_mean_positive(raw: torch.Tensor) -> torch.Tensor:
    return raw.mean(dim=1).relu()


def _positive(raw: torch.Tensor) -> torch.Tensor:
    return raw.relu()


def _min_max(raw: torch.Tensor) -> torch.Tensor:
    low = raw.amin(dim=(-2, -1), keepdim=True)
    high = raw.amax(dim=(-2, -1), keepdim=True)
    return (raw - low) / (high - low).clamp_min(1e-8)


def _entries(*entries: Explainer) -> dict[str, Explainer]:
    return {entry.name: entry for entry in entries}


EXPLAINERS: dict[str, Explainer] = _entries(
    Explainer("saliency", _saliency, _channel_max, "max over channels of |∂y/∂x| (captum Saliency)",
              frozenset({GRADIENT})),
    Explainer("input_x_gradient", _input_x_gradient, _channel_sum_positive,
              "positive part of Σ_ch x ⊙ ∂y/∂x (captum InputXGradient)", frozenset({GRADIENT})),
    Explainer("integrated_gradients", _integrated_gradients, _channel_sum_positive,
              "positive part of Σ_ch integrated gradients from the mean colour, 16 steps (captum)",
              frozenset({GRADIENT})),
    Explainer("occlusion", _occlusion, _channel_mean_positive,
              "score drop when windows of 1/8 of the side are set to the mean colour (captum Occlusion)",
              frozenset()),
    Explainer("gradcam", _gradcam, _positive,
              "Grad-CAM of the tokens entering the last ViT block, or of a CNN's feature map (captum LayerGradCam)",
              frozenset({GRADIENT})),
    Explainer("gradcam++", _gradcam_plus_plus, _positive, "Grad-CAM++ closed form on the layer of gradcam",
              frozenset({GRADIENT})),
    Explainer("attention_rollout", _attention_rollout, _positive,
              "class-token attention rollout over the ViT's blocks (class-agnostic)", frozenset({VIT})),
    Explainer("patch_prompt", _patch_prompt, _min_max,
              "cosine of each projected last-block patch token with the class text feature", frozenset({VIT, TEXT})),
    Explainer("dense_clip", _dense_clip, _min_max,
              "MaskCLIP/ClearCLIP dense map: last block's value path only, cosine with the class text feature",
              frozenset({VIT, TEXT})),
)
"""Every explainer by name, in a fixed order."""


def explainer_names() -> list[str]:
    """The registered explainer names (:data:`EXPLAINERS`), in registry order."""
    return list(EXPLAINERS)


def get_explainer(name: str) -> Explainer:
    """The registry entry ``name``; a ValueError listing the choices for an unknown one."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explainer {name!r}; choose one of {', '.join(EXPLAINERS)}")
    return EXPLAINERS[name]


# --------------------------------------------------------------------------------------------- entry points
@contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Run the block with ``module`` in eval mode; restore every submodule's mode after."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def raw_attribution(
    module: ExplainableModule, images: torch.Tensor, target: torch.Tensor, explainer: str, **options: Any
) -> torch.Tensor:
    """The explainer's attribution before reduction, upsampling and normalisation (for tests and analyses).

    Per pixel ``[B, 3, H, W]`` for the captum pixel attributions (captum's own output: signed for
    ``input_x_gradient``, ``integrated_gradients`` and ``occlusion``), per cell ``[B, h, w]`` for the others
    (``gradcam`` before its ReLU, the cosines of ``patch_prompt``/``dense_clip``). Same conditions as
    :func:`attribution_maps`.
    """
    entry = check_explainer(explainer, module)
    if images.ndim != 4:
        raise ValueError(f"explainers take images [B, 3, H, W]; got {list(images.shape)}")
    with torch.inference_mode(False), _eval_mode(module):
        images = images.detach().clone()
        target = torch.as_tensor(target, device=images.device).detach().clone().long().view(-1)
        if len(target) != len(images):
            raise ValueError(f"{len(images)} images but {len(target)} targets")
        with torch.enable_grad() if GRADIENT in entry.needs else torch.no_grad():
            raw = entry.attribute(module, images, target, **options)
    return raw.detach()


def attribution_maps(
    module: ExplainableModule, images: torch.Tensor, target: torch.Tensor, explainer: str, **options: Any
) -> torch.Tensor:
    """Saliency maps ``[B, H, W]`` of ``module.classify(images)[b, target_b]`` by the named explainer.

    Non-negative float32 maps at the image size, each divided by its maximum (an all-zero map stays zero). Runs in
    eval mode (every submodule's mode restored after) outside inference mode, with gradients enabled where the
    explainer needs them, so it may be called under ``torch.no_grad()``; parameters' ``.grad`` are not touched.

    Args:
        module: anything with the :class:`~xvlm.contracts.ExplainableModule` members.
        images: ``[B, 3, H, W]`` normalised images.
        target: ``[B]`` explained class per image (indices into ``classify``'s output).
        explainer: a name of :data:`EXPLAINERS`.
        options: the explainer's own options (``n_steps``, ``window``, ``block``, ...; see each function).

    Raises:
        ValueError: unknown explainer (choices listed), or one the module's image tower cannot serve.
    """
    entry = get_explainer(explainer)
    raw = raw_attribution(module, images, target, explainer, **options)
    maps = entry.reduce(raw.float())
    return normalise_maps(upsample(maps, images.shape[-2:]))


def explain_with(module: ExplainableModule, batch: dict[str, Any], explainer: str, **options: Any
                 ) -> dict[str, torch.Tensor]:
    """The ``explain`` contract by a named explainer: ``saliency [B, H, W]`` (:func:`attribution_maps`) of the
    predicted class ``predicted [B]`` = argmax of ``logits [B, C]`` = ``module.classify(batch["image"])``."""
    images = batch["image"]
    check_explainer(explainer, module)
    with torch.inference_mode(False), _eval_mode(module), torch.no_grad():
        logits = module.classify(images)
    predicted = logits.argmax(dim=1)
    saliency = attribution_maps(module, images, predicted, explainer, **options)
    return {"saliency": saliency, "predicted": predicted, "logits": logits.detach()}
