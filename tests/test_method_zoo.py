"""Every method, through its shipped Shapes config, on 32-px Shapes with a handful of steps (the timm habit: one
cheap check across the whole zoo). A method added to ``xvlm.methods.__all__`` with a ``configs/<method>/shapes.yaml``
is covered without editing this file.

Per config, through the ``xvlm`` CLI in this process: ``fit``, ``--ckpt_path last`` resume, ``validate`` of the
checkpoint (every logged metric finite, accuracies in [0, 1]); then the checkpoint's ``explain`` gives a finite map
of the image size per image and its ``zero_shot_encoder()`` (when it has one) scores the unseen classes (every
class of a task without unseen ones) with LaZSL.
"""

import importlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_method_configs import logged_rows

import xvlm.methods
from datamodules import ShapesDataModule
from xvlm.cli import main
from xvlm.methods import XVLMModule
from xvlm.zeroshot import LaZSLSettings, descriptor_sentences, encode_descriptors, score_images

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/shapes.yaml"))
SIDE = 32
CHEAP_CALLBACKS = {"max_batches": 1, "n_crops": 4, "steps": 4, "num_images": 2}
RATES = ("val/", "lazsl/", "saliency/")
SETTINGS = ("/calibration", "w_pair", "w_primitive", "/ow_threshold")
"""Logged choices (a score offset, inference weights, a feasibility threshold), not rates."""
CALLBACK_KEYS = {"LaZSL": "lazsl/", "SaliencyEvaluation": "saliency/"}
#: Keys a shipped config is known to log, beyond what every method and its callbacks log (checked when present).
KNOWN_KEYS = {
    "clip": {"val/H", "val/zsl", "val/H_cal", "val/calibration", "lazsl/H", "train/loss"},
    "lico": {"val/acc", "val/seen_top1", "train/ce", "train/mm", "train/ot", "saliency/insertion",
             "saliency/deletion", "saliency/overall", "saliency/mass_in_mask", "saliency/pointing",
             "lazsl/unseen_top1"},
    "ecor": {"val/RR", "val/RW", "val/WR", "val/WW", "val/compat_RR", "val/acc", "train/category", "train/rationale",
             "lazsl/S"},
    "msci": {"val/czsl_auc", "val/czsl_hm", "val/best_seen", "val/best_unseen", "val/state_acc", "val/object_acc",
             "val/ow_czsl_auc", "val/ow_threshold", "val/w_pair", "train/pair", "train/state", "train/object",
             "lazsl/unseen_top1"},
    "svip": {"val/H", "val/H_cal", "val/calibration", "val/keep_precision", "val/keep_precision_random",
             "train/ce_a", "train/ce_b", "train/div", "train/patch", "train/dec", "lazsl/unseen_top1"},
}


def shared_machinery(configs: list[Path]) -> list:
    """``configs`` as parameters of a check of machinery every method shares (the CLI's signals, the loaders'
    positions, resuming across process counts, two-process metrics): the baseline's (``clip``) runs in ``make test``,
    every method's in ``make test-all`` (marked slow)."""
    return [pytest.param(c, id=c.parent.name, marks=() if c.parent.name == "clip" else pytest.mark.slow)
            for c in configs]


def method_classes() -> list[type]:
    """The concrete methods ``xvlm.methods`` exports (the base template excluded)."""
    classes = [getattr(xvlm.methods, name) for name in xvlm.methods.__all__]
    return [c for c in classes if isinstance(c, type) and issubclass(c, XVLMModule) and c is not XVLMModule]


def class_of(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def cheap(config: Path) -> dict:
    """``config`` at 32 px with random weights, 16 images and cheap callbacks; everything else as shipped."""
    run = yaml.safe_load(config.read_text())
    run["model"]["init_args"].update(pretrained=None, input_size=SIDE)
    run["data"]["init_args"].update(image_size=SIDE, batch_size=8, train_size=16, val_size=16, num_workers=0)
    run["trainer"].update(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                          enable_model_summary=False, log_every_n_steps=1, limit_val_batches=1)
    for callback in run["trainer"].get("callbacks", []):
        args = callback.setdefault("init_args", {})
        args.update({k: v for k, v in CHEAP_CALLBACKS.items() if k in args})
    return run


def test_every_method_has_a_shapes_config():
    configured = {class_of(yaml.safe_load(c.read_text())["model"]["class_path"]) for c in CONFIGS}
    assert method_classes(), "xvlm.methods exports no method"
    missing = [c.__name__ for c in method_classes() if c not in configured]
    assert not missing, f"methods without a configs/<method>/shapes.yaml: {missing}"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.parent.name for c in CONFIGS])
def test_method_fits_resumes_validates_explains_and_scores_zero_shot(tmp_path, config, monkeypatch):
    run = cheap(config)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    one_step = ("--config", "run.yaml", "--run", "zoo", "--trainer.limit_train_batches", "1")
    monkeypatch.chdir(tmp_path)  # the CLI in process: a subprocess would spend ~8 s importing for each command
    main(["fit", *one_step])
    main(["fit", *one_step, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    last = tmp_path / "checkpoints/zoo/last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 2)  # the resume went on from step 1
    for name, tensor in checkpoint["state_dict"].items():
        assert not tensor.is_floating_point() or bool(tensor.isfinite().all()), name
    main(["validate", "--config", "run.yaml", "--run", "zoo-val", "--ckpt_path", str(last)])

    rows = logged_rows(tmp_path / "outputs/zoo/csv") + logged_rows(tmp_path / "outputs/zoo-val/csv")
    logged = {key: float(value) for row in rows for key, value in row.items() if value and "/" in key}
    callbacks = [c["class_path"].rpartition(".")[2] for c in run["trainer"].get("callbacks", [])]
    prefixes = {"val/", "train/"} | {CALLBACK_KEYS[name] for name in callbacks if name in CALLBACK_KEYS}
    assert all(any(key.startswith(prefix) for key in logged) for prefix in prefixes), (prefixes, sorted(logged))
    assert KNOWN_KEYS.get(config.parent.name, set()) <= set(logged)
    for key, value in logged.items():
        assert math.isfinite(value), key
        if key.startswith(RATES) and not key.endswith(SETTINGS):
            assert 0.0 <= value <= 1.0, (key, value)

    module_class = class_of(run["model"]["class_path"])
    module = module_class(**run["model"]["init_args"])
    datamodule = ShapesDataModule(**run["data"]["init_args"])
    datamodule.setup("validate")
    module.attach_task(datamodule.task)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    batch = next(iter(datamodule.val_dataloader()))
    explanation = module.explain(batch)
    assert explanation["saliency"].shape == (len(batch["image"]), SIDE, SIDE)
    assert bool(explanation["saliency"].isfinite().all())
    assert explanation["logits"].shape == (len(batch["image"]), datamodule.task.num_classes)

    encoder = module.zero_shot_encoder()
    if encoder is None:
        return
    task = datamodule.task
    scored = task.unseen or range(task.num_classes)  # a task without unseen classes: every class
    names = [task.class_names[k] for k in scored]
    sentences, mask = descriptor_sentences(names, task.descriptors)
    settings = LaZSLSettings(n_crops=4)
    with torch.no_grad():
        text = encode_descriptors(encoder, sentences, mask)
        out = score_images(encoder, batch["image"], batch["index"], text, mask, settings)
    assert out.scores.shape == (len(batch["image"]), len(names))
    assert bool(out.scores.isfinite().all()) and bool(out.dclip_scores.isfinite().all())
