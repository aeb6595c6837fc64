"""Cost of the tiny-backbone build (``pretrained: shapes``) and what each of its speed-ups buys.

``python benchmarks/bench_build.py`` times build steps of ``xvlm-tiny`` in one process: draw a batch of Shapes
``attributes`` images from the loader (as the build does, in the main process), then the ``CLIPFineTune``
forward, backward and AdamW step. Variants, each a change on top of the previous one:

1. the earlier recipe: 400 steps of 128 images, conv stem in contiguous (NCHW) memory format, training
   augmentation on, every seen class's caption encoded each step;
2. the channels-last conv stem;
3. augmentation off (every training image is a fresh draw of the world);
4. 800 steps of 64 images (the same images, twice the updates), still every seen caption per step;
5. only the captions of the classes in the batch (``negatives='batch'``): the shipped recipe.

Each step time is the best of ``--repeats`` timings of ``--steps`` steps after a warm-up step, the variants
timed in turn within each repeat (so a slow spell of the machine hits all of them, not one); "build s" is
steps × s/step (the training part of the build), and the ratio is the earlier recipe's over the variant's.
A second table times the conv stem alone (forward and backward of one batch) in both memory formats.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from timing import best_seconds_in_turn  # noqa: E402
from torch import nn  # noqa: E402

from datamodules.shapes import ShapesDataModule  # noqa: E402
from xvlm.methods import CLIPFineTune  # noqa: E402
from xvlm.shapes_pretraining import CAPTION_TEMPLATES, RECIPES  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    augment: bool
    batch_size: int
    steps: int
    negatives: str


SHIPPED = RECIPES["xvlm-tiny"]

VARIANTS = (
    Variant("earlier recipe", False, True, 128, 400, "seen"),
    Variant("+ channels-last stem", True, True, 128, 400, "seen"),
    Variant("+ no augmentation", True, False, 128, 400, "seen"),
    Variant("+ 800 steps of 64", True, False, 64, 800, "seen"),
    Variant("+ negatives='batch' (the shipped recipe)", True, SHIPPED.augment, SHIPPED.batch_size, SHIPPED.steps,
            SHIPPED.negatives),
)


def in_layout(stem: nn.Sequential, channels_last: bool) -> nn.Sequential:
    """``stem`` as built (channels-last), or the same layers as a plain NCHW stack (the earlier stem)."""
    return stem if channels_last else nn.Sequential(*stem).to(memory_format=torch.contiguous_format)


def build_step(variant: Variant, steps: int, repeats: int) -> Callable[[], None]:
    """One build step (next batch of a loader, loss, backward, AdamW) of ``xvlm-tiny`` set up as ``variant``."""
    torch.manual_seed(0)
    data = ShapesDataModule(task="attributes", image_size=SHIPPED.image_size, batch_size=variant.batch_size,
                            train_size=variant.batch_size * (steps * repeats + 1), augment=variant.augment)
    data.setup("fit")
    module = CLIPFineTune(model="xvlm-tiny", pretrained=None, input_size=SHIPPED.image_size,
                          templates=CAPTION_TEMPLATES, negatives=variant.negatives)
    module.attach_task(data.task)
    module.train()
    visual = module.backbone.clip.visual
    visual.conv1 = in_layout(visual.conv1, variant.channels_last)
    optimizer = torch.optim.AdamW(module.parameters(), lr=SHIPPED.lr, weight_decay=SHIPPED.weight_decay)
    batches = iter(data.train_dataloader())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.loss(next(batches)).backward()
        optimizer.step()

    return step


def stem_pass(channels_last: bool, batch_size: int) -> Callable[[], None]:
    """Forward and backward of ``xvlm-tiny``'s conv stem on one batch, in the given memory format."""
    torch.manual_seed(0)
    built = CLIPFineTune(model="xvlm-tiny", pretrained=None, input_size=SHIPPED.image_size)
    stem = in_layout(built.backbone.clip.visual.conv1, channels_last)
    images = torch.randn(batch_size, 3, SHIPPED.image_size, SHIPPED.image_size)
    return lambda: stem(images).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"xvlm-tiny build steps at {SHIPPED.image_size} px, {args.threads} threads")
    print("| variant | batch | steps | s/step | images/s | build s | ratio to the earlier recipe |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    step = best_seconds_in_turn({v.name: build_step(v, args.steps, args.repeats) for v in VARIANTS}, args.steps,
                                args.repeats)
    baseline = step[VARIANTS[0].name] * VARIANTS[0].steps
    for variant in VARIANTS:
        seconds = step[variant.name]
        build = seconds * variant.steps
        print(f"| {variant.name} | {variant.batch_size} | {variant.steps} | {seconds:.3f} | "
              f"{variant.batch_size / seconds:.0f} | {build:.0f} | {baseline / build:.2f} |")
    print("\n| conv stem alone, batch 128 | s/pass | ratio to NCHW |")
    print("|---|---:|---:|")
    stem = best_seconds_in_turn({layout: stem_pass(layout == "channels-last", 128)
                                 for layout in ("NCHW", "channels-last")}, args.steps, args.repeats)
    for layout, seconds in stem.items():
        print(f"| {layout} | {seconds:.3f} | {stem['NCHW'] / seconds:.2f} |")


if __name__ == "__main__":
    main()
