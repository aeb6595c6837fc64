"""ECOR's training step relative to CLIPFineTune, and its exact top-k pair search against brute force.

``python benchmarks/bench_ecor.py`` (tiny backbone, random weights: speed does not depend on them):

- a full training step (forward, backward, SGD/AdamW step) on one batch of Shapes ``objects`` images at 64 px:
  ``CLIPFineTune`` (both towers, one prompt per class) and ``ECOR`` with each factorisation (3 visual prompt
  tokens; the frozen text features cached beforehand, as after the first step of a run);
- the top-5 pairs of 32 images over vocabularies of DROR's sizes (CIFAR-10 10 × 56, CIFAR-100 100 × 461, SUN
  397 × 1,700 categories × rationales; made-up unit features with a trained model's structure, D = 128, CLIP's
  temperature 100: :func:`made_up_vocabulary`): :meth:`ECOR.top_pairs` (the pruned search, rationale-first)
  against brute force (the whole ``[B, C, R]`` joint, then ``topk``), with the share of rationales the search
  visited and whether both found the same pairs.

Candidates are timed in turn, each figure the best of ``--repeats`` rounds of ``--steps`` calls after a warm-up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import best_seconds_in_turn, step_benchmark_batch, training_step  # noqa: E402

from xvlm.methods import ECOR, CLIPFineTune  # noqa: E402
from xvlm.methods.ecor import FACTORIZATIONS, TextFeatures  # noqa: E402

VOCABULARIES = {"CIFAR-10": (10, 56), "CIFAR-100": (100, 461), "SUN": (397, 1700)}


def made_up_vocabulary(categories: int, rationales: int, images: int, width: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, TextFeatures]:
    """Image features ``[B, D]`` and float16 text features (as the cache holds them) of a made-up vocabulary with
    the structure of a trained model's: each image lies near one pair's prompt, a rationale's prompt near the mean
    of its pairs', a category's near the mean of its pairs'."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, width, generator=generator)

    pairs = unit(noise(categories, rationales))
    text = TextFeatures(unit(pairs.mean(dim=0) + 0.1 * noise(rationales)).half(),
                        unit(pairs.mean(dim=1) + 0.1 * noise(categories)).half(), pairs.half())
    truth = torch.randint(categories * rationales, (images,), generator=generator)
    return unit(pairs.flatten(0, 1)[truth] + 0.05 * noise(images)), text


def search(model: ECOR, f: torch.Tensor, text: TextFeatures, brute: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            if brute:
                model.joint(f, text).flatten(1).topk(5, dim=1)
            else:
                model.top_pairs(f, text, k=5)

    return run


def main() -> None:
    args, data, batch = step_benchmark_batch(__doc__.splitlines()[0], task="objects")
    modules = {"CLIPFineTune": CLIPFineTune(model="xvlm-tiny", pretrained=None)}
    modules |= {f"ECOR {f}": ECOR(model="xvlm-tiny", pretrained=None, factorization=f) for f in FACTORIZATIONS}
    for module in modules.values():
        module.attach_task(data.task)
        if isinstance(module, ECOR):
            module.text_features()
    train = best_seconds_in_turn({name: training_step(m.train(), batch) for name, m in modules.items()},
                                 args.steps, args.repeats)
    print(f"batch {args.batch_size}, 64 px, xvlm-tiny, {args.threads} threads, {data.task.num_classes} categories x "
          f"{len(data.task.rationale_vocab)} rationales")
    print("| method | train s/step | ratio to CLIPFineTune |")
    print("|---|---:|---:|")
    for name in modules:
        print(f"| {name} | {train[name]:.3f} | {train[name] / train['CLIPFineTune']:.2f} |")

    model = modules["ECOR rationale_first"].eval()
    with torch.no_grad():
        model.backbone.logit_scale.fill_(math.log(100.0))  # a trained CLIP's temperature
    generator = torch.Generator().manual_seed(0)
    print("\n| vocabulary | categories x rationales | pairs | pruned s | brute force s | speed-up | rationales "
          "visited | same pairs |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, (categories, rationales) in VOCABULARIES.items():
        f, text = made_up_vocabulary(categories, rationales, 32, 128, generator)
        model.categories = tuple(f"c{i}" for i in range(categories))
        model.rationale_names = tuple(f"r{i}" for i in range(rationales))
        seconds = best_seconds_in_turn({"pruned": search(model, f, text, False),
                                        "brute": search(model, f, text, True)}, 1, args.repeats)
        with torch.no_grad():
            top = model.top_pairs(f, text, k=5)
            brute = model.joint(f, text).flatten(1).topk(5, dim=1).indices
        same = torch.equal(top.category * rationales + top.rationale, brute)
        print(f"| {name} | {categories} x {rationales} | {categories * rationales:,} | {seconds['pruned']:.3f} | "
              f"{seconds['brute']:.3f} | {seconds['brute'] / seconds['pruned']:.1f}x | "
              f"{top.visited / top.outer_size:.1%} | {same} |")


if __name__ == "__main__":
    main()
