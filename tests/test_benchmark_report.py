"""The benchmark page writer and the scaling fit of ``python -m benchmarks``."""

import math

from benchmarks.lazsl_rates import fitted_exponent
from benchmarks.report import Report


def test_fitted_exponent_recovers_a_power_law():
    sizes = (250, 1000, 4000)
    assert math.isclose(fitted_exponent(sizes, [3e-4 * s**1.5 for s in sizes]), 1.5, rel_tol=1e-9)
    assert math.isclose(fitted_exponent(sizes, [0.2, 0.2, 0.2]), 0.0, abs_tol=1e-12)


def test_a_rerun_replaces_its_own_section_and_keeps_the_rest_of_the_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nHow to read them.\n\n## A study\n\nHand-written.\n")
    for key, value in (("cpu xvlm-tiny", "1.00"), ("cuda ViT-B-16", "2.00"), ("cpu xvlm-tiny", "3.00")):
        report = Report(key)
        report.table("Steps", ["method", "s/step"], [["clip", value]])
        report.write(page)
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nHow to read them.\n\n<!-- benchmark: ")
    assert text.endswith("\n## A study\n\nHand-written.\n")
    assert text.count("<!-- benchmark: cpu xvlm-tiny -->") == 1 and "| clip | 3.00 |" in text
    assert "| clip | 1.00 |" not in text and "| clip | 2.00 |" in text
