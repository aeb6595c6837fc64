"""torchmetrics ``Metric``s, one per evaluation protocol."""

from xvlm.metrics.gzsl import GZSLMetrics, gzsl_report, harmonic_mean

__all__ = ["GZSLMetrics", "gzsl_report", "harmonic_mean"]
