"""Run the ``xvlm`` command in a subprocess, as a user would (shared by the end-to-end tests)."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def xvlm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``xvlm *args`` in ``cwd`` with this test folder importable (for test-only callbacks); ``env`` adds to (or
    replaces in) the environment."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    command = [str(Path(sys.executable).parent / "xvlm"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def straight_and_resumed(
    config: str, epochs: int, stop_after: int, cwd: Path
) -> tuple[subprocess.CompletedProcess, dict]:
    """Train ``config`` for ``epochs`` straight (run ``straight``) and again interrupted after ``stop_after`` epochs,
    then resumed with ``--ckpt_path last`` (run ``split``); every call must succeed.

    Returns:
        The straight run's process and the split run's checkpoint as it was at the interruption.
    """
    straight = xvlm("fit", "--config", config, "--run", "straight", "--trainer.max_epochs", str(epochs), cwd=cwd)
    assert straight.returncode == 0, straight.stderr
    interrupt = f'{{"class_path": "interruption.StopAfterEpochs", "init_args": {{"epochs": {stop_after}}}}}'
    first = xvlm("fit", "--config", config, "--run", "split", "--trainer.max_epochs", str(epochs),
                 "--trainer.callbacks+", interrupt, cwd=cwd)
    assert first.returncode == 0, first.stderr
    interrupted = torch.load(cwd / "checkpoints/split/last.ckpt", map_location="cpu", weights_only=True)
    resumed = xvlm("fit", "--config", config, "--run", "split", "--trainer.max_epochs", str(epochs),
                   "--ckpt_path", "last", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    return straight, interrupted
