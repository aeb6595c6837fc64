"""Export a trained module's image and text towers as an open_clip model folder (:mod:`xvlm.hub_folder`).

What is exported is the module's :meth:`~xvlm.methods.base.XVLMModule.zero_shot_encoder` (contract 3 of DESIGN.md):
its open_clip model's state dict under open_clip's names, in ``open_clip_model.safetensors``, with the
architecture's ``model_cfg`` at the towers' image size and the datamodule's evaluation preprocessing in
``open_clip_config.json``. Every other tensor of the module (heads, learned prompt/context vectors, a timm image
tower: the state-dict entries outside ``backbone.clip``) goes beside them, under its state-dict name, into
``xvlm_method_parts.safetensors``: CoOp-style context vectors replace prompt words and cannot be folded into the
text tower's weights. A method's own scoring needs these parts: MSCI's compositional pair scores need its primitive
vocabulary, aggregators, cross-attention stages, fusion weights and disentanglers; its towers alone give the
adapted CLIP features (``encode_image``, ``encode_texts``) that zero-shot scoring uses.

Before anything is written the weights are checked against the model open_clip builds from the config (on the meta
device, nothing allocated): the same names and shapes mean ``open_clip.create_model_and_transforms('local-dir:
<folder>')`` loads the folder, without xvlm; names that differ only by a convolutional stem (``visual.conv1.*``,
``xvlm-tiny``), register/prompt tokens (``visual.register_tokens``) or bottleneck block adapters
(``visual.transformer.resblocks.{i}.adapter_attn.*`` / ``adapter_mlp.*``, MSCI's: nonlinear branches of every
block that no open_clip weight can hold) are written down in the config's ``xvlm`` entry (:mod:`xvlm.hub_folder`)
and the folder loads through ``VisionLanguageModel('local-dir:<folder>')``; any other difference (adapters other
than :class:`~xvlm.backbones.BottleneckAdapter`, which no config entry re-creates) is refused, naming it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from datamodules.transforms import open_clip_preprocess
from xvlm.backbones import CLIP_MEAN, CLIP_STD, TowerChanges, VisionLanguageModel, _silenced_warnings
from xvlm.checkpointing import _umask
from xvlm.hub_folder import CONFIG_FILE, WEIGHTS_FILE, XVLM_KEY
from xvlm.methods.base import XVLMModule
from xvlm.model_card import model_card

PARTS_FILE = "xvlm_method_parts.safetensors"
"""The module's tensors outside the exported towers, under their state-dict names."""
CARD_FILE = "README.md"
"""The model card (the file a model hub shows)."""
TOWERS_PREFIX = "backbone.clip."
"""State-dict prefix of a module's open_clip towers."""
ADAPTER_WEIGHT = re.compile(r"visual\.transformer\.resblocks\.\d+\.adapter_(attn|mlp)\..+")
"""Weights of a block adapter; group 1 is its branch."""


@dataclass(frozen=True)
class TowerExport:
    """The content of an exported folder's config and weights files.

    Attributes:
        config: ``open_clip_config.json``: ``model_cfg``, ``preprocess_cfg`` and, when open_clip cannot build the
            towers, the ``xvlm`` entry of :mod:`xvlm.hub_folder`.
        weights: the open_clip state dict, on the CPU.
        needs_xvlm: why only xvlm loads the folder, or None when open_clip does.
    """

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    needs_xvlm: str | None


def datamodule_preprocess(datamodule: Any, split: str = "val") -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` of the evaluation transform of ``datamodule.dataset(split)``
    (:func:`datamodules.transforms.open_clip_preprocess`); CLIP's statistics with open_clip's default resizing
    when the datamodule serves no dataset with a ``transform``."""
    dataset = datamodule.dataset(split) if callable(getattr(datamodule, "dataset", None)) else None
    transform = getattr(dataset, "transform", None)
    if transform is None:
        return {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    return open_clip_preprocess(transform)


def _open_clip_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the state dict of the model open_clip builds from ``config`` (on the meta device)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(config))
        with torch.device("meta"), _silenced_warnings(True):  # "no weights found": none are wanted here
            model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, device="meta")
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _changed_by(name: str, changes: TowerChanges) -> bool:
    """Whether the weight ``name`` is one that ``changes`` adds or replaces."""
    adapter = ADAPTER_WEIGHT.fullmatch(name)
    return ((changes.conv_stem is not None and name.startswith("visual.conv1."))
            or (changes.registers > 0 and name == "visual.register_tokens")
            or (adapter is not None and getattr(changes, f"adapter_{adapter[1]}") is not None))


def _why_xvlm(changes: TowerChanges) -> str:
    reasons = []
    if changes.conv_stem is not None:
        reasons.append("a convolutional stem instead of the ViT patch embedding")
    if changes.registers:
        reasons.append(f"{changes.registers} register/prompt tokens")
    if changes.has_adapters:
        branches = [name for name, spec in (("attention", changes.adapter_attn), ("MLP", changes.adapter_mlp))
                    if spec is not None]
        reasons.append(f"bottleneck adapters on every block's {' and '.join(branches)} branch (nonlinear branches that "
                       f"no open_clip weight can hold)")
    return "its image tower has " + " and ".join(reasons) + ", which open_clip's configs cannot express"


def tower_export(encoder: VisionLanguageModel, preprocess: dict[str, Any]) -> TowerExport:
    """Config and weights of ``encoder``'s open_clip towers, checked against what open_clip builds from the config
    (module docstring).

    Args:
        encoder: the towers (a module's ``zero_shot_encoder()``); their ``model_name`` is an open_clip architecture
            or a ``hf-hub:``/``local-dir:`` source whose config open_clip reads (from its cache for a hub name).
        preprocess: the ``preprocess_cfg`` to record (:func:`datamodule_preprocess`).

    Raises:
        ValueError: the image tower is not open_clip's, has block adapters that no config re-creates
            (:meth:`~xvlm.backbones.VisionLanguageModel.changes`), or the towers hold weights that neither open_clip's
            model of the config nor xvlm's changes of it (:func:`xvlm.backbones.tower_changes`) have a place for.
    """
    if not encoder.text_aligned_images:
        raise ValueError(f"export needs open_clip towers; model '{encoder.model_name}' has the timm image tower "
                         f"{encoder.image_encoder!r} (a module's zero_shot_encoder() gives its CLIP towers)")
    model_cfg = open_clip.get_model_config(encoder.model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no config for model '{encoder.model_name}'")
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg["vision_cfg"]["image_size"] = encoder.image_size
    config: dict[str, Any] = {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess)}
    weights = {name: tensor.detach().to("cpu", copy=True).contiguous()
               for name, tensor in encoder.clip.state_dict().items()}
    reference = _open_clip_shapes(config)
    differing = sorted(set(weights) ^ set(reference)) + sorted(
        name for name in weights.keys() & reference.keys() if tuple(weights[name].shape) != reference[name])
    if not differing:
        return TowerExport(config, weights, None)
    changes = encoder.changes()
    unplaced = [name for name in differing if not _changed_by(name, changes)]
    if unplaced:
        shown = ", ".join(unplaced[:6]) + (f" and {len(unplaced) - 6} more" if len(unplaced) > 6 else "")
        raise ValueError(f"model '{encoder.model_name}' cannot be exported as an open_clip folder: neither open_clip's "
                         f"model of its config nor xvlm's changes of it have a place for, or other shapes of, the "
                         f"weights {shown}")
    config[XVLM_KEY] = changes.entry()
    return TowerExport(config, weights, _why_xvlm(changes))


def method_parts(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state-dict entries outside its open_clip towers (``backbone.clip.*``), copied to the CPU."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous()
            for name, tensor in module.state_dict().items() if not name.startswith(TOWERS_PREFIX)}


def write_export(folder: str | Path, export: TowerExport, parts: dict[str, torch.Tensor], card: str) -> list[Path]:
    """Write ``export`` (config, weights), the method ``parts`` (if any; a stale parts file is removed) and the model
    ``card`` into ``folder`` (created); return the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / CONFIG_FILE, folder / WEIGHTS_FILE, folder / CARD_FILE]
    written[0].write_text(json.dumps(export.config, indent=2) + "\n", encoding="utf-8")
    _save_tensors(export.weights, written[1])
    written[2].write_text(card, encoding="utf-8")
    parts_path = folder / PARTS_FILE
    if parts:
        _save_tensors(parts, parts_path)
        written.append(parts_path)
    else:
        parts_path.unlink(missing_ok=True)
    return written


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with the permissions of any new file (safetensors makes it private, ``0o600``)."""
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def export_module(module: XVLMModule, datamodule: Any, folder: str | Path, checkpoint: dict[str, Any] | None = None,
                  title: str | None = None) -> tuple[TowerExport, list[Path]]:
    """Export ``module``'s zero-shot towers, its other tensors and a model card (:func:`xvlm.model_card.model_card`)
    into ``folder``; the preprocessing is the evaluation transform of ``datamodule``'s validation split.

    Args:
        module: the trained module, with the datamodule's task attached.
        datamodule: its datamodule (set up).
        folder: where to write (created; existing files of an earlier export are replaced).
        checkpoint: the Lightning checkpoint the weights came from, for the card's metrics.
        title: the model's name in the card; default the folder's name.

    Returns:
        The export and the files written.
    """
    encoder = module.zero_shot_encoder()
    export = tower_export(encoder, datamodule_preprocess(datamodule))
    parts = method_parts(module)
    card = model_card(module, datamodule, checkpoint, image_size=encoder.image_size, needs_xvlm=export.needs_xvlm,
                      has_parts=bool(parts), title=title or Path(folder).name, folder_name=str(folder))
    return export, write_export(folder, export, parts, card)
