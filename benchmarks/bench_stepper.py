"""What the ViT stepper costs against open_clip's own image forward, and what reading attention adds.

``python benchmarks/bench_stepper.py [--device cuda --precision bf16]`` times, in one process and in turn:

1. ``encode_image`` (open_clip's forward, fused attention): the baseline;
2. ``run_blocks(embed_patches(x))`` without attention: the stepper that SVIP and MSCI step through;
3. ``run_blocks(..., attention=True)`` on every block: the same pass returning each block's head-averaged
   attention (computed explicitly, so the fused kernel is not used on those blocks);
4. ``encode_image`` with zero-initialised parallel adapters on every block (``add_block_adapters``, a bottleneck
   of width W/4 on both branches, as MSCI uses them).

Forward passes under ``torch.no_grad()`` (and ``torch.autocast`` with ``--precision bf16``) for ``xvlm-tiny`` at
64 px and ``ViT-B-16`` at 224 px, random weights. Prints seconds per call and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from contextlib import nullcontext

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from timing import best_seconds_in_turn  # noqa: E402
from torch import nn  # noqa: E402

from xvlm.backbones import VisionLanguageModel  # noqa: E402


def zero_bottleneck(width: int) -> nn.Module:
    """``W -> W/4 -> W`` with a zero-initialised output layer (the model's outputs are unchanged at start)."""
    adapter = nn.Sequential(nn.Linear(width, width // 4), nn.GELU(), nn.Linear(width // 4, width))
    nn.init.zeros_(adapter[-1].weight)
    nn.init.zeros_(adapter[-1].bias)
    return adapter


def passes(model: str, side: int, batch: int, device: str) -> dict[str, Callable[[], None]]:
    plain = VisionLanguageModel(model, pretrained=None).to(device).eval()
    adapted = VisionLanguageModel(model, pretrained=None).to(device).eval()
    adapted.add_block_adapters(attn=zero_bottleneck, mlp=zero_bottleneck)
    adapted.to(device)
    images = torch.randn(batch, 3, side, side, device=device)
    return {
        "encode_image": lambda: plain.encode_image(images),
        "run_blocks": lambda: plain.run_blocks(plain.embed_patches(images)),
        "run_blocks + attention": lambda: plain.run_blocks(plain.embed_patches(images), attention=True),
        "encode_image + adapters": lambda: adapted.encode_image(images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = [("xvlm-tiny", 64, 64), ("ViT-B-16", 224, 64 if args.device != "cpu" else 8)]
    print(f"device {args.device}, {args.precision}, forward only, best of {args.repeats} x {args.steps} calls\n")
    print("| model | batch | pass | s/call | ratio to encode_image |")
    print("|---|---:|---|---:|---:|")
    for model, side, batch in cases:
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        autocast = (torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.precision == "bf16"
                    else nullcontext())
        timed = {name: (lambda run=run: (run(), sync()))
                 for name, run in passes(model, side, batch, args.device).items()}
        with torch.no_grad(), autocast:
            seconds = best_seconds_in_turn(timed, args.steps, args.repeats)
        for name, value in seconds.items():
            print(f"| {model} ({side} px) | {batch} | {name} | {value:.4f} | {value / seconds['encode_image']:.2f} |")


if __name__ == "__main__":
    main()
