"""ECOR's four factorisations against CLIP fine-tuning on Shapes ``objects``, 3 seeds, with zero-shot transfer to
held-out shapes.

``python benchmarks/compare_ecor.py`` (``--seeds``, ``--epochs`` to change) trains each model from the tiny Shapes
backbone on 6 of the 8 shapes (``TRAIN_SHAPES``) for the epochs of ``configs/ecor/shapes.yaml`` on its data:
``ECOR`` with each ``factorization`` (its 3 visual prompt tokens, the config's optimiser) and ``CLIPFineTune`` on the
class prompts "a photo of a {shape}." (its own Shapes config). Each is then tested once on the test split of the
training shapes and once, zero-shot, on the test split of the 2 held-out shapes (their own categories and
rationales, nothing retrained). CLIPFineTune is scored as DROR's baseline is: its fine-tuned towers rank the pair
sentences "This is a photo of a {c} because there is {r}" (an ``ECOR(factorization='flat', n_prompt_tokens=0)``
holding its weights).

Columns: ``acc`` (the top pair's category), ``RR``/``RW``/``WR``/``WW`` (strict scorer, top-5), ``cRR`` (DROR's
compat scorer's RR), ``zs RR`` / ``zs acc`` on the held-out shapes. It prints a Markdown table of mean ± std over
seeds, the per-seed rows and the command line; paste them into ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import yaml  # noqa: E402
from comparison import over_seeds, print_comparison  # noqa: E402

from datamodules.shapes import ShapesDataModule  # noqa: E402
from xvlm.methods import ECOR, CLIPFineTune  # noqa: E402

ECOR_CONFIG = "configs/ecor/shapes.yaml"
CLIP_CONFIG = "configs/clip/shapes.yaml"
TRAIN_SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
HELD_OUT = ["heart", "crescent"]
COLUMNS = {"acc": "test/acc", "RR": "test/RR", "RW": "test/RW", "WR": "test/WR", "WW": "test/WW",
           "cRR": "test/compat_RR"}
OPTIONS = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False)


def test_on(module: ECOR, data_args: dict, shapes: list[str]) -> dict[str, float]:
    """``module`` tested once on the test split of a Shapes ``objects`` world of ``shapes``."""
    data = ShapesDataModule(**{**data_args, "seed": 0, "shapes": shapes})
    (metrics,) = L.Trainer(**OPTIONS).test(module, data, verbose=False)
    return {column: float(metrics[key]) for column, key in COLUMNS.items()}


def as_pair_ranker(clip: CLIPFineTune, ecor_args: dict) -> ECOR:
    """An ECOR that ranks pair sentences with ``clip``'s towers (flat, no prompt tokens)."""
    ranker = ECOR(**{**ecor_args, "factorization": "flat", "n_prompt_tokens": 0})
    ranker.backbone.load_state_dict(clip.backbone.state_dict())
    return ranker


def run(build, data_args: dict, seed: int, epochs: int, ecor_args: dict) -> dict[str, float]:
    """Train ``build()`` for ``epochs`` from ``seed`` on the training shapes; test on them and on the held-out ones."""
    L.seed_everything(seed, verbose=False)
    module = build()
    data = ShapesDataModule(**{**data_args, "seed": 0, "shapes": TRAIN_SHAPES})
    L.Trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, **OPTIONS).fit(module, data)
    if isinstance(module, CLIPFineTune):
        module = as_pair_ranker(module, ecor_args)
    row = test_on(module, data_args, TRAIN_SHAPES)
    held_out = test_on(module, data_args, HELD_OUT)
    return row | {"zs RR": held_out["RR"], "zs acc": held_out["acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: max_epochs of the ECOR Shapes config")
    args = parser.parse_args()
    config = yaml.safe_load(open(ECOR_CONFIG))
    epochs = config["trainer"]["max_epochs"] if args.epochs is None else args.epochs
    data_args = config["data"]["init_args"]
    ecor_args = config["model"]["init_args"]
    clip_args = yaml.safe_load(open(CLIP_CONFIG))["model"]["init_args"]
    methods = {"CLIPFineTune (pair sentences)": lambda: CLIPFineTune(**clip_args)}
    methods |= {f"ECOR {f}": (lambda f=f: ECOR(**{**ecor_args, "factorization": f}))
                for f in ("rationale_first", "category_first", "independent", "flat")}
    results = over_seeds({name: lambda seed, build=build: run(build, data_args, seed, epochs, ecor_args)
                          for name, build in methods.items()}, args.seeds)
    print_comparison(results, args.seeds, [*COLUMNS, "zs RR", "zs acc"],
                     f"{len(args.seeds)} seeds, {epochs} epochs, {data_args['train_size']} images/epoch of "
                     f"{len(TRAIN_SHAPES)} shapes, batch {data_args['batch_size']}")


if __name__ == "__main__":
    main()
