"""Explanations of any xvlm module: rendering (``render``), the PNG gallery callback (``gallery``), ``xvlm explain``."""

from xvlm.explain.gallery import ExplanationGallery
from xvlm.explain.render import denormalise, render_explanation, sample_explanation, save_figure

__all__ = ["ExplanationGallery", "denormalise", "render_explanation", "sample_explanation", "save_figure"]
