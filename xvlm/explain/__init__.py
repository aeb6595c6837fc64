"""Explanations of any xvlm module: rendering (``render``), the PNG gallery callback (``gallery``), Grad-CAM maps
(``saliency``), their evaluation during training (``evaluation``), ``xvlm explain``."""

from xvlm.explain.evaluation import SaliencyEvaluation
from xvlm.explain.gallery import ExplanationGallery
from xvlm.explain.render import denormalise, render_explanation, sample_explanation, save_figure
from xvlm.explain.saliency import grad_cam, grad_cam_plus_plus, tokens_to_map

__all__ = [
    "ExplanationGallery",
    "SaliencyEvaluation",
    "denormalise",
    "grad_cam",
    "grad_cam_plus_plus",
    "render_explanation",
    "sample_explanation",
    "save_figure",
    "tokens_to_map",
]
