"""The seed loop and the Markdown tables of the method comparisons (``compare_svip.py``, ``compare_msci.py``)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence


def mean_std(values: list[float]) -> str:
    """``"mean ± std"`` over seeds (``–`` without values)."""
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def over_seeds(methods: dict[str, Callable[[int], dict[str, float]]],
               seeds: Sequence[int]) -> dict[str, list[dict[str, float]]]:
    """Each method's row of metrics for every seed (``methods[name](seed)``), printed as it comes."""
    results: dict[str, list[dict[str, float]]] = {}
    for name, run in methods.items():
        for seed in seeds:
            start = time.perf_counter()
            row = run(seed)
            results.setdefault(name, []).append(row)
            print(f"{name} seed {seed} ({time.perf_counter() - start:.0f} s): {row}", flush=True)
    return results


def print_comparison(results: dict[str, list[dict[str, float]]], seeds: Sequence[int], columns: Sequence[str],
                     setting: str) -> None:
    """The command line with ``setting``, a table of mean ± std over seeds and one of every seed (``–``: a column
    a method does not report)."""
    print(f"\nCommand: python {' '.join(sys.argv)}   ({setting})\n")
    print("| method | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, rows in results.items():
        print(f"| {name} | " + " | ".join(mean_std([r[c] for r in rows if c in r]) for c in columns) + " |")
    print("\nPer seed:\n")
    print("| method | seed | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for name, rows in results.items():
        for seed, row in zip(seeds, rows):
            print(f"| {name} | {seed} | " + " | ".join(f"{row[c]:.3f}" if c in row else "–" for c in columns) + " |")
