"""``xvlm export``: write a trained module's image and text towers as an open_clip model folder.

``xvlm export --config <cfg.yaml> --ckpt_path <file> --out <folder>``

The model and datamodule are built from the training run's own config by the ``xvlm`` Lightning CLI (without
running it), the datamodule's task is attached and the checkpoint's weights are loaded (a checkpoint of another
module class is refused), as ``xvlm explain`` does. ``--out`` then holds open_clip's hub layout
(:mod:`xvlm.export`): ``open_clip_config.json`` (architecture and the datamodule's evaluation preprocessing),
``open_clip_model.safetensors`` (the towers of the module's ``zero_shot_encoder()``), ``README.md`` (a model card:
method, config, class split, the checkpoint's validation scores) and, when the method has tensors of its own
(heads, learned prompt vectors), ``xvlm_method_parts.safetensors``. ``open_clip.create_model_and_transforms(
'local-dir:<folder>')`` loads it without xvlm; towers open_clip cannot build (``xvlm-tiny``'s convolutional stem,
register or prompt tokens, MSCI's block adapters) load with ``VisionLanguageModel('local-dir:<folder>')``, and the
command says so.
Any other argument (``--model.init_args.templates ...``) goes to the CLI's parser, as in ``xvlm fit``.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from xvlm.checkpointing import load_checkpoint_file
from xvlm.cli.explain import load_checkpoint_weights
from xvlm.export import export_module


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvlm export", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments override the config, as in `xvlm fit`.")
    parser.add_argument("--config", required=True, help="YAML config of the training run.")
    parser.add_argument("--ckpt_path", required=True, help="Checkpoint of that run.")
    parser.add_argument("--out", required=True, help="Folder to write the open_clip model into.")
    return parser


def export_command(argv: Sequence[str], build_cli: Callable[..., LightningCLI]) -> None:
    """Run ``xvlm export`` (module docstring); input errors exit with a message naming the bad input.

    Args:
        argv: the arguments after ``export``.
        build_cli: builds the ``xvlm`` CLI without running it, from ``args=[...]``.
    """
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if not Path(args.ckpt_path).is_file():
        parser.error(f"file '{args.ckpt_path}' does not exist")
    cli = build_cli(args=["--config", args.config, *overrides])
    model, datamodule = cli.model, cli.datamodule
    try:
        datamodule.setup("validate")
        model.attach_task(datamodule.task)
    except (ValueError, KeyError, OSError) as error:
        parser.error(str(error))
    try:
        load_checkpoint_weights(model, args.ckpt_path)
        checkpoint = load_checkpoint_file(args.ckpt_path)
    except (ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
        parser.error(f"cannot use checkpoint '{args.ckpt_path}': {error}")
    try:
        export, written = export_module(model.cpu().eval(), datamodule, args.out, checkpoint, title=cli.config.run)
    except ValueError as error:
        parser.error(str(error))
    print("\n".join(str(path) for path in written))
    if export.needs_xvlm is None:
        print(f"open_clip loads it: open_clip.create_model_and_transforms('local-dir:{args.out}')")
    else:
        print(f"open_clip cannot build these towers alone ({export.needs_xvlm}); load them with "
              f"xvlm.backbones.VisionLanguageModel('local-dir:{args.out}')")
