"""``python -m benchmarks [--device cpu|cuda] [--model xvlm-tiny|ViT-B-16]``: the speed and memory benchmark.

Prints every table and writes them into ``docs/benchmarks.md`` (``--out``), between markers of the device and
model, so that CPU and GPU results stand side by side and a rerun replaces its own section only. What each table
measures is in the docstrings of :mod:`benchmarks.steps`, :mod:`benchmarks.rates` and
:mod:`benchmarks.lazsl_rates`. Random weights throughout (speed does not depend on them), nothing downloaded.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from benchmarks import lazsl_rates, rates, steps  # noqa: E402
from benchmarks.report import Report  # noqa: E402

DOCS = Path(__file__).parents[1] / "docs" / "benchmarks.md"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="xvlm-tiny", help="open_clip model: xvlm-tiny or ViT-B-16 (or another)")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: 32-true on a CPU, "
                                                          "bf16-mixed on a GPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    parser.add_argument("--out", type=Path, default=DOCS, help="markdown file to write the section into")
    return parser.parse_args()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def main() -> None:
    args = parse()
    precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    setting = steps.Setting(args.device, args.model, precision, args.steps, args.rounds)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    started = time.perf_counter()
    report = Report(f"{args.device} {args.model}")
    report.line(f"{device_name(args.device)}; torch {torch.__version__}; `{args.model}` (random weights); precision "
                f"{precision}; Shapes configs' batch (64). Command: `python -m benchmarks --device {args.device} "
                f"--model {args.model}`.")

    rows = steps.method_steps(setting)
    report.table("Training step: Lightning's Trainer against a hand-written loop (same model, data, optimiser)",
                 ["method", "batch", "hand-written s/step", "Trainer s/step", "ratio (target ≥ 0.95)"],
                 [[r.method, r.batch, f"{r.plain:.4f}", f"{r.trainer:.4f}", f"{r.ratio:.2f}"] for r in rows])
    clip = steps.clip_against_open_clip(setting)
    base = clip["open_clip loop"]
    report.table("CLIPFineTune against a plain open_clip loop (`symmetric=False`, one template)",
                 ["loop", "s/step", "speed relative to the open_clip loop"],
                 [[name, f"{seconds:.4f}", f"{base / seconds:.2f}"] for name, seconds in clip.items()])

    flops, achieved = rates.image_tower_rate(setting)
    peak = rates.matmul_rate(setting)
    report.table("Image tower forward + backward against the device's matmul rate",
                 ["GFLOP per step (batch 64)", "achieved GFLOP/s", "large torch.mm GFLOP/s", "fraction"],
                 [[f"{flops / 1e9:.1f}", f"{achieved / 1e9:.1f}", f"{peak / 1e9:.1f}", f"{achieved / peak:.2f}"]])
    if args.device == "cuda":
        busy = steps.gpu_busy_share("clip", setting)
        report.table("GPU busy share of a CLIPFineTune step (`compile: true`)", ["kernel time / wall (target ≥ 0.9)"],
                     [[f"{busy:.2f}"]])

    lazsl = lazsl_rates.evaluation_step(setting)
    report.table(f"LaZSL evaluation ({lazsl['images']} images, {lazsl['crops']} crops, {lazsl['classes']} classes × "
                 f"{lazsl['descriptors']} descriptors) against the DCLIP global-view pass",
                 ["LaZSL images/s", "DCLIP images/s", "cost relative to DCLIP (paper: about 4.7)", "OT share"],
                 [[f"{lazsl['lazsl_images_per_s']:.1f}", f"{lazsl['dclip_images_per_s']:.1f}",
                   f"{lazsl['cost_ratio']:.1f}", f"{100 * lazsl['ot_share']:.1f} %"]])
    dim = steps.method_and_data("clip", setting)[0].backbone.embed_dim
    grown = lazsl_rates.scaling(setting, dim)
    report.table(f"LaZSL transport cost as one size grows (others at {lazsl_rates.BASE}, D = {dim})",
                 ["varied", "sizes", "seconds", "exponent k (time ∝ size^k)"],
                 [[name, " / ".join(map(str, sizes)), " / ".join(f"{t:.3f}" for t in seconds), f"{k:.2f}"]
                  for name, (sizes, seconds, k) in grown.items()])
    bounded = lazsl_rates.bounded_memory(setting, dim)
    report.table(f"LaZSL transport at ImageNet-21k's {lazsl_rates.IMAGENET_21K} classes (B = 8, N = 16, M = 6)",
                 ["memory_budget_mb", "seconds", "peak memory above the start (MB)"],
                 [[f"{r['budget_mb']:.0f}", f"{r['seconds']:.2f}", f"{r['peak_mb']:.0f}"] for r in bounded])

    step_rate = rows[0].batch / rows[0].trainer
    loaders = rates.data_rates(setting)
    report.table(f"Data pipeline against the CLIPFineTune training step ({step_rate:.0f} images/s in the Trainer)",
                 ["datamodule", "images/s", "ratio to the step (target ≥ 3)"],
                 [[name, f"{rate:.0f}", f"{rate / step_rate:.1f}"] for name, rate in loaders.items()])

    memory = [(method, *rates.peak_step_memory(method, setting)) for method in steps.METHODS]
    what = "CUDA allocated" if args.device == "cuda" else "resident (RSS)"
    report.table(f"Peak memory of two training steps at the config's batch ({what})",
                 ["method", "before the steps (MB)", "peak (MB)"],
                 [[m, f"{before / 2**20:.0f}", f"{peak / 2**20:.0f}"] for m, before, peak in memory])

    slowest = max(rows, key=lambda r: r.trainer).method
    report.code(f"Profile of the slowest step ({slowest}, three hand-written steps)",
                steps.step_profile(slowest, setting))
    report.line(f"The whole benchmark took {time.perf_counter() - started:.0f} s.")
    report.write(args.out)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
