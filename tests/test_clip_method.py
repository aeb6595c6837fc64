import pytest
import torch
import torch.nn.functional as F

from datamodules import ShapesDataModule
from xvlm.methods import CLIPFineTune
from xvlm.methods.clip import text_to_image_loss


def test_text_to_image_loss_matches_a_direct_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g)
    target = torch.tensor([0, 2, 2, 3, 0, 0])
    expected = []
    for c in sorted(set(target.tolist())):
        column = logits[:, c]
        log_prob = column - torch.logsumexp(column, dim=0)
        expected.append(-torch.logsumexp(log_prob[target == c], dim=0))
    logits.requires_grad_(True)
    loss = text_to_image_loss(logits, target)  # class 1 is absent: its column must not count nor poison gradients
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[:, 1], torch.zeros(6))


class _FakeTrainer:
    def __init__(self, datamodule):
        self.datamodule = datamodule


def _module_on(datamodule, **kwargs):
    module = CLIPFineTune(pretrained=None, input_size=32, **kwargs)
    module._trainer = _FakeTrainer(datamodule)
    module.setup("fit")
    return module


def test_training_steps_fit_a_fixed_batch():
    datamodule = ShapesDataModule(image_size=32, batch_size=32, train_size=32, augment=False)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    module = _module_on(datamodule, templates=["a photo of a {}."])
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("negatives", ["seen", "batch"])
def test_image_to_text_loss_matches_a_per_image_loop_over_the_candidate_classes(negatives):
    datamodule = ShapesDataModule(image_size=32)
    module = _module_on(datamodule, templates=["a {}."], symmetric=False, negatives=negatives).eval()
    seen = datamodule.task.seen
    labels = [seen[3], seen[7], seen[3], seen[0], seen[11]]
    batch = {"image": torch.randn(len(labels), 3, 32, 32), "label": torch.tensor(labels)}
    candidates = seen if negatives == "seen" else sorted(set(labels))
    with torch.no_grad():
        loss = module.loss(batch)
        scale = module.backbone.logit_scale.exp()
        image = module.backbone.encode_image(batch["image"])
        text = {c: module.backbone.encode_texts([f"a {datamodule.task.class_names[c]}."])[0] for c in candidates}
    expected = []
    for feature, label in zip(image, labels):
        logits = torch.stack([scale * feature @ text[c] for c in candidates])
        expected.append(torch.logsumexp(logits, 0) - scale * feature @ text[label])
    torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)


def test_an_unknown_negatives_option_is_named():
    with pytest.raises(ValueError, match="negatives='all'"):
        CLIPFineTune(pretrained=None, negatives="all")


def test_unseen_class_in_a_training_batch_is_refused():
    datamodule = ShapesDataModule(image_size=32)
    module = _module_on(datamodule)
    unseen = datamodule.task.unseen[0]
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([datamodule.task.seen[0], unseen])}
    with pytest.raises(ValueError, match="unseen class"):
        module.loss(batch)


def test_class_text_features_average_templates():
    datamodule = ShapesDataModule(image_size=32)
    module = _module_on(datamodule, templates=["a photo of a {}.", "a {}."]).eval()
    with torch.no_grad():
        both = module.class_text_features([0, 1])
        per_template = [module.backbone.encode_texts(module.class_prompts(t, [0, 1])) for t in module.templates]
    torch.testing.assert_close(both, F.normalize(per_template[0] + per_template[1], dim=-1))


def test_setup_without_a_task_names_the_problem():
    module = CLIPFineTune(pretrained=None, input_size=32)
    module._trainer = _FakeTrainer(object())
    with pytest.raises(ValueError, match="needs a datamodule that publishes a Task"):
        module.setup("fit")
