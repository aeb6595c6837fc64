"""The ``xvlm`` command: a thin ``LightningCLI`` subclass that only wires things.

``xvlm fit|validate|test|predict --config configs/<method>/<dataset>.yaml [--run NAME]``; ``xvlm explain ...``
(:mod:`xvlm.cli.explain`), ``xvlm transfer ...`` and ``xvlm export ...`` (:mod:`xvlm.cli.export`), listed at the end
of ``xvlm --help``. The CLI is the top layer: it may import methods,
callbacks and datamodules; nothing below imports it.

- Every run has a name (``--run``); its checkpoints go to ``<checkpoint_dir>/<run>/`` (a fixed folder, so
  ``--ckpt_path last`` always finds the run) and its CSV/TensorBoard logs to ``<log_dir>/<run>/``
  (``trainer.default_root_dir`` is the checkpoint folder too).
- Two checkpoint callbacks: ``resume_checkpoint`` (no monitor; every ``every_n_train_steps`` = 500 steps and at
  every epoch end, ``last.ckpt`` always the newest) and ``best_checkpoint`` (monitor, default ``val/H``). One
  monitored callback with ``save_last`` leaves a stale ``last.ckpt`` in Lightning 2.6.
- Every checkpoint is written atomically (:class:`xvlm.checkpointing.AtomicCheckpointIO`, added to the trainer's
  plugins unless the config names another ``CheckpointIO``); ``--ckpt_path last`` resumes from the newest
  checkpoint of the run folder that loads (:func:`xvlm.checkpointing.newest_loadable_checkpoint`), skipping broken
  or foreign files with a warning, and starts fresh when there is none (a first SLURM job).
- Default callbacks on top of the config's: :class:`xvlm.preemption.Preemption` (SIGTERM/SIGUSR1: checkpoint
  after the current step, ``scontrol requeue`` under SLURM, stop) and :class:`xvlm.finite_loss.FiniteLoss` (a
  NaN/inf loss stops the run before it is written anywhere) and :class:`xvlm.callbacks.SkippedImages` (per-epoch
  counts of the images ``on_bad_image: skip`` dropped).
- ``--float32_matmul_precision`` (default ``high``) is set with ``torch.set_float32_matmul_precision`` before
  anything is built: float32 matrix products may use TF32 tensor cores (``highest`` turns that off).
- ``--ckpt_path`` resumes the same run only: a checkpoint written by another model class or for another backbone
  (``model``) is refused (Lightning would otherwise silently swap the configured class for the checkpoint's).
  Start from other weights with ``--model.init_args.init_weights``.
- ``xvlm predict`` writes its rows (top classes, probabilities, seen/unseen, explanation summary) through
  :class:`xvlm.prediction_writer.PredictionWriter`, configured under ``predictions`` (``--predictions.path
  preds.csv``, ``--predictions.explain true`` for the PNGs).
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from functools import partial
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger  # noqa: E402

from xvlm.callbacks import SkippedImages  # noqa: E402
from xvlm.checkpointing import (  # noqa: E402
    AtomicCheckpointIO,
    CheckpointWriteError,
    ResumeCheckpoint,
    check_checkpoint_class,
    load_checkpoint_file,
    newest_loadable_checkpoint,
)
from xvlm.cli.explain import explain_command  # noqa: E402
from xvlm.cli.export import export_command  # noqa: E402
from xvlm.cli.transfer import transfer_command  # noqa: E402
from xvlm.finite_loss import FiniteLoss, NonFiniteLossError  # noqa: E402
from xvlm.methods import XVLMModule  # noqa: E402
from xvlm.prediction_writer import PredictionWriter  # noqa: E402
from xvlm.preemption import Preemption  # noqa: E402

TRAINER_DEFAULTS: dict[str, Any] = {"accelerator": "auto", "devices": "auto", "log_every_n_steps": 10}
RESUME_EVERY_N_TRAIN_STEPS = 500
"""Default period of the resume checkpoint: a few minutes of a ViT-B/16 run on one GPU."""
EXPLAIN_HELP = """
other subcommands:
    explain             Render a trained module's explanations of chosen images as PNG files, with its own
                        explainer or any --explainer NAME. Run `xvlm explain --help` for its arguments.
    transfer            Test every trained run on every run's data (zero-shot transfer) and write the matrix of a
                        test metric. Run `xvlm transfer --help` for its arguments.
    export              Write a trained module's towers as an open_clip model folder (open_clip_config.json,
                        safetensors weights, model card). Run `xvlm export --help` for its arguments.
"""
"""Appended to ``xvlm --help``: ``explain``, ``transfer`` and ``export`` are not ``LightningCLI`` subcommands (main
dispatches them first)."""


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
    """Stop a fresh ``fit`` that would overwrite the checkpoints of an existing run."""
    folder = Path(run_dir(checkpoint_dir, run))
    if any(folder.glob("*.ckpt")):
        parser.error(f"run '{run}' already has checkpoints in {folder}/. Resume it with `--ckpt_path last`, or start "
                     f"a new run with `--run <another name>`.")


def _check_resumable(checkpoint: dict[str, Any], model: Any, source: str) -> None:
    """Raise if ``checkpoint`` was written by another module class or for another backbone (``model``) than the
    configured ``model`` (``{"class_path": ..., "init_args": {...}}``); both are named."""
    check_checkpoint_class(checkpoint, model["class_path"], source=source)
    written = checkpoint.get("hyper_parameters", {}).get("model")
    configured = (model.get("init_args") or {}).get("model")
    if written is not None and configured is not None and written != configured:
        raise ValueError(f"{source} was written for the backbone model={written!r}, but the configured model is "
                         f"{configured!r}. Resume with the same backbone, or start a new run from its weights with "
                         f"`--model.init_args.init_weights {source}`.")


def _config_file_of_error(parser: LightningArgumentParser, argv: list[str], message: str) -> str | None:
    """The ``--config`` file of ``argv`` whose content made parsing fail with ``message``, or None (the error is on
    the command line).

    jsonargparse stops at the first bad value, so the culprit is the first config file such that parsing ``argv``'s
    subcommand and its config files up to that one fails with the same message. ``parser`` must raise its errors
    (``exit_on_error`` off).
    """
    subcommand = argv[:1] if argv[:1] and not argv[0].startswith("-") else []
    given: list[str] = []
    for option, value in zip(argv, [*argv[1:], ""]):
        if option in ("--config", "-c"):
            path = value
        elif option.startswith("--config="):
            path = option.partition("=")[2]
        else:
            continue
        given += ["--config", path]
        try:
            parser.parse_args([*subcommand, *given])
        except ArgumentError as error:
            if str(error) == message:
                return path
    return None


class XVLMCLI(LightningCLI):
    """``LightningCLI`` with run folders, resume/best checkpoints and checkpoint-class checks (module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run", type=str, default="default", help="Run name: names its checkpoint and log folders.")
        parser.add_argument("--checkpoint_dir", type=str, default="checkpoints", help="Root of run checkpoint folders.")
        parser.add_argument("--log_dir", type=str, default="outputs", help="Root of run log folders.")
        parser.add_argument("--float32_matmul_precision", type=Literal["highest", "high", "medium"], default="high",
                            help="torch.set_float32_matmul_precision for the run: 'high' lets float32 matrix products "
                                 "use TF32 tensor cores on GPUs that have them; 'highest' keeps full float32.")
        parser.add_lightning_class_args(ResumeCheckpoint, "resume_checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults(
            {
                "resume_checkpoint.filename": "latest-epoch{epoch:03d}-step{step:07d}",
                "resume_checkpoint.save_last": True,
                "resume_checkpoint.every_n_train_steps": RESUME_EVERY_N_TRAIN_STEPS,
                "resume_checkpoint.enable_version_counter": False,
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
        self._parse_naming_config_files(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", self.config)
        ckpt_path = config.get("ckpt_path")
        if subcommand == "fit" and not ckpt_path:
            _refuse_to_overwrite(parser, config.checkpoint_dir, config.run)
        model = config.get("model")
        expected = model["class_path"] if model is not None and "class_path" in model else None
        if ckpt_path == "last" and "checkpoint_dir" in config:
            folder = run_dir(config.checkpoint_dir, config.run)
            found = newest_loadable_checkpoint(folder, expected, report=partial(print, file=sys.stderr))
            if found is None:
                print(f"--ckpt_path last: no loadable checkpoint in {folder}/; starting the run from scratch",
                      file=sys.stderr)
            config.ckpt_path = ckpt_path = None if found is None else str(found)
        if ckpt_path and ckpt_path != "last" and Path(ckpt_path).is_file() and expected is not None:
            try:
                _check_resumable(load_checkpoint_file(ckpt_path), model, ckpt_path)
            except ValueError as error:
                parser.error(str(error))

    def _parse_naming_config_files(self, parser: LightningArgumentParser, args: Any) -> None:
        """``LightningCLI.parse_arguments``, whose error about a bad key or value names the config file holding it
        (jsonargparse names the key only)."""
        argv = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else []
        subparsers = getattr(self, "_subcommand_parsers", {})  # none when built with run=False (xvlm explain)
        subcommand = argv[0] if argv[:1] and argv[0] in subparsers else None
        parsers = [parser, *subparsers.values()]
        exit_on_error = [each.exit_on_error for each in parsers]
        for each in parsers:  # raise instead of exiting, to name the config file of a bad key
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            source = _config_file_of_error(parser, argv, str(error))
            message = str(error) if source is None else f"in config file {source}: {error}"
        else:
            message = None
        finally:
            for each, value in zip(parsers, exit_on_error):
                each.exit_on_error = value
        if message is not None:
            self._parser(subcommand).error(message)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        torch.set_float32_matmul_precision(config.float32_matmul_precision)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, KeyError) as error:
            self.parser.error(f"could not build the configured objects: {error}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.log_dir, config.run)
        plugins = config.trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            config.trainer.plugins = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        self.trainer.print(
            f"\nCheckpoints: {run_dir(config.checkpoint_dir, config.run)}/ (last.ckpt resumes with --ckpt_path last)"
            f"\nLogs:        {self.trainer.log_dir}/"
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``xvlm`` console script; ``xvlm explain ...`` runs :mod:`xvlm.cli.explain`, ``xvlm
    transfer ...`` :mod:`xvlm.cli.transfer`, ``xvlm export ...`` :mod:`xvlm.cli.export`."""
    argv = sys.argv[1:] if args is None else list(args)
    cli = partial(
        XVLMCLI,
        model_class=XVLMModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [Preemption(), FiniteLoss(), SkippedImages()]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    if argv[:1] == ["explain"]:
        explain_command(argv[1:], partial(cli, run=False))
    elif argv[:1] == ["transfer"]:
        transfer_command(argv[1:], partial(cli, run=False))
    elif argv[:1] == ["export"]:
        export_command(argv[1:], partial(cli, run=False))
    elif argv[:1] in (["-h"], ["--help"]):
        try:
            cli(args=args)
        except SystemExit as exit_info:
            if exit_info.code in (0, None):
                print(EXPLAIN_HELP, end="")
            raise
    else:
        try:
            cli(args=args)  # None: LightningCLI reads sys.argv itself (and warns when given both)
        except (NonFiniteLossError, CheckpointWriteError) as error:  # what and where are in the message
            sys.exit(f"xvlm {argv[0] if argv else ''}: {type(error).__name__}: {error}")
        finally:
            _end_process_group()


def _end_process_group() -> None:
    """Destroy the DDP process group, if any, before the interpreter exits: Lightning leaves it alive, and gloo's
    threads torn down at exit can abort the process ("terminate called without an active exception", a non-zero
    status after a finished run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
