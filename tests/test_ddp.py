"""Every method on two CPU processes (``strategy: ddp``, gloo) as users run it: ``xvlm`` subprocesses on each shipped
Shapes config (32 px). A method added to ``xvlm.methods.__all__`` with a ``configs/<method>/shapes.yaml`` is covered
without editing this file.

- ``xvlm validate`` of the shipped Shapes backbone on 1 and on 2 processes logs the same metrics (every metric over
  the whole validation set, 15 images: unequal shards, no sample counted twice): the baseline in ``make test``, every
  method in ``make test-all`` (the CZSL, doubly-right and LaZSL metrics' own two-process reductions are in
  ``make test``: ``test_czsl_metrics``, ``test_rationale_metrics``, ``test_lazsl_ddp``);
- a run pre-empted on 2 processes (SIGTERM to rank 0 only: the ranks agree to stop after the same step) resumes
  on 1 process, and a 1-process run resumes on 2, each continuing the interrupted epoch with the samples the
  interrupted run had not consumed.
"""

from pathlib import Path

import lightning as L
import pytest
import yaml
from run_cli import xvlm
from test_method_configs import logged_rows
from test_method_zoo import CONFIGS, cheap, class_of, shared_machinery
from test_resume import _checkpoint

from xvlm.backbones import VisionLanguageModel
from xvlm.shapes_pretraining import checkpoint_root

BATCH, TRAIN, VAL = 4, 24, 15
TWO = ("--trainer.devices", "2", "--trainer.strategy", "ddp")


def _write_config(config: Path, folder: Path, pretrained: bool = False) -> None:
    """``config`` for one epoch of 24 training images in batches of 4, LaZSL on the whole validation set of 15
    images (no batch limits; the saliency evaluation reads the same images on every rank anyway); ``pretrained``:
    with the shipped Shapes backbone at its 64 px, whose scores are far from 0 and 1."""
    run = cheap(config)
    run["seed_everything"] = 0
    run["data"]["init_args"].update(batch_size=BATCH, train_size=TRAIN, val_size=VAL)
    if pretrained:
        run["model"]["init_args"].update(pretrained="shapes", input_size=None)
        run["data"]["init_args"].update(image_size=64)
    run["trainer"].update(max_epochs=1, limit_val_batches=None)
    for callback in run["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("LaZSL"):
            callback["init_args"]["max_batches"] = None
    (folder / "ddp.yaml").write_text(yaml.safe_dump(run))


def _rows(folder: Path, run: str) -> list[dict[str, str]]:
    """The CSV rows of every log version of ``run``."""
    return logged_rows(folder / "outputs" / run / "csv")


def _metrics(folder: Path, run: str) -> dict[str, float]:
    """Every value the run logged (the last one per key)."""
    values = {}
    for row in _rows(folder, run):
        values |= {key: float(value) for key, value in row.items()
                   if value not in ("", None) and key not in ("step", "epoch")}
    return values


def _run(folder: Path, command: str, run: str, *extra: str, env: dict[str, str] | None = None):
    result = xvlm(command, "--config", "ddp.yaml", "--run", run, *extra, cwd=folder, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class _Unused(L.Callback):
    """Records the trainable parameters without a gradient after the first backward pass, then stops."""

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.names = [name for name, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]
        trainer.should_stop = True


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.parent.name)
def test_every_trainable_parameter_gets_a_gradient_so_plain_ddp_accepts_the_method(config):
    """``strategy: ddp`` (configs/trainer/ddp.yaml) fails on a trainable parameter the loss never reads."""
    run = cheap(config)
    module = class_of(run["model"]["class_path"])(**run["model"]["init_args"])
    data = class_of(run["data"]["class_path"])(**run["data"]["init_args"])
    unused = _Unused()
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, limit_val_batches=0, callbacks=[unused]).fit(module, data)
    assert unused.names == []


@pytest.mark.parametrize("config", shared_machinery(CONFIGS))
def test_two_processes_log_the_single_process_metrics(config, tmp_path):
    """The shipped Shapes backbone (built once, before the processes start, where every test finds it)."""
    VisionLanguageModel("xvlm-tiny", pretrained="shapes")
    _write_config(config, tmp_path, pretrained=True)
    cache = {"XVLM_CHECKPOINT_DIR": str(checkpoint_root().resolve())}
    _run(tmp_path, "validate", "one", env=cache)
    _run(tmp_path, "validate", "two", *TWO, env=cache)
    one, two = _metrics(tmp_path, "one"), _metrics(tmp_path, "two")
    assert any(key.startswith("val/") for key in one) and any(key.startswith("lazsl/") for key in one)
    assert any(0 < value < 1 for value in one.values())  # fractions, where a per-rank average would show
    assert any(value > 0 for key, value in one.items() if key.startswith("lazsl/"))
    assert set(two) == set(one)
    assert two == pytest.approx(one, abs=1e-5)


def _preempt(step: int, rank: int | None = None) -> str:
    rank_arg = "" if rank is None else f', "rank": {rank}'
    return (f'{{"class_path": "interruption.SignalAtStep", "init_args": {{"step": {step}, "signal": "SIGTERM"'
            f"{rank_arg}}}}}")


def _resume_across(folder: Path, first: tuple[str, ...], then: tuple[str, ...], step: int, rank: int | None) -> None:
    """Pre-empt a run started with ``first`` at ``step`` and resume it with ``then``; check the steps it took."""
    _run(folder, "fit", "run", *first, "--trainer.callbacks+", _preempt(step, rank))
    saved = _checkpoint(folder / "checkpoints/run/last.ckpt")
    assert saved["global_step"] == step + 1  # both ranks finished the step, then one checkpoint was written
    _run(folder, "fit", "run", *then, "--ckpt_path", "last")
    world_after = 2 if "ddp" in then else 1
    finished = _checkpoint(folder / "checkpoints/run/last.ckpt")
    # the interrupted epoch ends at the step count of the new layout, with its validation and checkpoint
    assert (finished["epoch"], finished["global_step"]) == (0, TRAIN // (BATCH * world_after))
    validated = {int(row["epoch"]) for row in _rows(folder, "run")
                 if any(key.startswith("val/") and value for key, value in row.items())}
    assert validated == {0}


@pytest.mark.parametrize("config", shared_machinery(CONFIGS))
def test_a_two_process_run_preempted_on_rank_0_resumes_on_one_process(config, tmp_path):
    _write_config(config, tmp_path)
    _resume_across(tmp_path, TWO, (), step=1, rank=0)


@pytest.mark.slow  # the other direction (2 processes -> 1) runs in make test
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.parent.name)
def test_a_one_process_run_resumes_on_two_processes(config, tmp_path):
    _write_config(config, tmp_path)
    _resume_across(tmp_path, (), TWO, step=1, rank=None)
