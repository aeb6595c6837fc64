"""The model card (``README.md``) of an exported folder: what was trained, how to load it, on which classes, and
the validation scores the checkpoint records.

The header and the details are open_clip's own card format (``open_clip.push_to_hf_hub.generate_readme``: the
front matter a model hub reads, ``library_name: open_clip``); then come the validation metrics, the class split
and the config. The metrics are what Lightning stored in the checkpoint: for every ``ModelCheckpoint`` callback
with a monitor, the best score and its file, and the score of this checkpoint (``current_score``); the
checkpoint's epoch and step; the calibrated-stacking ``γ`` chosen on validation when the method has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from open_clip.push_to_hf_hub import generate_readme

from xvlm.checkpointing import class_path
from xvlm.methods.base import CALIBRATION_KEY, XVLMModule


def _number(value: Any) -> float | None:
    """A stored score (tensor or number) as a float, None when absent."""
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def checkpoint_scores(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The monitored scores of a Lightning checkpoint: one ``{monitor, best, best_file, current}`` per
    ``ModelCheckpoint`` state with a monitor (``best_file`` is the file name of its best checkpoint)."""
    rows = []
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("monitor"):
            best_path = state.get("best_model_path")
            rows.append({"monitor": state["monitor"], "best": _number(state.get("best_model_score")),
                         "best_file": Path(best_path).name if best_path else None,
                         "current": _number(state.get("current_score"))})
    return rows


def _metrics_section(checkpoint: dict[str, Any] | None) -> str:
    if checkpoint is None:
        return "No checkpoint was given: the towers are the configured ones, untrained.\n"
    lines = [f"Checkpoint at epoch {checkpoint.get('epoch')}, global step {checkpoint.get('global_step')}.", ""]
    scores = checkpoint_scores(checkpoint)
    if scores:
        lines += ["| monitor | best | best checkpoint | this checkpoint |", "|---|---:|---|---:|"]
        lines += [f"| {row['monitor']} | {_format(row['best'])} | {row['best_file'] or '–'} | "
                  f"{_format(row['current'])} |" for row in scores]
        if any(row["best"] is None for row in scores):
            lines += ["", "–: not recorded in this checkpoint (written before its monitor's update, e.g. the "
                          "`last.ckpt` of an epoch; the run's best checkpoint records it)."]
    else:
        lines.append("The checkpoint records no monitored validation metric.")
    calibration = checkpoint.get(CALIBRATION_KEY)
    if calibration is not None:
        lines += ["", f"Calibrated-stacking offset chosen on validation (`val/calibration`): {float(calibration):.4f}."]
    return "\n".join(lines) + "\n"


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _plain(values: Any) -> Any:
    """Hyper-parameters as plain YAML values (tuples as lists, other objects as their text), without the CLI's
    private entries (``_class_path``)."""
    return json.loads(json.dumps({k: v for k, v in dict(values).items() if not k.startswith("_")}, default=str))


def _usage(folder_name: str, needs_xvlm: str | None) -> str:
    if needs_xvlm is None:
        return ("```python\nimport open_clip\n\n"
                f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{folder_name}')\n"
                f"tokenizer = open_clip.get_tokenizer('local-dir:{folder_name}')\n```\n")
    return (f"open_clip cannot build these towers alone: {needs_xvlm}. Load them with xvlm:\n\n"
            "```python\nfrom xvlm.backbones import VisionLanguageModel\n\n"
            f"towers = VisionLanguageModel('local-dir:{folder_name}').eval()\n```\n")


def model_card(module: XVLMModule, datamodule: Any, checkpoint: dict[str, Any] | None, *, image_size: int,
               needs_xvlm: str | None, has_parts: bool, title: str, folder_name: str) -> str:
    """The card's Markdown (module docstring).

    Args:
        module: the trained module, with its task attached.
        datamodule: the datamodule of its config (class and hyper-parameters are recorded).
        checkpoint: the Lightning checkpoint the weights came from (loaded with ``weights_only``), or None.
        image_size: the input side of the exported towers.
        needs_xvlm: why only xvlm loads the folder, or None when open_clip does.
        has_parts: whether the folder has the method's own tensors (``xvlm_method_parts.safetensors``).
        title: the model's name in the card (the run name).
        folder_name: how the usage snippet names the folder.
    """
    hp, task = module.hparams, module.task
    towers = f"`{hp.model}` (pretrained: `{hp.pretrained}`), image size {image_size}"
    if not module.backbone.text_aligned_images:
        towers += (f"; the module classifies with the timm image tower `{hp.image_encoder}`, so these are the frozen "
                   f"CLIP towers it scores zero-shot with")
    details = {
        "Method": f"`{class_path(module)}`",
        "Towers": towers,
        "Loads with": "open_clip" if needs_xvlm is None else "xvlm",
        "Data": f"`{class_path(datamodule)}`: {task.source}",
        "Classes": f"{task.num_classes}: {len(task.seen)} seen in training, {len(task.unseen)} unseen",
    }
    if has_parts:
        details["Method parts"] = ("`xvlm_method_parts.safetensors`: the module's tensors outside the towers (heads, "
                                   "learned prompt/context vectors, MSCI's primitive vocabulary and cross-attention "
                                   "stages), under their state-dict names. The method's own scoring (e.g. MSCI's "
                                   "compositional pair scores) needs them; the towers alone give its (adapted) CLIP "
                                   "image and text features")
    card = generate_readme({"tags": ("clip", "xvlm", type(module).__name__.lower()), "license": "other",
                            "description": f"Image and text towers fine-tuned with xvlm's `{type(module).__name__}`.",
                            "details": details, "usage": _usage(folder_name, needs_xvlm)}, title)
    names = task.class_names
    split = [f"- seen ({len(task.seen)}): " + ", ".join(names[c] for c in task.seen),
             f"- unseen ({len(task.unseen)}): " + (", ".join(names[c] for c in task.unseen) or "none")]
    config = {"model": {"class_path": class_path(module), "init_args": _plain(hp)},
              "data": {"class_path": class_path(datamodule), "init_args": _plain(getattr(datamodule, "hparams", {}))}}
    return (card + "\n## Validation metrics\n\n" + _metrics_section(checkpoint)
            + "\n## Class split\n\n" + "\n".join(split) + "\n"
            + "\n## Config\n\n```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```\n")
