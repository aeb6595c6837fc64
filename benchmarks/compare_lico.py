"""The honest LICO comparison: CLIPFineTune, the CE baseline and LICO on Shapes ``attributes``, 3 seeds each.

``python benchmarks/compare_lico.py`` (about 30 min on 2 CPU cores; ``--seeds``, ``--epochs`` to change) trains
each method from the tiny Shapes backbone with the same budget (epochs, batch and samples of
``configs/lico/shapes.yaml``; each method's optimiser settings from its own Shapes config), then evaluates the
final weights once on the validation split (no model selection happens, so it is a held-out set here) with the
same callbacks for every method:

- ``seen_top1``: per-class top-1 among the 192 seen classes (the classifier for CE/LICO, zero-shot prompts for
  CLIPFineTune);
- ``lazsl_unseen``: LaZSL top-1 on the 64 unseen classes through the method's (fine-tuned) towers;
- ``ins``/``del``/``overall``: insertion/deletion AUCs of the maps of the method's predicted class, and
  ``ins − del``;
- ``mass``, ``pointing``: saliency share inside the object mask and the pointing game;

the last four once per explainer: the method's default (``explain()``, integrated gradients) and its former default
(:data:`FORMER_DEFAULTS`: Grad-CAM for CE/LICO, the patch–prompt map for CLIPFineTune), on the same weights.

It prints a Markdown table of mean ± std over seeds, the per-seed rows, and the command line; paste them into
``docs/results.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import yaml  # noqa: E402

from datamodules.shapes import ShapesDataModule  # noqa: E402
from xvlm.explain import SaliencyEvaluation  # noqa: E402
from xvlm.methods import LICO, CLIPFineTune  # noqa: E402
from xvlm.zeroshot import LaZSL  # noqa: E402

LICO_CONFIG = "configs/lico/shapes.yaml"
FORMER_DEFAULTS = {"CLIPFineTune": "patch_prompt", "LICO": "gradcam"}
"""What each method's ``explain()`` drew before the explainers became configurable (captum-backed): the last
block's patch–prompt cosine for CLIP fine-tuning, Grad-CAM for LICO (and so for the CE baseline)."""
CLIP_CONFIG = "configs/clip/shapes.yaml"
COLUMNS = {
    "seen_top1": "val/seen_top1",
    "lazsl_unseen": "lazsl/unseen_top1",
    "ins": "saliency/insertion",
    "del": "saliency/deletion",
    "overall": "saliency/overall",
    "mass": "saliency/mass_in_mask",
    "pointing": "saliency/pointing",
}


def methods(lico_args: dict, clip_args: dict) -> dict:
    """Constructors of the compared modules, each with the settings of its shipped Shapes config."""
    return {
        "CLIPFineTune": lambda: CLIPFineTune(**clip_args),
        "CE (LICO, alpha=beta=0)": lambda: LICO(**{**lico_args, "alpha": 0.0, "beta": 0.0}),
        "LICO (alpha=10, beta=1)": lambda: LICO(**lico_args),
    }


def fit(
    build: Callable[[], L.LightningModule], data_args: dict, seed: int, epochs: int, callbacks: Sequence = ()
) -> tuple[L.Trainer, L.LightningModule, ShapesDataModule]:
    """Train ``build()`` for ``epochs`` from ``seed`` on ``ShapesDataModule(**data_args)`` (data seed 0), on the CPU
    without validation, logger or checkpoints; ``epochs = 0`` only sets the module up (the weights as loaded).

    Returns:
        The trainer, the trained module and the datamodule (set up, so its loaders and ``task`` are ready).
    """
    L.seed_everything(seed, verbose=False)
    data = ShapesDataModule(**{**data_args, "seed": 0})
    module = build()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=list(callbacks))
    trainer.fit(module, data)
    return trainer, module, data


def run(build: Callable[[], L.LightningModule], data_args: dict, seed: int,
        epochs: int) -> dict[str, dict[str, float]]:
    """Train one module for ``epochs``; the validation metrics of its final weights per explainer (its default, then
    its former default), the LaZSL column measured once."""
    _, module, data = fit(build, data_args, seed, epochs)
    former = FORMER_DEFAULTS[type(module).__name__]
    rows = {}
    for explainer in (module.explainer_name, former):
        callbacks = [SaliencyEvaluation(max_batches=4, steps=16, explainer=explainer)]
        if not rows:
            callbacks.append(LaZSL(n_crops=16, split="unseen", max_batches=8))
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks)
        (metrics,) = trainer.validate(module, data, verbose=False)
        rows[explainer if not rows else f"{explainer} (former default)"] = {
            column: float(metrics[key]) for column, key in COLUMNS.items() if key in metrics}
    lazsl = next(iter(rows.values()))["lazsl_unseen"]
    return {explainer: {**row, "lazsl_unseen": lazsl} for explainer, row in rows.items()}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: max_epochs of the LICO Shapes config")
    args = parser.parse_args()
    config = yaml.safe_load(open(LICO_CONFIG))
    epochs = config["trainer"]["max_epochs"] if args.epochs is None else args.epochs
    lico_args = config["model"]["init_args"]
    clip_args = yaml.safe_load(open(CLIP_CONFIG))["model"]["init_args"]
    data_args = config["data"]["init_args"]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for name, build in methods(lico_args, clip_args).items():
        for seed in args.seeds:
            start = time.perf_counter()
            for explainer, row in run(build, data_args, seed, epochs).items():
                results.setdefault((name, explainer), []).append(row)
                print(f"{name} seed {seed}, {explainer} ({time.perf_counter() - start:.0f} s): {row}", flush=True)
    print(f"\nCommand: python {' '.join(sys.argv)}   ({len(args.seeds)} seeds, {epochs} epochs, "
          f"{data_args['train_size']} images/epoch, batch {data_args['batch_size']})\n")
    print("| method | explainer | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---:|" * len(COLUMNS))
    for (name, explainer), rows in results.items():
        print(f"| {name} | {explainer} | " + " | ".join(mean_std([r[c] for r in rows]) for c in COLUMNS) + " |")
    print("\nPer seed:\n")
    print("| method | explainer | seed | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---:|" + "---:|" * len(COLUMNS))
    for (name, explainer), rows in results.items():
        for seed, row in zip(args.seeds, rows):
            print(f"| {name} | {explainer} | {seed} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
