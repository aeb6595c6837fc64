"""SVIP against CLIPFineTune on Shapes ``attributes``: same backbone, data and steps, 3 seeds.

``python benchmarks/compare_svip.py`` (``--seeds``, ``--epochs`` to change) trains each method from the tiny Shapes
backbone for the epochs of ``configs/svip/shapes.yaml`` on its data (each method's optimiser settings from its own
Shapes config), then, with the final weights, validates once (which chooses the calibrated-stacking ``γ`` on the
validation split) and tests once on the test split (which applies that ``γ``; nothing is chosen on test):

- ``zsl``: per-class top-1 among the 64 unseen classes; ``S``/``U``/``H``: GZSL over all 256 classes, uncalibrated;
- ``γ``: the calibration chosen on validation; ``S_cal``/``U_cal``/``H_cal``: GZSL at that ``γ`` on test;
- ``keep``: SVIP's kept super-patches' pixel precision against the object masks, ``random``: a random selection's
  (the mask's share of the image); ``recall``: the share of the object's pixels kept (a random selection's: M/G).

It prints a Markdown table of mean ± std over seeds, the per-seed rows and the command line; paste them into
``docs/results.md``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import yaml  # noqa: E402
from comparison import over_seeds, print_comparison  # noqa: E402

from datamodules.shapes import ShapesDataModule  # noqa: E402
from xvlm.methods import SVIP, CLIPFineTune  # noqa: E402

SVIP_CONFIG = "configs/svip/shapes.yaml"
CLIP_CONFIG = "configs/clip/shapes.yaml"
COLUMNS = {"zsl": "test/zsl", "S": "test/S", "U": "test/U", "H": "test/H", "γ": "test/calibration",
           "S_cal": "test/S_cal", "U_cal": "test/U_cal", "H_cal": "test/H_cal", "keep": "test/keep_precision",
           "random": "test/keep_precision_random", "recall": "test/keep_recall"}


def run(build, data_args: dict, seed: int, epochs: int, clip_value: float | None) -> dict[str, float]:
    """Train ``build()`` for ``epochs`` from ``seed``, validate once, test once; the test metrics."""
    L.seed_everything(seed, verbose=False)
    data = ShapesDataModule(**{**data_args, "seed": 0})
    module = build()
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=clip_value, **options)
    trainer.fit(module, data)
    evaluation = L.Trainer(**options)
    evaluation.validate(module, data, verbose=False)
    (metrics,) = evaluation.test(module, data, verbose=False)
    return {column: float(metrics[key]) for column, key in COLUMNS.items() if key in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: max_epochs of the SVIP Shapes config")
    args = parser.parse_args()
    config = yaml.safe_load(open(SVIP_CONFIG))
    epochs = config["trainer"]["max_epochs"] if args.epochs is None else args.epochs
    data_args = config["data"]["init_args"]
    svip_args = config["model"]["init_args"]
    clip_args = yaml.safe_load(open(CLIP_CONFIG))["model"]["init_args"]
    methods = {"CLIPFineTune": (lambda: CLIPFineTune(**clip_args), None),
               "SVIP": (lambda: SVIP(**svip_args), config["trainer"].get("gradient_clip_val"))}
    runs = {name: (lambda seed, build=build, clip_value=clip_value: run(build, data_args, seed, epochs, clip_value))
            for name, (build, clip_value) in methods.items()}
    results = over_seeds(runs, args.seeds)
    print_comparison(results, args.seeds, list(COLUMNS), f"{len(args.seeds)} seeds, {epochs} epochs, "
                     f"{data_args['train_size']} images/epoch, batch {data_args['batch_size']}")


if __name__ == "__main__":
    main()
