"""``xvlm explain``: render a trained module's explanations of chosen images as PNG files.

``xvlm explain --config <cfg.yaml> --ckpt_path <file> [--images a.png b.jpg ... | --split val|test]
[--num_images 8] [--explainer <name>] --out <folder>``

The model and datamodule are built from the training run's own config by the ``xvlm`` Lightning CLI (without
running it), the datamodule's task is attached to the model and the checkpoint's weights are loaded (a checkpoint
of another module class is refused). Image files are decoded as the datamodules decode theirs (an unreadable
file is an error naming it), resized to the module's ``input_side`` and CLIP-normalised; without ``--images``
the first ``--num_images`` samples of ``--split`` (default ``val``) are explained. One PNG per image goes to ``--out``: ``<split>_<index>.png`` or ``<position>_<file stem>.png``.
``--explainer`` picks the maps: the module's own ``explain`` (its configured explainer) by default, ``lazsl``
(LaZSL's per-descriptor region heat maps, with the settings of the config's LaZSL callback; ``--lazsl`` is the
same), or any registered explainer (:mod:`xvlm.explain.explainers`) of the predicted class. LaZSL cuts its crops
from the original images (the files of ``--images``, or the datamodule's ``original_image`` of ``--split`` when it
serves them) and draws its maps on them.
Any other argument (``--model.init_args.templates ...``) goes to the CLI's parser, as in ``xvlm fit``.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from datamodules.loading import read_rgb
from datamodules.transforms import eval_transform
from xvlm.checkpointing import check_checkpoint_class, class_path
from xvlm.explain.explainers import check_explainer
from xvlm.explain.gallery import first_samples, gallery_explainers, named_explainer, render_batch, sample_names
from xvlm.explain.render import save_figure
from xvlm.methods.base import XVLMModule
from xvlm.zeroshot import lazsl_settings_of, original_reader

STAGES = {"images": "predict", "val": "validate", "test": "test"}
"""Datamodule ``setup`` stage per source of images."""
CHUNK = 16
"""Images explained per forward pass."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvlm explain", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments override the config, as in `xvlm fit`.")
    parser.add_argument("--config", required=True, help="YAML config of the training run.")
    parser.add_argument("--ckpt_path", required=True, help="Checkpoint of that run.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", help="Image files to explain.")
    source.add_argument("--split", choices=("val", "test"), default="val", help="Split to explain (default val).")
    parser.add_argument("--num_images", type=int, default=8, help="Samples of --split to explain (default 8).")
    parser.add_argument("--out", required=True, help="Folder of the PNG files.")
    choices = gallery_explainers()
    parser.add_argument("--explainer", choices=choices, default=None, metavar="NAME",
                        help="Maps to render: 'module' (default: the module's own explain, i.e. its configured "
                             "explainer), 'lazsl' (LaZSL's per-descriptor region heat maps with the settings of the "
                             "config's LaZSL callback, defaults without one), or a registered explainer of the "
                             f"predicted class. Choices: {', '.join(choices)}.")
    parser.add_argument("--lazsl", action="store_true", help="Same as --explainer lazsl.")
    return parser


def load_images(paths: Sequence[str | Path], image_size: int) -> dict[str, torch.Tensor]:
    """Image files as a batch ``{"image": [N, 3, S, S], "index": [N]}``: RGB, resized to ``S`` and CLIP-normalised;
    ``index`` is each file's position in ``paths`` (it seeds LaZSL's crops and names the original)."""
    transform = eval_transform(image_size)
    images = [transform(image=read_rgb(path))["image"] for path in paths]
    return {"image": torch.stack(images), "index": torch.arange(len(paths))}


def original_files(paths: Sequence[str | Path]) -> Callable[[int], torch.Tensor]:
    """``index -> [3, H, W] uint8``: the file ``paths[index]`` as decoded, the original LaZSL cuts its crops from."""
    return lambda index: torch.from_numpy(read_rgb(paths[index])).permute(2, 0, 1).contiguous()


def load_checkpoint_weights(model: XVLMModule, path: str | Path) -> None:
    """Load a Lightning checkpoint's ``state_dict`` into ``model`` (``weights_only``), refusing another class's.

    Raises:
        ValueError: the checkpoint was written by another module class.
        KeyError: the file has no ``state_dict``.
        RuntimeError: the weights do not fit the model (another architecture or config).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    check_checkpoint_class(checkpoint, class_path(model), source=str(path))
    model.load_state_dict(model.full_state_dict(checkpoint["state_dict"]))


def _batch_and_names(
    args: argparse.Namespace, model: XVLMModule, datamodule: LightningDataModule
) -> tuple[dict[str, Any], list[str]]:
    """The images the arguments ask for, as one batch, and their output names."""
    if args.images:
        names = [f"{position:03d}_{Path(path).stem}" for position, path in enumerate(args.images)]
        return load_images(args.images, model.input_side), names
    batch = first_samples(getattr(datamodule, f"{args.split}_dataloader")(), args.num_images)
    return batch, sample_names(batch, args.split)


def explain_command(argv: Sequence[str], build_cli: Callable[..., LightningCLI]) -> None:
    """Run ``xvlm explain`` (module docstring); input errors exit with a message naming the bad input.

    Args:
        argv: the arguments after ``explain``.
        build_cli: builds the ``xvlm`` CLI without running it, from ``args=[...]``.
    """
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    for path in [args.ckpt_path, *(args.images or [])]:
        if not Path(path).is_file():
            parser.error(f"file '{path}' does not exist")
    if args.num_images < 1:
        parser.error(f"--num_images must be at least 1; got {args.num_images}")
    if args.lazsl and args.explainer not in (None, "lazsl"):
        parser.error(f"--lazsl and --explainer {args.explainer} ask for different maps; give one of them")
    explainer_name = "lazsl" if args.lazsl else args.explainer or "module"

    cli = build_cli(args=["--config", args.config, *overrides])
    model, datamodule = cli.model, cli.datamodule
    try:
        datamodule.setup(STAGES["images" if args.images else args.split])
        model.attach_task(datamodule.task)
        batch, names = _batch_and_names(args, model, datamodule)
    except (ValueError, KeyError, OSError) as error:
        parser.error(str(error))
    try:
        load_checkpoint_weights(model, args.ckpt_path)
    except (ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
        parser.error(f"cannot use checkpoint '{args.ckpt_path}': {error}")

    model.to(cli.trainer.strategy.root_device)
    out = Path(args.out)
    try:
        originals = original_files(args.images) if args.images else original_reader(datamodule, args.split)
        explainer = named_explainer(model, explainer_name, lazsl_settings_of(cli.trainer.callbacks),
                                    originals=originals)
        if explainer_name not in ("module", "lazsl"):
            check_explainer(explainer_name, model)
    except ValueError as error:
        parser.error(str(error))
    for start in range(0, len(names), CHUNK):
        part = {key: value[start : start + CHUNK] for key, value in batch.items()}
        part_names = names[start : start + CHUNK]
        for name, figure in zip(part_names, render_batch(model, part, part_names, explainer)):
            save_figure(figure, out / f"{name}.png")
    print(out)
