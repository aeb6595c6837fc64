"""Benchmarks: scripts run as ``python benchmarks/<name>.py``, and ``python -m benchmarks.explanations``."""
