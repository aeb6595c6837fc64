"""SVIP training and inference speed relative to CLIPFineTune on the same image tower, in one process.

``python benchmarks/bench_svip.py`` times, on one batch of Shapes ``attributes`` images and the tiny backbone
(random weights: speed does not depend on them):

- a full training step (forward, backward, Adam(W) step) of ``CLIPFineTune`` (both towers, one prompt per seen
  class) and of ``SVIP`` (two transformer passes, the first with every block's attention for the rollout teacher);
- an inference forward without gradients: ``CLIPFineTune.classify`` (image tower + cached class text) and
  ``SVIP.classify`` (selector, one contextualised pass, P2A).

The candidates are timed in turn (alternating rounds), each figure the best of ``--repeats`` rounds of ``--steps``
calls after a warm-up call.
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from timing import best_seconds_in_turn, step_benchmark_batch, training_step  # noqa: E402

from xvlm.methods import SVIP, CLIPFineTune  # noqa: E402


def inference(module, images: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            module.classify(images)

    return forward


def main() -> None:
    args, data, batch = step_benchmark_batch(__doc__.splitlines()[0])
    modules = {"CLIPFineTune": CLIPFineTune(model="xvlm-tiny", pretrained=None),
               "SVIP": SVIP(model="xvlm-tiny", pretrained=None, keep=0.75)}
    for module in modules.values():
        module.attach_task(data.task)
    train = best_seconds_in_turn({name: training_step(m.train(), batch) for name, m in modules.items()},
                                 args.steps, args.repeats)
    infer = best_seconds_in_turn({name: inference(m.eval(), batch["image"]) for name, m in modules.items()},
                                 args.steps, args.repeats)
    print(f"batch {args.batch_size}, 64 px, xvlm-tiny (8x8 patches, 16 super-patches, 12 kept), {args.threads} "
          f"threads, {len(data.task.seen)} seen classes")
    print("| method | train s/step | train ratio to CLIPFineTune | inference s/batch | inference ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in modules:
        print(f"| {name} | {train[name]:.3f} | {train['CLIPFineTune'] / train[name]:.2f} | {infer[name]:.4f} | "
              f"{infer['CLIPFineTune'] / infer[name]:.2f} |")


if __name__ == "__main__":
    main()
