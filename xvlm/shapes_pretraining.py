"""The tiny pretrained backbones: CLIP pretraining on captions of **seen** Shapes classes only.

``pretrained='shapes'`` (registered here with :func:`xvlm.backbones.register_source` when the ``xvlm`` package is
imported, so that ``backbones`` needs no import of a method) resolves to
``<checkpoint_dir>/backbones/<model>-shapes.pt`` and builds it on first use by running
:class:`~xvlm.methods.clip.CLIPFineTune` from random initialisation on the ``attributes`` task (unseen
colour–pattern–shape combinations never appear), then caches it atomically together with a JSON report of its
zero-shot accuracy. Unseen-class accuracy of the result measures real compositional transfer: every
colour, pattern and shape word was seen, never the held-out combinations.

The build leaves the caller's random state untouched, so a run that builds the backbone and one that finds it
cached train identically afterwards. ``XVLM_CHECKPOINT_DIR`` moves the cache (default ``checkpoints``).
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from xvlm.backbones import register_source
from xvlm.checkpointing import capture_rng_state, restore_rng_state

CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture of a {} on clutter.",
    "a drawing of a {}.",
)
PRIMITIVES = ("shape", "colour", "pattern")


@dataclass(frozen=True)
class BuildRecipe:
    """How one tiny backbone is pretrained (sized for under five minutes on two CPU cores).

    Images are drawn at ``image_size`` (the backbone is then used at its architecture's size, see
    :func:`build_shapes_backbone`); ``num_workers`` loader processes draw them while the model trains. Every
    training image is a fresh draw of the world (random size, position, rotation and clutter), so ``augment``
    (the datamodule's geometric augmentation) is off by default: it would only cost time. ``negatives`` is
    :class:`~xvlm.methods.clip.CLIPFineTune`'s: ``batch`` encodes only the captions of the classes in the batch,
    which makes small batches (more updates for the same images) cheap.
    """

    steps: int = 190
    batch_size: int = 128
    image_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0
    val_size: int = 1024
    num_workers: int = 0
    augment: bool = False
    negatives: str = "seen"


#: Recipes of the backbones ``pretrained='shapes'`` can build, by open_clip architecture name.
RECIPES: dict[str, BuildRecipe] = {
    "xvlm-tiny": BuildRecipe(steps=800, batch_size=64, image_size=48, lr=1e-3, warmup_steps=40, negatives="batch"),
    "xvlm-tiny-rn": BuildRecipe(steps=400, image_size=48),
}
RECIPES["xvlm-tiny-reg"] = RECIPES["xvlm-tiny"]  # the same ViT with register tokens, built the same way


def checkpoint_root() -> Path:
    """Root folder of checkpoints and built backbones (``XVLM_CHECKPOINT_DIR`` or ``checkpoints``)."""
    return Path(os.environ.get("XVLM_CHECKPOINT_DIR", "checkpoints"))


def shapes_backbone_path(model_name: str) -> Path:
    """Path of the cached Shapes backbone for ``model_name``, building it first if it is missing."""
    if model_name not in RECIPES:
        raise ValueError(f"pretrained='shapes' exists for {sorted(RECIPES)}, not for '{model_name}'")
    path = checkpoint_root() / "backbones" / f"{model_name}-shapes.pt"
    if path.is_file():
        return path
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        _wait_for(path)
    else:
        # An empty context: hyper-parameters that LightningCLI hands to the module being constructed (a context
        # variable) must not leak into the modules of the build.
        contextvars.Context().run(build_shapes_backbone, model_name, path, RECIPES[model_name])
    return path


register_source("shapes", shapes_backbone_path)


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    start = time.monotonic()
    while not path.is_file():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to build {path}")
        time.sleep(2.0)


def build_shapes_backbone(model_name: str, path: Path, recipe: BuildRecipe) -> dict:
    """Pretrain ``model_name`` on seen Shapes classes, save its open_clip state dict to ``path``; return the report.

    Training runs at ``recipe.image_size``; the saved weights are then loaded as every user loads them (at the
    architecture's own input size, position embeddings resized by open_clip) and the report (also written to
    ``path.with_suffix('.json')``) holds the build time and the zero-shot metrics of :func:`zero_shot_report` of
    that model on the validation split at that size.
    """
    from datamodules.shapes import ShapesDataModule
    from xvlm.methods.clip import CLIPFineTune

    print(f"Building the '{model_name}' backbone on seen Shapes classes ({recipe.steps} steps); cached at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    outer_rng = capture_rng_state()
    start = time.perf_counter()
    try:
        L.seed_everything(recipe.seed, verbose=False)
        datamodule = ShapesDataModule(task="attributes", image_size=recipe.image_size, batch_size=recipe.batch_size,
                                      seed=recipe.seed, train_size=recipe.steps * recipe.batch_size,
                                      num_workers=recipe.num_workers, augment=recipe.augment)
        module = CLIPFineTune(model=model_name, pretrained=None, input_size=recipe.image_size,
                              templates=CAPTION_TEMPLATES, lr=recipe.lr, weight_decay=recipe.weight_decay,
                              warmup_steps=recipe.warmup_steps, negatives=recipe.negatives)
        trainer = L.Trainer(max_steps=recipe.steps, max_epochs=1, logger=False, enable_checkpointing=False,
                            limit_val_batches=0, num_sanity_val_steps=0, devices=1, enable_model_summary=False)
        trainer.fit(module, datamodule)
        train_seconds = time.perf_counter() - start
        torch.save(module.backbone.clip.state_dict(), partial)
        loaded = CLIPFineTune(model=model_name, pretrained=str(partial), templates=CAPTION_TEMPLATES)
        evaluation = ShapesDataModule(task="attributes", image_size=loaded.input_side, batch_size=recipe.batch_size,
                                      seed=recipe.seed, val_size=recipe.val_size)
        loaded.attach_task(evaluation.task)
        report = {"model": model_name, "recipe": asdict(recipe), "train_seconds": round(train_seconds, 1),
                  "evaluated_at_px": loaded.input_side, **zero_shot_report(loaded, evaluation)}
    finally:
        restore_rng_state(outer_rng)
    os.replace(partial, path)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def zero_shot_report(module, datamodule) -> dict:
    """Zero-shot metrics of ``module`` on the validation split of a Shapes ``attributes`` datamodule.

    Returns GZSL ``S``/``U``/``H``, unseen ZSL top-1 (``zsl``, argmax over unseen classes) with its chance level,
    and per-primitive accuracies of the ZSL prediction on unseen samples (``zsl_shape``, ``zsl_colour``,
    ``zsl_pattern``: the predicted class has the true shape/colour/pattern).
    """
    from xvlm.metrics import GZSLMetrics

    was_training = module.training
    module.eval()
    datamodule.setup("validate")
    task = datamodule.task
    metric = GZSLMetrics(task.num_classes, task.seen, task.unseen)
    unseen = torch.as_tensor(task.unseen)
    factors = torch.as_tensor(np.asarray(datamodule.world.factors))
    module.on_validation_epoch_start()  # caches the class text features classify uses
    hits = {name: [] for name in PRIMITIVES}
    for batch in datamodule.val_dataloader():
        logits = module.classify(batch["image"].to(module.device)).cpu()
        metric.update(logits, batch["label"])
        is_unseen = torch.isin(batch["label"], unseen)
        predicted = unseen[logits[is_unseen][:, unseen].argmax(dim=1)]
        for k, name in enumerate(PRIMITIVES):
            hits[name].append(factors[predicted, k] == factors[batch["label"][is_unseen], k])
    module.train(was_training)
    report = {k: round(float(v), 4) for k, v in metric.compute().items()}
    report["zsl_chance"] = round(1.0 / len(task.unseen), 4)
    for name in PRIMITIVES:
        report[f"zsl_{name}"] = round(float(torch.cat(hits[name]).float().mean()), 4)
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m xvlm.shapes_pretraining --model xvlm-tiny [--steps N ...] --out file.pt``: build with a recipe.

    Starts from the model's registered recipe and overrides the given fields; prints and writes the report.
    """
    import argparse
    from dataclasses import fields, replace

    parser = argparse.ArgumentParser(description="Build a tiny Shapes backbone with a chosen recipe.")
    parser.add_argument("--model", default="xvlm-tiny", choices=sorted(RECIPES))
    parser.add_argument("--out", required=True, help="weights file to write (a JSON report goes beside it)")
    for field in fields(BuildRecipe):
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=type(field.default), default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(BuildRecipe) if getattr(args, f.name) is not None}
    build_shapes_backbone(args.model, Path(args.out), replace(RECIPES[args.model], **overrides))


if __name__ == "__main__":
    main()
