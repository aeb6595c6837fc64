"""Every method's training step, as the Trainer runs it with the shipped Shapes config, reads nothing back from the
device and tokenizes nothing (issue: no host syncs in training steps).

The check (:func:`xvlm.host_sync.record_host_syncs`) runs from the start of the second training batch (after the
host-side preparation of the batch, :meth:`~xvlm.methods.base.XVLMModule.prepare_training_batch`) to the optimizer
step: the step's forward pass, its ``self.log`` calls and the backward pass. The first batch builds what is built once
per task (prompt token ids).
"""

import importlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import ShapesDataModule
from xvlm.host_sync import record_host_syncs

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/shapes.yaml"))


def shipped(config: Path, **overrides) -> tuple[L.LightningModule, ShapesDataModule]:
    """The module of ``config``'s ``model`` section (with ``overrides``) and its Shapes datamodule, small."""
    spec = yaml.safe_load(config.read_text())
    module_path, name = spec["model"]["class_path"].rsplit(".", 1)
    module = getattr(importlib.import_module(module_path), name)(**{**spec["model"]["init_args"], **overrides})
    data = ShapesDataModule(**{**spec["data"]["init_args"], "batch_size": 8, "train_size": 16, "val_size": 8})
    return module, data


class StepRecorder(L.Callback):
    """Record host syncs and tokenizer calls of the second training batch, up to its optimizer step (on a GPU also
    under CUDA's sync debug mode, which raises at a synchronising call)."""

    def __init__(self) -> None:
        self.syncs: list = []
        self.tokenized = 0
        self._recording = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            tokenizer = pl_module.backbone.tokenizer

            def counted(*args, **kwargs):
                self.tokenized += self._recording is not None
                return tokenizer(*args, **kwargs)

            pl_module.backbone.tokenizer = counted
        if batch_idx == 1:
            self._recording = record_host_syncs()
            self.syncs = self._recording.__enter__()
            if pl_module.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")  # CUDA's own check: a synchronising call raises

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._recording is not None:
            if pl_module.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            self._recording.__exit__(None, None, None)
            self._recording = None


def train_two_steps(module: L.LightningModule, data: ShapesDataModule, accelerator: str = "cpu") -> StepRecorder:
    recorder = StepRecorder()
    trainer = L.Trainer(accelerator=accelerator, max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, data)
    return recorder


@pytest.mark.parametrize("config", CONFIGS, ids=[c.parent.name for c in CONFIGS])
def test_training_step_of_the_shipped_config_never_waits_for_the_device_nor_tokenizes(config):
    recorder = train_two_steps(*shipped(config))
    assert recorder.tokenized == 0
    if config.parent.name == "lico":  # Sinkhorn's stopping flag: read every ot_check_every iterations, nothing else
        assert recorder.syncs and all("xvlm/ot.py" in sync.where for sync in recorder.syncs), recorder.syncs
        assert len(recorder.syncs) <= 6  # the pre-loop read and one per 10 of about 20-30 iterations
    else:
        assert recorder.syncs == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own check needs a GPU")
@pytest.mark.parametrize("config", CONFIGS, ids=[c.parent.name for c in CONFIGS])
def test_cuda_reports_no_synchronisation_in_the_training_step(config):
    overrides = {"ot_check_every": 0, "ot_max_iter": 30} if config.parent.name == "lico" else {}
    recorder = train_two_steps(*shipped(config, **overrides), accelerator="gpu")
    assert recorder.syncs == []


def test_lico_without_stopping_reads_never_waits():
    lico = next(c for c in CONFIGS if c.parent.name == "lico")
    recorder = train_two_steps(*shipped(lico, ot_check_every=0, ot_max_iter=30))
    assert recorder.syncs == [] and recorder.tokenized == 0


def test_the_recorder_finds_the_reads_a_step_must_not_make():
    x = torch.randn(6)
    with record_host_syncs() as syncs:
        x.sum().item()
        bool((x > 0).any())
        x.tolist()
        x[x > 0]
        x.unique()
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.argmax()  # stays on the device
    assert [s.op for s in syncs] == ["aten._local_scalar_dense.default"] * 2 + [
        "Tensor.tolist", "aten.index.Tensor", "aten._unique2.default",
        "aten.repeat_interleave.Tensor without output_size"]
    assert all(s.where.startswith(__file__) for s in syncs)
