"""Cost of one step of the tiny-backbone build (``pretrained: shapes``), and what each of its speed-ups buys.

``python benchmarks/bench_build.py`` times build steps of ``xvlm-tiny`` in one process: draw a batch of Shapes
``attributes`` images from the loader (as the build does, in the main process), then the ``CLIPFineTune``
forward, backward and AdamW step. Variants:

- the earlier build: conv stem in contiguous (NCHW) memory format, training augmentation on;
- the channels-last conv stem alone, augmentation alone switched off, and both (the shipped recipe).

Each figure is the best of ``--repeats`` timings of ``--steps`` steps after a warm-up step; the ratio is the
earlier build's time over the variant's, so above 1 is faster.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from bench_lico import best_seconds  # noqa: E402
from torch import nn  # noqa: E402

from datamodules.shapes import ShapesDataModule  # noqa: E402
from xvlm.methods import CLIPFineTune  # noqa: E402
from xvlm.shapes_pretraining import CAPTION_TEMPLATES, RECIPES  # noqa: E402


def build_step(channels_last: bool, augment: bool, steps: int, repeats: int) -> Callable[[], None]:
    """One build step (batch drawn from a fresh loader, loss, backward, AdamW) of the recipe of ``xvlm-tiny``."""
    recipe = RECIPES["xvlm-tiny"]
    torch.manual_seed(0)
    data = ShapesDataModule(task="attributes", image_size=recipe.image_size, batch_size=recipe.batch_size,
                            train_size=recipe.batch_size * (steps * repeats + 1), augment=augment)
    data.setup("fit")
    module = CLIPFineTune(model="xvlm-tiny", pretrained=None, input_size=recipe.image_size,
                          templates=CAPTION_TEMPLATES)
    module.attach_task(data.task)
    module.train()
    visual = module.backbone.clip.visual
    if not channels_last:
        visual.conv1 = nn.Sequential(*visual.conv1).to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.AdamW(module.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    batches = iter(data.train_dataloader())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.loss(next(batches)).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = RECIPES["xvlm-tiny"]
    print(f"xvlm-tiny build step: batch {recipe.batch_size}, {recipe.image_size} px, {args.threads} threads")
    print("| conv stem | augmentation | s/step | ratio to the earlier build |")
    print("|---|---|---:|---:|")
    baseline = None
    for channels_last, augment in [(False, True), (True, True), (False, False), (True, False)]:
        seconds = best_seconds(build_step(channels_last, augment, args.steps, args.repeats), args.steps,
                               args.repeats)
        baseline = baseline or seconds
        layout = "channels-last" if channels_last else "NCHW"
        print(f"| {layout} | {'on' if augment else 'off'} | {seconds:.3f} | {baseline / seconds:.2f} |")


if __name__ == "__main__":
    main()
