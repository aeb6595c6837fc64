"""Timing shared by the benchmark scripts: best-of-repeats seconds per call, several candidates timed in turn, and
the training step they time."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


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


def training_step(module: torch.nn.Module, batch: dict) -> Callable[[], None]:
    """One AdamW step of ``module`` on ``batch`` with the method's own loss: ``module.loss(batch)`` (CLIPFineTune)
    or ``module.losses(batch)["loss"]`` (LICO, SVIP)."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    loss = module.loss if hasattr(module, "loss") else (lambda b: module.losses(b)["loss"])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(batch).backward()
        optimizer.step()

    return step
