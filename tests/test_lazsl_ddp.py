"""The LaZSL callback's metrics under DDP: two CPU processes log what one process logs on the whole validation set."""

import lightning as L
import pytest
import torch
from test_lazsl import _datamodule

from xvlm.methods import CLIPFineTune
from xvlm.zeroshot import LaZSL

KEYS = ("unseen_top1", "unseen_top1_micro", "dclip_unseen_top1", "dclip_unseen_top1_micro", "wca_unseen_top1",
        "wca_unseen_top1_micro")


def _validate(module: CLIPFineTune, **trainer_args) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LaZSL(n_crops=3, scorers=["lazsl", "dclip", "wca"])], **trainer_args)
    trainer.validate(module, _datamodule(val_size=48, batch_size=8))
    return {key: float(trainer.callback_metrics[f"lazsl/{key}"]) for key in KEYS}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_processes_reduce_to_the_single_process_metrics():
    torch.manual_seed(0)
    module = CLIPFineTune(pretrained=None, input_size=32)
    single = _validate(module, devices=1)
    # 48 images, 24 per rank: no sampler padding, so every image is scored exactly once over both ranks
    both = _validate(module, devices=2, strategy="ddp_spawn")
    assert both == pytest.approx(single, abs=1e-6)
