"""Pre-emption on every method, as users run it: ``xvlm fit`` subprocesses on each shipped Shapes config (32 px, a
handful of steps), killed or signalled mid-epoch and resumed with ``--ckpt_path last``. A method added to
``xvlm.methods.__all__`` with a ``configs/<method>/shapes.yaml`` is covered without editing this file.

- SIGKILL at a step drawn at random (seeded) inside an epoch: the resumed run ends with bit-identical weights and
  optimiser state, and logs the same metrics, as the uninterrupted run (CPU); the baseline in ``make test``, every
  method in ``make test-all``.
- SLURM: SIGUSR1 mid-epoch with SLURM's environment and a fake ``scontrol`` on ``PATH``: a checkpoint after that
  step, ``scontrol requeue <job id>``, and the requeued job (the same command) finishes with the same weights.
"""

import os
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml
from run_cli import xvlm
from test_method_configs import logged_rows
from test_method_zoo import CONFIGS, cheap, shared_machinery

BATCH, STEPS_PER_EPOCH, EPOCHS, EVERY = 8, 6, 2, 2
TOTAL = STEPS_PER_EPOCH * EPOCHS


def _config(config: Path, folder: Path) -> str:
    run = cheap(config)
    run["seed_everything"] = 0
    run["data"]["init_args"].update(batch_size=BATCH, train_size=BATCH * STEPS_PER_EPOCH)
    run["trainer"].update(max_epochs=EPOCHS)
    (folder / "run.yaml").write_text(yaml.safe_dump(run))
    return "run.yaml"


def _fit(folder: Path, run: str, *extra: str, env: dict[str, str] | None = None):
    return xvlm("fit", "--config", "run.yaml", "--run", run, "--resume_checkpoint.every_n_train_steps", str(EVERY),
                *extra, cwd=folder, env=env)


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _logged(folder: Path, run: str) -> dict[tuple[str, str], str]:
    """``(step, metric) -> value`` over every CSV version of ``run`` (a later version wins)."""
    values = {}
    for row in logged_rows(folder / "outputs" / run / "csv"):
        values |= {(row["step"], key): value for key, value in row.items()
                   if value not in ("", None) and key not in ("step", "epoch")}
    return values


def _assert_same_training(expected: dict, got: dict) -> None:
    assert got["global_step"] == expected["global_step"] == TOTAL
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    for mine, theirs in zip(got["optimizer_states"][0]["state"].values(),
                            expected["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


_STRAIGHT: dict[Path, Path] = {}


def _straight(config: Path, factory: pytest.TempPathFactory) -> Path:
    """The folder of the uninterrupted run of ``config`` (run once per config and test session)."""
    if config not in _STRAIGHT:
        folder = factory.mktemp(f"straight-{config.parent.name}")
        _config(config, folder)
        result = _fit(folder, "straight")
        assert result.returncode == 0, result.stderr[-3000:]
        _STRAIGHT[config] = folder
    return _STRAIGHT[config]


def _steps_inside_epochs(seed: str) -> int:
    """A step inside an epoch whose newest periodic checkpoint is inside an epoch too (drawn with ``seed``)."""
    candidates = [s for s in range(1, TOTAL) if s % STEPS_PER_EPOCH and (s // EVERY * EVERY) % STEPS_PER_EPOCH]
    return random.Random(seed).choice(candidates)


@pytest.mark.parametrize("config", shared_machinery(CONFIGS))
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(config, tmp_path, tmp_path_factory):
    straight = _straight(config, tmp_path_factory)
    step = _steps_inside_epochs(config.parent.name)
    _config(config, tmp_path)
    kill = f'{{"class_path": "interruption.SignalAtStep", "init_args": {{"step": {step}, "signal": "SIGKILL"}}}}'
    killed = _fit(tmp_path, "split", "--trainer.callbacks+", kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_kill = _checkpoint(tmp_path / "checkpoints/split/last.ckpt")
    assert at_kill["global_step"] == step // EVERY * EVERY  # the newest periodic checkpoint, inside an epoch
    assert at_kill["global_step"] % STEPS_PER_EPOCH != 0
    assert not list((tmp_path / "checkpoints/split").glob("*.tmp"))  # nothing half-written left behind

    resumed = _fit(tmp_path, "split", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_training(_checkpoint(straight / "checkpoints/straight/last.ckpt"),
                          _checkpoint(tmp_path / "checkpoints/split/last.ckpt"))
    expected, got = _logged(straight, "straight"), _logged(tmp_path, "split")
    resumed_keys = {key for key in got if int(key[0]) >= at_kill["global_step"]}
    assert any(metric.startswith("val/") for _, metric in resumed_keys)
    assert any(metric.startswith("train/") for _, metric in resumed_keys)
    assert {key: got[key] for key in resumed_keys} == {key: expected[key] for key in resumed_keys}


@pytest.mark.parametrize("config", shared_machinery(CONFIGS))
def test_slurm_preemption_checkpoints_requeues_and_the_requeued_job_finishes_the_run(config, tmp_path,
                                                                                     tmp_path_factory):
    straight = _straight(config, tmp_path_factory)
    _config(config, tmp_path)
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "xvlm-test",
           "SLURM_NODELIST": "localhost"}
    step = 3  # inside the first epoch, between two periodic checkpoints
    warn = f'{{"class_path": "interruption.SignalAtStep", "init_args": {{"step": {step}, "signal": "SIGUSR1"}}}}'
    first = _fit(tmp_path, "job", "--ckpt_path", "last", "--trainer.callbacks+", warn, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting the run from scratch" in first.stderr
    assert calls.read_text().split("\n")[:-1] == ["requeue 4242"]
    saved = _checkpoint(tmp_path / "checkpoints/job/last.ckpt")
    assert saved["global_step"] == step + 1  # the step during which the signal arrived was finished, then saved

    second = _fit(tmp_path, "job", "--ckpt_path", "last", env=env)  # the requeued job: the same command
    assert second.returncode == 0, second.stderr[-3000:]
    assert calls.read_text().split("\n")[:-1] == ["requeue 4242"]  # not requeued again
    _assert_same_training(_checkpoint(straight / "checkpoints/straight/last.ckpt"),
                          _checkpoint(tmp_path / "checkpoints/job/last.ckpt"))
