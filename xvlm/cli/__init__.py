"""The ``xvlm`` command: a thin ``LightningCLI`` subclass that only wires things.

``xvlm fit|validate|test|predict --config configs/<method>/<dataset>.yaml [--run NAME]``; ``xvlm explain ...``
(:mod:`xvlm.cli.explain`, listed at the end of ``xvlm --help``). The CLI is the top layer: it may import methods,
callbacks and datamodules; nothing below imports it.

- Every run has a name (``--run``); its checkpoints go to ``<checkpoint_dir>/<run>/`` (a fixed folder, so
  ``--ckpt_path last`` always finds the run's ``last.ckpt``) and its CSV/TensorBoard logs to
  ``<log_dir>/<run>/``. ``trainer.default_root_dir`` is the checkpoint folder too, so SLURM's emergency
  ``hpc_ckpt_*.ckpt`` lands where a requeued job looks for it.
- Two checkpoint callbacks: ``resume_checkpoint`` (no monitor, ``last.ckpt`` every epoch) and
  ``best_checkpoint`` (monitor, default ``val/H``). One monitored callback with ``save_last`` leaves a stale
  ``last.ckpt`` in Lightning 2.6.
- ``--ckpt_path`` resumes the same run only: a checkpoint written by another model class is refused (Lightning
  would otherwise silently swap the configured class for the checkpoint's). Start from other weights with
  ``--model.init_args.init_weights``.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger  # noqa: E402

from xvlm.checkpointing import check_checkpoint_class  # noqa: E402
from xvlm.cli.explain import explain_command  # noqa: E402
from xvlm.methods import XVLMModule  # noqa: E402

TRAINER_DEFAULTS: dict[str, Any] = {"accelerator": "auto", "devices": "auto", "log_every_n_steps": 10}
EXPLAIN_HELP = """
other subcommands:
    explain             Render a trained module's explanations of chosen images as PNG files, with its own
                        explainer or any --explainer NAME. Run `xvlm explain --help` for its arguments.
"""
"""Appended to ``xvlm --help``: ``explain`` is not a ``LightningCLI`` subcommand (main dispatches it first)."""


def run_dir(root: str, run: str) -> str:
    """``<root>/<run>``: the fixed folder of one run."""
    return str(Path(root) / run)


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def default_loggers(log_dir: str, run: str) -> list[Logger]:
    """CSV logs in ``<log_dir>/<run>/csv/version_N`` and, when installed, TensorBoard in ``.../tensorboard/version_N``.

    Every invocation (a resumed one too) writes a new ``version_N``, so earlier logs are never overwritten
    (Lightning's CSV writer deletes an existing ``metrics.csv`` in its folder).
    """
    root = run_dir(log_dir, run)
    loggers: list[Logger] = [CSVLogger(save_dir=root, name="csv")]
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(save_dir=root, name="tensorboard"))
    return loggers


def _refuse_to_overwrite(parser: LightningArgumentParser, checkpoint_dir: str, run: str) -> None:
    """Stop a fresh ``fit`` that would overwrite the checkpoints of an existing run (a SLURM requeue, which
    resumes from ``hpc_ckpt_*.ckpt`` without ``--ckpt_path``, may go on)."""
    folder = Path(run_dir(checkpoint_dir, run))
    if (folder / "last.ckpt").is_file() and not any(folder.glob("hpc_ckpt_*.ckpt")):
        parser.error(f"run '{run}' already has checkpoints in {folder}/. Resume it with `--ckpt_path last`, or start "
                     f"a new run with `--run <another name>`.")


class XVLMCLI(LightningCLI):
    """``LightningCLI`` with run folders, resume/best checkpoints and checkpoint-class checks (module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run", type=str, default="default", help="Run name: names its checkpoint and log folders.")
        parser.add_argument("--checkpoint_dir", type=str, default="checkpoints", help="Root of run checkpoint folders.")
        parser.add_argument("--log_dir", type=str, default="outputs", help="Root of run log folders.")
        parser.add_lightning_class_args(ModelCheckpoint, "resume_checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.set_defaults(
            {
                "resume_checkpoint.filename": "latest-epoch{epoch:03d}",
                "resume_checkpoint.save_last": True,
                "resume_checkpoint.auto_insert_metric_name": False,
                "best_checkpoint.filename": "best-epoch{epoch:03d}",
                "best_checkpoint.monitor": "val/H",
                "best_checkpoint.mode": "max",
                "best_checkpoint.auto_insert_metric_name": False,
            }
        )
        for target in ("resume_checkpoint.dirpath", "best_checkpoint.dirpath", "trainer.default_root_dir"):
            parser.link_arguments(("checkpoint_dir", "run"), target, compute_fn=run_dir)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", self.config)
        ckpt_path = config.get("ckpt_path")
        if subcommand == "fit" and not ckpt_path:
            _refuse_to_overwrite(parser, config.checkpoint_dir, config.run)
        model = config.get("model")
        if ckpt_path and Path(ckpt_path).is_file() and model is not None and "class_path" in model:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            try:
                check_checkpoint_class(checkpoint, model["class_path"], source=ckpt_path)
            except ValueError as error:
                parser.error(str(error))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, KeyError) as error:
            self.parser.error(f"could not build the configured objects: {error}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.log_dir, config.run)
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        self.trainer.print(
            f"\nCheckpoints: {run_dir(config.checkpoint_dir, config.run)}/ (last.ckpt resumes with --ckpt_path last)"
            f"\nLogs:        {self.trainer.log_dir}/"
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``xvlm`` console script; ``xvlm explain ...`` runs :mod:`xvlm.cli.explain`."""
    argv = sys.argv[1:] if args is None else list(args)
    cli = partial(
        XVLMCLI,
        model_class=XVLMModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    if argv[:1] == ["explain"]:
        explain_command(argv[1:], partial(cli, run=False))
    elif argv[:1] in (["-h"], ["--help"]):
        try:
            cli(args=args)
        except SystemExit as exit_info:
            if exit_info.code in (0, None):
                print(EXPLAIN_HELP, end="")
            raise
    else:
        cli(args=args)  # None: LightningCLI reads sys.argv itself (and warns when given both)


if __name__ == "__main__":
    sys.exit(main())
