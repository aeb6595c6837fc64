"""Explanations of any xvlm module: explainers by name (``explainers``: captum attributions and our own maps),
the Grad-CAM family (``saliency``), rendering (``render``), the PNG gallery callback (``gallery``), their evaluation
during training (``evaluation``), ``xvlm explain``."""

from xvlm.explain.evaluation import SaliencyEvaluation
from xvlm.explain.explainers import (
    EXPLAINERS,
    Explainer,
    attribution_maps,
    check_explainer,
    explain_with,
    explainer_names,
    get_explainer,
    raw_attribution,
)
from xvlm.explain.gallery import ExplanationGallery
from xvlm.explain.render import denormalise, render_explanation, sample_explanation, save_figure
from xvlm.explain.saliency import (
    grad_cam_plus_plus,
    layer_grad_cam,
    layer_grad_cam_plus_plus,
    normalise_maps,
    tokens_to_map,
)

__all__ = [
    "EXPLAINERS",
    "Explainer",
    "ExplanationGallery",
    "SaliencyEvaluation",
    "attribution_maps",
    "check_explainer",
    "denormalise",
    "explain_with",
    "explainer_names",
    "get_explainer",
    "grad_cam_plus_plus",
    "layer_grad_cam",
    "layer_grad_cam_plus_plus",
    "normalise_maps",
    "raw_attribution",
    "render_explanation",
    "sample_explanation",
    "save_figure",
    "tokens_to_map",
]
