"""Timing shared by the benchmark scripts: best-of-repeats seconds per call, several candidates timed in turn."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds_in_turn(passes: dict[str, Callable[[], None]], steps: int, repeats: int) -> dict[str, float]:
    """Best seconds per call of each of ``passes`` over ``repeats`` rounds of ``steps`` calls.

    Every candidate is called once to warm up; within each round the candidates are timed one after the other,
    so a slow spell of the machine hits all of them rather than one.
    """
    for run in passes.values():
        run()
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best
