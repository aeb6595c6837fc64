"""MSCI's training step relative to CLIPFineTune, and the cost of open-world scoring as the pair count grows.

``python benchmarks/bench_msci.py`` on one batch of Shapes ``compositions`` images and the tiny backbone (random
weights: speed does not depend on them):

- a full training step (forward, backward, Adam(W) step) of ``CLIPFineTune`` (both towers, one prompt per seen
  pair) and of ``MSCI`` (adapted image tower, three prompt branches through the frozen text tower, two stages);
- open-world scoring of the batch over every ``(state, object)`` pair of made-up vocabularies of 3 sizes
  ``|A| × |O|``: ``MSCI.score`` (text encoded once beforehand, as in an evaluation epoch; cross-attention in chunks
  of ``--chunk`` prompts) plus the CZSL summaries at 50 feasibility thresholds, seconds per batch and the growth
  exponent ``k`` of ``time ∝ P^k`` between the sizes.

Candidates are timed in turn, each figure the best of ``--repeats`` rounds of ``--steps`` calls after a warm-up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from timing import best_seconds_in_turn, step_benchmark_batch, training_step  # noqa: E402

from datamodules.task import Task  # noqa: E402
from xvlm.methods import MSCI, CLIPFineTune  # noqa: E402
from xvlm.metrics import feasible_summaries  # noqa: E402

SIZES = ((16, 12), (64, 64), (128, 256))
"""``|A| × |O|`` of the scoring benchmark: UT-Zappos' 192 pairs, then 4,096 and 32,768 (MIT-States has 28,175)."""
MODEL = dict(model="xvlm-tiny", pretrained=None, input_size=64, low_layers=2, high_layers=2, cal_heads=4)


def vocabulary_task(states: int, objects: int) -> Task:
    """A compositional task over ``states × objects`` made-up primitives, every 4th pair seen."""
    state_names = tuple(f"state{i}" for i in range(states))
    object_names = tuple(f"object{i}" for i in range(objects))
    pairs = tuple((s, o) for s in state_names for o in object_names)
    seen = tuple(range(0, len(pairs), 4))
    every = tuple(range(len(pairs)))
    return Task(source=f"{states}x{objects} vocabulary", class_names=tuple(f"{s} {o}" for s, o in pairs), seen=seen,
                unseen=tuple(sorted(set(every) - set(seen))), states=state_names, objects=object_names, pairs=pairs,
                train_pairs=seen, val_pairs=every, test_pairs=every)


def open_world_scoring(module: MSCI, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """Score ``images`` over every pair and summarise them at 50 thresholds (the open-world evaluation of a batch)."""
    module.evaluation_prompts()
    thresholds = torch.linspace(-1, 1, 50)

    def score() -> None:
        with torch.no_grad():
            scores = module.score(images).combined((1.0, 1.0, 1.0))
            feasible_summaries(scores, labels, module.seen_pairs, module.feasibility, thresholds)

    return score


def main() -> None:
    args, data, batch = step_benchmark_batch(__doc__.splitlines()[0], task="compositions")
    modules = {"CLIPFineTune": CLIPFineTune(model="xvlm-tiny", pretrained=None), "MSCI": MSCI(**MODEL)}
    for module in modules.values():
        module.attach_task(data.task)
    train = best_seconds_in_turn({name: training_step(m.train(), batch) for name, m in modules.items()},
                                 args.steps, args.repeats)
    print(f"batch {args.batch_size}, 64 px, xvlm-tiny (4 blocks, 8x8 patches, joint dimension 128), {args.threads} "
          f"threads, {len(data.task.seen)} seen pairs")
    print("| method | train s/step | ratio to CLIPFineTune |")
    print("|---|---:|---:|")
    for name in modules:
        print(f"| {name} | {train[name]:.3f} | {train[name] / train['CLIPFineTune']:.2f} |")

    images = batch["image"][:8]
    passes, pairs = {}, {}
    for states, objects in SIZES:
        module = MSCI(**MODEL)
        module.attach_task(vocabulary_task(states, objects))
        module.eval()
        name = f"{states}x{objects}"
        pairs[name] = states * objects
        passes[name] = open_world_scoring(module, images, torch.arange(len(images)) * 3)
    seconds = best_seconds_in_turn(passes, 1, args.repeats)
    print(f"\nopen-world scoring of {len(images)} images, pair_chunk {MODEL.get('pair_chunk', 1024)}, 50 thresholds")
    print("| states x objects | pairs | s/batch | ms per 1k pairs | exponent k (from the previous size) |")
    print("|---|---:|---:|---:|---:|")
    previous = None
    for name, count in pairs.items():
        growth = "–" if previous is None else \
            f"{math.log(seconds[name] / seconds[previous]) / math.log(count / pairs[previous]):.2f}"
        print(f"| {name} | {count} | {seconds[name]:.3f} | {1000 * seconds[name] / count * 1000:.1f} | {growth} |")
        previous = name


if __name__ == "__main__":
    main()
