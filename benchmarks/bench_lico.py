"""LICO training throughput relative to CLIPFineTune on the same image encoder, and where LICO's time goes.

``python benchmarks/bench_lico.py`` times full training steps (forward, backward, AdamW step) on one batch of
Shapes ``attributes`` images, in one process, for:

- ``CLIPFineTune`` (both towers trained, one prompt per seen class per step),
- ``LICO`` with ``alpha = beta = 0`` (the CE baseline: same encoder and head, no text),
- ``LICO`` with only ``L_MM``, only ``L_OT``, and the full loss (``alpha = 10, beta = 1``),

on the tiny backbone (random weights: throughput does not depend on them) and reports images/s and the ratio to
``CLIPFineTune``. Each figure is the best of ``--repeats`` timings of ``--steps`` steps after a warm-up step.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from timing import best_seconds_in_turn, step_benchmark_batch, training_step  # noqa: E402

from xvlm.methods import LICO, CLIPFineTune  # noqa: E402


def main() -> None:
    args, data, batch = step_benchmark_batch(__doc__.splitlines()[0])
    common = dict(model="xvlm-tiny", pretrained=None)
    variants = {
        "CLIPFineTune": lambda: CLIPFineTune(**common),
        "LICO, CE only (alpha=beta=0)": lambda: LICO(**common, alpha=0.0, beta=0.0),
        "LICO, CE + L_MM": lambda: LICO(**common, beta=0.0),
        "LICO, CE + L_OT": lambda: LICO(**common, alpha=0.0),
        "LICO, full (alpha=10, beta=1)": lambda: LICO(**common),
    }
    print(f"batch {args.batch_size}, 64 px, xvlm-tiny, {args.threads} threads, {len(data.task.seen)} seen classes, "
          f"{len(batch['label'].unique())} classes in the batch")
    print("| variant | s/step | images/s | ratio to CLIPFineTune |")
    print("|---|---:|---:|---:|")
    baseline = None
    for name, build in variants.items():
        module = build()
        module.attach_task(data.task)
        module.train()
        seconds = best_seconds_in_turn({name: training_step(module, batch)}, args.steps, args.repeats)[name]
        baseline = baseline or seconds
        print(f"| {name} | {seconds:.3f} | {args.batch_size / seconds:.0f} | {baseline / seconds:.2f} |")


if __name__ == "__main__":
    main()
