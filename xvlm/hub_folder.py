"""open_clip's model-hub folder layout: what ``xvlm export`` writes and what a ``local-dir:`` model name reads.

A folder holds ``open_clip_config.json`` with ``model_cfg`` (the architecture, as open_clip's JSON configs spell
it) and ``preprocess_cfg`` (the evaluation preprocessing: ``size``, ``mean``, ``std``, ``interpolation``,
``resize_mode``), and the weights ``open_clip_model.safetensors`` under open_clip's state-dict names: the file
names open_clip's own ``create_model('local-dir:<folder>')`` and ``hf-hub:`` loading look for
(``open_clip.constants``).

Towers that open_clip cannot build from ``model_cfg`` alone carry one more config entry, ``xvlm``::

    "xvlm": {"conv_stem": [32, 64, 128] | null, "register_tokens": R,
             "block_adapters": {"attn": spec | null, "mlp": spec | null} | null}
    spec = {"dim": 64, "scale": 0.1, "dropout": 0.1}

the channels of the convolutional stem that replaces the ViT's patch embedding (``xvlm-tiny``), the number of
register or prompt tokens of the image tower and the :class:`~xvlm.backbones.BottleneckAdapter` of every block's
attention and MLP branch (MSCI's adapters: bottleneck channels, scale, dropout; :mod:`xvlm.backbones`). open_clip
ignores the entry (and then has no place for those weights); :func:`xvlm.backbones.create_clip` builds open_clip's
model of ``model_cfg`` without weights, makes these changes and loads the weights file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.factory import parse_model_name

CONFIG_FILE = HF_CONFIG_NAME
"""``open_clip_config.json``."""
WEIGHTS_FILE = HF_SAFE_WEIGHTS_NAME
"""``open_clip_model.safetensors``: the first weights file open_clip looks for in a folder."""
XVLM_KEY = "xvlm"
"""Config entry of the changes open_clip cannot build (module docstring)."""


def local_folder(model: str) -> Path | None:
    """The folder of a ``local-dir:<folder>`` model name, else None."""
    schema, identifier = parse_model_name(model)
    return Path(identifier) if schema == "local-dir" else None


def xvlm_entry(model: str) -> dict[str, Any] | None:
    """The ``xvlm`` entry of a ``local-dir:`` folder's config, or None (another name, no config file, no entry).

    Raises:
        ValueError: the config file is not valid JSON (the error names it).
    """
    folder = local_folder(model)
    path = None if folder is None else folder / CONFIG_FILE
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"model={model!r}: {path} is not valid JSON ({error})") from None
    return config.get(XVLM_KEY)


def folder_weights(model: str) -> Path:
    """The weights file of a ``local-dir:`` folder; a FileNotFoundError naming it when it is missing."""
    folder = local_folder(model)
    if folder is None:
        raise ValueError(f"model={model!r} is not a local-dir: folder")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model={model!r}: the folder has no weights file {path}; export the model again "
                                f"with `xvlm export`")
    return path
