"""torchmetrics ``Metric``s, one per evaluation protocol."""

from xvlm.metrics.czsl import CZSLMetrics, czsl_report, czsl_summary, feasible_summaries, report_from_summary
from xvlm.metrics.gzsl import GZSLMetrics, choose_calibration, gzsl_report, harmonic_mean
from xvlm.metrics.saliency import (
    SaliencyMetrics,
    auc,
    insertion_deletion,
    mass_in_mask,
    pointing_game,
    saliency_scores,
    uniform_mass_in_mask,
)

__all__ = [
    "CZSLMetrics",
    "GZSLMetrics",
    "SaliencyMetrics",
    "auc",
    "choose_calibration",
    "czsl_report",
    "czsl_summary",
    "feasible_summaries",
    "gzsl_report",
    "harmonic_mean",
    "insertion_deletion",
    "mass_in_mask",
    "pointing_game",
    "report_from_summary",
    "saliency_scores",
    "uniform_mass_in_mask",
]
