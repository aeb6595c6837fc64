"""Each fault of the table in ``docs/cluster.md`` ("Faults and what survives them"), where users meet it: the message
names the file, key or step, and what was written before the fault is intact.

Faults of the ``xvlm`` command run it as a subprocess (32-px Shapes, CPU, a few steps); one run that stops at a NaN
loss (``nan_run``) provides the checkpoints and the run folder the other tests break or must leave alone. Bad image
files and the other data errors are tested in ``test_bad_images.py`` and ``test_folder_datamodule.py``; the one case
they lack, a descriptor file that is not JSON, is here, with ``on_bad_image: skip`` loaders in explanations.
"""

import copy
import json
import math
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from run_cli import xvlm
from test_bad_images import _bad_tree, _good
from test_cli import TINY_RUN
from test_folder_datamodule import _module, write_image_tree
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xvlm.checkpointing import load_checkpoint_file
from xvlm.cli import main
from xvlm.explain.gallery import first_samples
from xvlm.finite_loss import FiniteLoss, NonFiniteLossError

NAN_STEP = 2
"""The global step whose loss is NaN in ``nan_run`` (steps 0 and 1 train; each is checkpointed)."""
EVERY_STEP = ("--resume_checkpoint.every_n_train_steps", "1")


def _callback(name: str, **init_args: object) -> str:
    """``--trainer.callbacks+`` value of the test-only callback ``interruption.<name>``."""
    return json.dumps({"class_path": f"interruption.{name}", "init_args": init_args})


def _contents(folder: Path) -> dict[str, bytes]:
    """File name -> bytes of every file in ``folder``."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _assert_finite(checkpoint: dict) -> None:
    """Every floating-point weight and optimiser state of ``checkpoint`` is finite."""
    tensors = [*checkpoint["state_dict"].values(),
               *(value for state in checkpoint["optimizer_states"][0]["state"].values() for value in state.values())]
    assert all(torch.isfinite(tensor).all() for tensor in tensors if tensor.is_floating_point())


@dataclass
class Run:
    """A finished ``xvlm fit`` subprocess: its working folder (``tiny.yaml``) and its process."""

    folder: Path
    process: subprocess.CompletedProcess

    def checkpoints(self, run: str = "nan") -> Path:
        """The checkpoint folder of ``run`` in :attr:`folder`."""
        return self.folder / "checkpoints" / run


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Run:
    """Run ``nan`` of ``tiny.yaml``: checkpointed every step, its weights turned NaN as step ``NAN_STEP`` starts."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY_RUN))
    process = xvlm("fit", "--config", "tiny.yaml", "--run", "nan", "--trainer.max_epochs", "1", *EVERY_STEP,
                   "--trainer.callbacks+", _callback("NaNWeightsAtStep", step=NAN_STEP), cwd=folder)
    return Run(folder, process)


# --------------------------------------------------------------------------------------------- NaN or inf loss
def test_a_nan_loss_stops_the_run_naming_the_step_and_the_newest_checkpoint_is_the_last_good_one(nan_run):
    assert nan_run.process.returncode == 1 and "Traceback" not in nan_run.process.stderr
    assert (f"NonFiniteLossError: loss is nan at global step {NAN_STEP} (epoch 0, batch {NAN_STEP}); loss terms of "
            "this step: train/loss nan; non-finite terms: ['train/loss']") in nan_run.process.stderr
    folder = nan_run.checkpoints()
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", f"latest-epoch000-step{NAN_STEP:07d}.ckpt"]
    last = load_checkpoint_file(folder / "last.ckpt")
    periodic = load_checkpoint_file(folder / f"latest-epoch000-step{NAN_STEP:07d}.ckpt")
    assert last["global_step"] == periodic["global_step"] == NAN_STEP
    _assert_finite(last)
    assert all(torch.equal(tensor, periodic["state_dict"][name]) for name, tensor in last["state_dict"].items())


class TwoTerms(L.LightningModule):
    """A linear layer trained on the sum of two logged terms: ``train/a`` (finite) and ``train/b`` (infinite at global
    step ``bad_step``); keeps its weights as they were when that step began."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.bad_step = bad_step
        self.before_bad_step: dict[str, torch.Tensor] = {}
        self.a = math.nan

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.bad_step:
            self.before_bad_step = {name: value.clone() for name, value in self.state_dict().items()}
        a = self.layer(batch[0]).pow(2).mean()
        b = self.layer.weight.pow(2).sum() + 1.0
        if self.global_step == self.bad_step:
            b = b * math.inf
        self.a = float(a.detach())
        self.log_dict({"train/a": a, "train/b": b})
        return a + b

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_finite_loss_names_every_logged_term_and_the_optimizer_never_steps_on_the_bad_batch():
    module = TwoTerms(bad_step=2)
    initial = {name: value.clone() for name, value in module.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[FiniteLoss()])
    data = DataLoader(TensorDataset(torch.randn(16, 2, generator=torch.Generator().manual_seed(0))), batch_size=4)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(module, data)
    assert (f"loss is inf at global step 2 (epoch 0, batch 2); loss terms of this step: train/a {module.a:.6g}, "
            "train/b inf; non-finite terms: ['train/b']") in str(error.value)
    assert not torch.equal(module.before_bad_step["layer.weight"], initial["layer.weight"])  # steps 0 and 1 trained
    for name, value in module.state_dict().items():
        assert torch.equal(value, module.before_bad_step[name]), name


# --------------------------------------------------------------------------------------------- checkpoint faults
def _refused(nan_run: Run, checkpoint: Path) -> subprocess.CompletedProcess:
    """``xvlm fit --ckpt_path <checkpoint>`` (run ``refused``) that must stop before writing anything, leaving the
    file as it was."""
    before = checkpoint.read_bytes()
    result = xvlm("fit", "--config", "tiny.yaml", "--run", "refused", "--ckpt_path", str(checkpoint),
                  cwd=nan_run.folder)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert checkpoint.read_bytes() == before
    assert not nan_run.checkpoints("refused").exists()
    return result


def test_resuming_a_truncated_checkpoint_is_refused_naming_it(nan_run, tmp_path):
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes((nan_run.checkpoints() / "last.ckpt").read_bytes()[:100_000])
    result = _refused(nan_run, truncated)
    assert f"checkpoint {truncated} cannot be loaded" in result.stderr and "truncated" in result.stderr


def test_resuming_a_checkpoint_of_another_backbone_is_refused_naming_both(nan_run, tmp_path):
    checkpoint = load_checkpoint_file(nan_run.checkpoints() / "last.ckpt")
    checkpoint["hyper_parameters"]["model"] = "xvlm-tiny-reg"
    foreign = tmp_path / "reg.ckpt"
    torch.save(checkpoint, foreign)
    result = _refused(nan_run, foreign)
    assert (f"{foreign} was written for the backbone model='xvlm-tiny-reg', but the configured model is "
            "'xvlm-tiny'") in result.stderr


def test_ckpt_path_last_skips_a_truncated_last_ckpt_with_a_warning_and_keeps_it(nan_run):
    """The resumed run is killed as its first step starts, before it writes anything: the files are as it found them,
    and that step is the good checkpoint's (a run from scratch would have written step 1 and 2 checkpoints first)."""
    folder = nan_run.checkpoints("truncated")
    folder.mkdir()
    good = f"latest-epoch000-step{NAN_STEP:07d}.ckpt"
    shutil.copyfile(nan_run.checkpoints() / good, folder / good)
    (folder / "last.ckpt").write_bytes((nan_run.checkpoints() / "last.ckpt").read_bytes()[:100_000])  # the newest
    before = _contents(folder)
    result = xvlm("fit", "--config", "tiny.yaml", "--run", "truncated", "--ckpt_path", "last", *EVERY_STEP,
                  "--trainer.callbacks+", _callback("SignalAtStep", step=NAN_STEP, signal="SIGKILL"),
                  cwd=nan_run.folder)  # warnings are silenced there: the skip is printed, not warned
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    relative = Path("checkpoints/truncated")
    assert f"--ckpt_path last: skipping {relative / 'last.ckpt'}: checkpoint" in result.stderr
    assert "it is truncated" in result.stderr
    assert f"Restored all states from the checkpoint at {relative / good}" in result.stderr
    assert _contents(folder) == before


# --------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_stops_the_run_naming_the_file_and_the_previous_last_ckpt_is_intact(nan_run, tmp_path):
    """The disk fills after three writes: step 0's periodic checkpoint and ``last.ckpt``, step 1's periodic one; step
    1's ``last.ckpt`` fails."""
    config = copy.deepcopy(TINY_RUN)
    snapshot = tmp_path / "before-the-failure"
    config["trainer"]["plugins"] = [{"class_path": "interruption.FullDiskAfterSaves",
                                     "init_args": {"saves": 3, "snapshot": str(snapshot)}}]
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(config))
    result = xvlm("fit", "--config", "full.yaml", "--run", "full", "--trainer.max_epochs", "1", *EVERY_STEP,
                  cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = tmp_path / "checkpoints/full/last.ckpt"
    assert (f"could not write checkpoint {last.resolve()}: the disk is full; the previous file there (if any) is "
            "intact") in result.stderr
    assert _contents(last.parent) == _contents(snapshot)  # nothing changed by the failure, no temporary file left
    checkpoint = load_checkpoint_file(last)
    assert checkpoint["global_step"] == 1
    _assert_finite(checkpoint)


# --------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("model", "lerning_rate", 0.001), ("data", "batch_size", "many")],
    ids=["unknown key", "wrong type"],
)
def test_a_bad_key_in_a_config_file_is_named_with_the_file_and_the_run_is_untouched(nan_run, section, key, value):
    config = copy.deepcopy(TINY_RUN)
    config[section]["init_args"][key] = value
    (nan_run.folder / "bad.yaml").write_text(yaml.safe_dump(config))
    checkpoints, logs = nan_run.checkpoints(), nan_run.folder / "outputs/nan"
    before, logged = _contents(checkpoints), sorted(logs.rglob("*"))
    result = xvlm("fit", "--config", "bad.yaml", "--run", "nan", "--ckpt_path", "last", cwd=nan_run.folder)
    assert result.returncode != 0
    assert "error: in config file bad.yaml:" in result.stderr and key in result.stderr
    assert "Traceback" not in result.stderr
    assert _contents(checkpoints) == before
    assert sorted(logs.rglob("*")) == logged  # no new log version either


# --------------------------------------------------------------------------------------------- data files
def test_a_descriptor_file_that_is_not_json_is_named(tmp_path):
    root = write_image_tree(tmp_path / "data")
    descriptors = tmp_path / "descriptors.json"
    descriptors.write_text('{"ant": ["which is small"],')
    with pytest.raises(ValueError) as error:
        _module(root, descriptors=str(descriptors))
    assert f"ImageFolderDataModule(root={str(root)!r}): descriptors file {descriptors} is not valid JSON" in str(
        error.value)
    assert descriptors.read_text() == '{"ant": ["which is small"],'


# --------------------------------------------------------------------------------------------- on_bad_image: skip
SKIPPED = ["truncated jpeg"]
"""The bad file of the skip-mode tree: ``val/ant/truncated.jpg``, the last sample of the second batch of 4."""


@pytest.mark.filterwarnings("ignore:skipped a sample")
def test_explanation_samples_of_a_skip_mode_loader_leave_out_the_batch_counts(tmp_path):
    root = _bad_tree(tmp_path, SKIPPED)
    indices, labels = _good(SKIPPED)
    samples = first_samples(_module(root, on_bad_image="skip").val_dataloader(), count=len(indices) + 1)
    assert sorted(samples) == ["image", "index", "label", "seen"]
    assert samples["index"].tolist() == indices and samples["label"].tolist() == labels


@pytest.mark.filterwarnings("ignore:skipped a sample")
def test_explain_command_renders_a_skip_mode_split(nan_run, tmp_path, monkeypatch, capsys):
    root = _bad_tree(tmp_path / "data", SKIPPED)
    config = copy.deepcopy(TINY_RUN)
    config["data"] = {"class_path": "datamodules.ImageFolderDataModule",
                      "init_args": {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0,
                                    "augment": False, "on_bad_image": "skip"}}
    (tmp_path / "folder.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["xvlm"])  # main's args only, as the console script passes them
    main(["explain", "--config", "folder.yaml", "--ckpt_path", str(nan_run.checkpoints() / "last.ckpt"),
          "--split", "val", "--num_images", "16", "--out", "out"])
    assert capsys.readouterr().out.strip().endswith("out")
    indices, _ = _good(SKIPPED)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"val_{i:05d}.png" for i in indices]
