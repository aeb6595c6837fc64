"""Timing shared by the benchmark scripts: best-of-repeats seconds per call, several candidates timed in turn, the
training step they time and the Shapes batch they time it on."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from datamodules.shapes import ShapesDataModule


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
    or ``module.losses(batch)["loss"]`` (LICO, SVIP, MSCI)."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    loss = module.loss if hasattr(module, "loss") else (lambda b: module.losses(b)["loss"])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(batch).backward()
        optimizer.step()

    return step


def step_benchmark_batch(description: str, task: str = "attributes") -> tuple[argparse.Namespace, ShapesDataModule,
                                                                             dict]:
    """Parse ``--batch-size``, ``--steps``, ``--repeats``, ``--threads``; set the threads and seed 0; return the
    arguments, the Shapes datamodule of ``task`` at 64 px and one training batch of it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = ShapesDataModule(task=task, image_size=64, batch_size=args.batch_size, train_size=args.batch_size)
    data.setup("fit")
    return args, data, next(iter(data.train_dataloader()))
