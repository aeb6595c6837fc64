"""The speed paths users switch on give the loss and gradients of the plain float32 path, for every method with its
shipped Shapes config: Lightning's ``bf16-mixed`` and ``16-mixed`` precision, ``compile`` and fused optimisers."""

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from test_host_syncs import shipped

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/shapes.yaml"))
IDS = [c.parent.name for c in CONFIGS]


def loss_and_gradients(module, batch, context=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's training loss of ``batch`` (seed 0 for its dropout and template draws) and the flat float32
    gradient of its trainable parameters, the forward pass inside ``context`` (a precision plugin's)."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss_of = module.loss if hasattr(module, "loss") else (lambda b: module.losses(b)["loss"])
    if context is None:
        loss = loss_of(batch)
    else:
        with context:
            loss = loss_of(batch)
    loss.backward()
    grads = [p.grad.float().flatten() for p in module.parameters() if p.requires_grad and p.grad is not None]
    return loss.detach().float(), torch.cat(grads)


def prepared(config: Path, **overrides):
    """The module of ``config`` (with ``overrides``) on its task, in training mode, and its first training batch
    (the same batch on every call), prepared as the Trainer prepares it."""
    torch.manual_seed(0)
    module, data = shipped(config, **overrides)
    data.setup("fit")
    module.attach_task(data.task)
    batch = module.prepare_training_batch(next(iter(data.train_dataloader())))
    return module.train(), batch


@pytest.mark.parametrize(("config", "precision"), [
    pytest.param(c, p, id=f"{c.parent.name}-{p}", marks=pytest.mark.slow if p == "16-mixed" and c.parent.name != "clip"
                 else ()) for c in CONFIGS for p in ("bf16-mixed", "16-mixed")])
def test_mixed_precision_step_matches_the_float32_step(config, precision):
    module, batch = prepared(config)
    loss, grads = loss_and_gradients(module, batch)
    mixed_loss, mixed_grads = loss_and_gradients(module, batch, MixedPrecision(precision, "cpu").forward_context())
    assert mixed_loss.dtype == torch.float32 and torch.isfinite(mixed_grads).all()
    tolerance = 0.03 if precision == "bf16-mixed" else 0.005  # bfloat16 keeps 8 bits of mantissa, float16 11
    assert abs(mixed_loss - loss) <= tolerance * loss.abs().clamp_min(1)
    assert torch.nn.functional.cosine_similarity(mixed_grads, grads, dim=0) > 1 - tolerance


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_compiled_towers_give_the_plain_loss_and_gradients(config):
    plain, batch = prepared(config)
    compiled, _ = prepared(config, compile={"backend": "eager"})
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    compiled.load_state_dict(plain.state_dict())
    loss, grads = loss_and_gradients(plain, batch)
    compiled_loss, compiled_grads = loss_and_gradients(compiled, batch)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grads, grads, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_clip_step_matches_the_plain_step():
    clip = next(c for c in CONFIGS if c.parent.name == "clip")
    plain, batch = prepared(clip)
    compiled, _ = prepared(clip, compile=True)
    compiled.load_state_dict(plain.state_dict())
    loss, grads = loss_and_gradients(plain, batch)
    compiled_loss, compiled_grads = loss_and_gradients(compiled, batch)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(compiled_grads, grads, dim=0) > 0.9999


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.parent.name in ("clip", "ecor", "svip")],
                         ids=["clip (AdamW)", "ecor (SGD)", "svip (Adam)"])
def test_fused_optimizer_takes_the_steps_of_the_plain_one(config):
    results = []
    for fused in (False, True):
        module, batch = prepared(config, fused_optimizer=fused)
        torch.manual_seed(0)
        optimizer = module.build_optimizer()
        assert all(group["fused"] == fused for group in optimizer.param_groups)
        for _ in range(2):
            loss_and_gradients(module, batch)
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad]))
    # Adam's step g / (sqrt(v) + 1e-8) rounds differently where |g| is near 1e-8: a few elements in 10,000 differ
    agree = torch.isclose(results[1], results[0], rtol=1e-5, atol=1e-7)
    assert agree.float().mean() > 0.999 and (results[1] - results[0]).abs().max() < 1e-3


@pytest.mark.parametrize("flag, expected", [((), "high"), (("--float32_matmul_precision", "highest"), "highest")])
def test_the_cli_sets_the_float32_matmul_precision_before_building(tmp_path, monkeypatch, flag, expected):
    from test_cli import TINY_RUN

    from xvlm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_RUN))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        main(["validate", "--config", "tiny.yaml", *flag])
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(previous)
