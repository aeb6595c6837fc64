"""MSCI against CLIPFineTune and against MSCI without its two stages on Shapes ``compositions``, 3 seeds.

``python benchmarks/compare_msci.py`` (``--seeds``, ``--epochs`` to change) trains each from the tiny Shapes backbone
for the epochs of ``configs/msci/shapes.yaml`` on its data (each with the optimiser settings of its own Shapes
config): ``CLIPFineTune`` (both towers, prompts "a photo of a {state} {object}."), ``MSCI`` and ``MSCI (global)``
(``interaction: false``: no aggregators, no stages, ``T̂ = T``). Then, with the final weights, it validates once (MSCI
chooses its inference weights there), scores every pair for the validation and test images with each module's
``classify`` and computes the CZSL evaluator on test (:mod:`xvlm.metrics.czsl`):

- closed world: the training pairs and the test pairs; ``AUC``, ``HM``, best seen ``S``, best unseen ``U``;
- open world: all 64 pairs with the feasibility filter, the threshold chosen on validation by open-world AUC (50
  values over the unseen pairs' feasibility), the same feasibility for every method: MSCI's
  :func:`~xvlm.methods.msci.feasibility_scores` of the Shapes text tower's colour and shape names;
- MSCI's explanation check (spec §9): the share of the predicted pair's stage-1 (``low``) and stage-2 (``high``)
  attention inside the object masks of the test images, against the masks' area share (``uniform``).

It prints a Markdown table of mean ± std over seeds, the per-seed rows and the command line; paste them into
``docs/results.md``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from comparison import over_seeds, print_comparison  # noqa: E402

from datamodules.shapes import ShapesDataModule  # noqa: E402
from xvlm.methods import MSCI, CLIPFineTune  # noqa: E402
from xvlm.metrics import (  # noqa: E402
    czsl_report,
    feasible_summaries,
    mass_in_mask,
    report_from_summary,
    uniform_mass_in_mask,
)

MSCI_CONFIG = "configs/msci/shapes.yaml"
CLIP_CONFIG = "configs/clip/shapes.yaml"
COLUMNS = ("AUC", "HM", "S", "U", "OW AUC", "OW HM", "OW S", "OW U", "low in mask", "high in mask", "uniform")
KEYS = ("auc", "hm", "best_seen", "best_unseen")


def attention_in_mask(module: MSCI, loader) -> dict[str, float]:
    """Mean share of the predicted pair's stage-1 and stage-2 attention (patch maps stretched over the image) inside
    the object masks, and the masks' area share (a uniform map's)."""
    low, high, uniform = [], [], []
    module.eval()
    with torch.no_grad():
        for batch in loader:
            images, masks = batch["image"], batch["mask"]
            maps = module.stage_attention(images, module.classify(images).argmax(dim=1)).maps[:, :, 0]  # [B, 2, h, w]
            maps = F.interpolate(maps, size=masks.shape[-2:], mode="nearest")
            low.append(mass_in_mask(maps[:, 0], masks))
            high.append(mass_in_mask(maps[:, 1], masks))
            uniform.append(uniform_mass_in_mask(masks))
    return {name: float(torch.cat(values).mean()) for name, values in
            (("low in mask", low), ("high in mask", high), ("uniform", uniform))}


def scores_of(module: L.LightningModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """``classify`` scores ``[N, P]`` and labels ``[N]`` of every image of ``loader``."""
    module.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in loader:
            scores.append(module.classify(batch["image"]).float())
            labels.append(batch["label"])
    return torch.cat(scores), torch.cat(labels)


def open_world(val: tuple, test: tuple, seen: torch.Tensor, feasibility: torch.Tensor) -> dict[str, float]:
    """Test report at the feasibility threshold of the best validation AUC."""
    unseen = feasibility[~seen]
    thresholds = torch.linspace(float(unseen.min()), float(unseen.max()), 50)
    aucs = [float(report_from_summary(s, seen)["auc"]) for s in feasible_summaries(*val, seen, feasibility, thresholds)]
    best = thresholds[max(range(len(aucs)), key=aucs.__getitem__)]
    (summary,) = feasible_summaries(*test, seen, feasibility, best[None])
    return {k: float(v) for k, v in report_from_summary(summary, seen).items()}


def run(build, data_args: dict, seed: int, epochs: int, feasibility: torch.Tensor) -> dict[str, float]:
    """Train ``build()`` for ``epochs`` from ``seed``, validate once, then the closed- and open-world test reports."""
    L.seed_everything(seed, verbose=False)
    data = ShapesDataModule(**{**data_args, "seed": 0})
    module = build()
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    L.Trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, **options).fit(module, data)
    L.Trainer(**options).validate(module, data, verbose=False)
    data.setup("test")
    val, test = scores_of(module, data.val_dataloader()), scores_of(module, data.test_dataloader())
    task = data.task
    seen = torch.zeros(task.num_classes, dtype=torch.bool)
    seen[list(task.train_pairs)] = True
    closed = seen.clone()
    closed[list(task.test_pairs)] = True
    cw = czsl_report(*test, seen, closed)
    ow = open_world(val, test, seen, feasibility)
    row = {**{c: float(cw[k]) for c, k in zip(COLUMNS[:4], KEYS)}, **{c: ow[k] for c, k in zip(COLUMNS[4:8], KEYS)}}
    if isinstance(module, MSCI) and module.hparams.interaction:
        row |= attention_in_mask(module, data.test_dataloader())
    return row


def shapes_feasibility(data_args: dict, model_args: dict) -> torch.Tensor:
    """MSCI's feasibility of the 64 Shapes pairs (from the frozen text tower of its config)."""
    module = MSCI(**model_args)
    module.attach_task(ShapesDataModule(**data_args).task)
    return module.feasibility.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: max_epochs of the MSCI Shapes config")
    args = parser.parse_args()
    config = yaml.safe_load(open(MSCI_CONFIG))
    epochs = config["trainer"]["max_epochs"] if args.epochs is None else args.epochs
    data_args = config["data"]["init_args"]
    msci_args = config["model"]["init_args"]
    clip_args = yaml.safe_load(open(CLIP_CONFIG))["model"]["init_args"]
    feasibility = shapes_feasibility(data_args, msci_args)
    methods = {"CLIPFineTune": lambda: CLIPFineTune(**clip_args), "MSCI": lambda: MSCI(**msci_args),
               "MSCI (global)": lambda: MSCI(**{**msci_args, "interaction": False})}
    results = over_seeds({name: lambda seed, build=build: run(build, data_args, seed, epochs, feasibility)
                          for name, build in methods.items()}, args.seeds)
    print_comparison(results, args.seeds, COLUMNS, f"{len(args.seeds)} seeds, {epochs} epochs, "
                     f"{data_args['train_size']} images/epoch, batch {data_args['batch_size']}")


if __name__ == "__main__":
    main()
