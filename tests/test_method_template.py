"""The template of ``xvlm.methods.base``: one evaluation path, parameter groups, ``init_weights`` after the method's
own parts, and methods that do not re-declare the base arguments."""

import inspect

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import xvlm.methods
from datamodules import ShapesDataModule
from xvlm.methods import LICO, CLIPFineTune, XVLMModule


@pytest.fixture(scope="module")
def shapes():
    data = ShapesDataModule(task="attributes", image_size=32, batch_size=8, train_size=16, val_size=24)
    data.setup("fit")
    return data


class Oracle(CLIPFineTune):
    """Classifies by the label it was told: the class of sample ``index`` (a stand-in for any method's head)."""

    def __init__(self, labels: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = labels
        self.calls = 0

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(len(images), self.task.num_classes)
        return logits.index_put_((torch.arange(len(images)), self.labels[: len(images)]), torch.tensor(1.0))


def test_validation_test_and_predict_all_score_classify(shapes):
    batch = next(iter(shapes.val_dataloader()))
    labels = batch["label"].clone()
    wrong = (labels + 1) % shapes.task.num_classes
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1,
                        limit_test_batches=1, limit_predict_batches=1, enable_model_summary=False)
    right = Oracle(labels, pretrained=None, input_size=32)
    (metrics,) = trainer.validate(right, datamodule=shapes, verbose=False)
    assert right.calls == 1
    seen_in_batch = set(labels.tolist()) & set(shapes.task.seen)
    assert seen_in_batch and metrics["val/S"] == 1.0  # every seen class of the batch right: S is 1
    (tested,) = trainer.test(Oracle(wrong, pretrained=None, input_size=32), datamodule=shapes, verbose=False)
    assert tested["test/S"] == 0.0 and tested["test/U"] == 0.0
    shapes.setup("predict")
    module = Oracle(wrong, pretrained=None, input_size=32)
    module.attach_task(shapes.task)
    (predicted,) = trainer.predict(module, DataLoader([batch], batch_size=None))
    assert torch.equal(predicted["prediction"], wrong) and torch.equal(predicted["index"], batch["index"])


def test_a_closed_set_classifier_is_scored_on_seen_images_and_logs_accuracy(shapes):
    module = LICO(pretrained=None, input_size=32, n_ctx=2, mapper_hidden=8)
    module.attach_task(shapes.task)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2,
                        enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=shapes, verbose=False)
    assert "val/acc" in metrics and "val/S" in metrics
    assert "val/U" not in metrics and "val/H" not in metrics  # the head has no unseen classes


def test_init_weights_load_once_after_the_methods_own_parts_exist(shapes, tmp_path):
    source = LICO(pretrained=None, input_size=32, n_ctx=2, mapper_hidden=8)
    source.attach_task(shapes.task)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "source.ckpt")
    copy = LICO(pretrained=None, input_size=32, n_ctx=2, mapper_hidden=8, init_weights=str(tmp_path / "source.ckpt"))
    assert copy.head is None  # nothing to load into yet: loading waits for the task
    copy.attach_task(shapes.task)
    assert torch.equal(copy.head.weight, source.head.weight)
    assert torch.equal(copy.backbone.clip.visual.proj, source.backbone.clip.visual.proj)
    with torch.no_grad():
        copy.head.weight.add_(1.0)  # training moved on; a second attach (validate after fit) must not reload
    copy.attach_task(shapes.task)
    assert torch.equal(copy.head.weight, source.head.weight + 1.0)


def test_head_lr_goes_to_every_added_part_including_block_adapters():
    module = CLIPFineTune(pretrained=None, input_size=32, freeze="image", head_lr=0.5)
    module.backbone.add_block_adapters(attn=lambda width: nn.Linear(width, width), mlp=None)
    groups = module.parameter_groups()
    lr_of = {id(p): g.get("lr") for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(lr_of)  # no parameter in two groups
    adapters = list(module.backbone.adapter_parameters())
    assert adapters and all(lr_of[id(p)] == 0.5 for p in adapters)
    text_weight = module.backbone.clip.transformer.resblocks[0].attn.in_proj_weight
    assert lr_of[id(text_weight)] is None  # the optimiser's lr
    assert id(module.backbone.clip.visual.conv1[0].weight) not in lr_of  # frozen by freeze='image'
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(adapters[0]) in decay and id(adapters[1]) not in decay  # the Linear's weight decays, its bias not


def test_methods_do_not_re_declare_the_base_arguments():
    """A method re-declares a base argument only to give it another default (SVIP's Adam has no weight decay)."""
    base = inspect.signature(XVLMModule.__init__).parameters
    for name in xvlm.methods.__all__:
        method = getattr(xvlm.methods, name)
        if method is XVLMModule:
            continue
        own = inspect.signature(method.__init__).parameters
        same = [arg for arg in set(own) & set(base) - {"self", "kwargs"} if own[arg].default == base[arg].default]
        assert not same, (name, same)
