"""torchmetrics ``Metric``s, one per evaluation protocol."""

from xvlm.metrics.czsl import CZSLMetrics, czsl_report, czsl_summary, feasible_summaries, report_from_summary
from xvlm.metrics.gzsl import GZSLMetrics, choose_calibration, gzsl_report, harmonic_mean
from xvlm.metrics.rationale import (
    DoublyRightMetrics,
    compat_verdicts,
    doubly_right,
    doubly_right_compat,
    doubly_right_from_topk,
    pair_sentence,
    ranked_sentences,
    top_pairs,
    verdict_fractions,
)
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
    "DoublyRightMetrics",
    "GZSLMetrics",
    "SaliencyMetrics",
    "auc",
    "choose_calibration",
    "compat_verdicts",
    "czsl_report",
    "czsl_summary",
    "doubly_right",
    "doubly_right_compat",
    "doubly_right_from_topk",
    "feasible_summaries",
    "gzsl_report",
    "harmonic_mean",
    "insertion_deletion",
    "mass_in_mask",
    "pair_sentence",
    "pointing_game",
    "ranked_sentences",
    "report_from_summary",
    "saliency_scores",
    "top_pairs",
    "uniform_mass_in_mask",
    "verdict_fractions",
]
