"""Checkpoint helpers shared by every module: class identity, RNG state, and loading weights from other runs."""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CLASS_KEY = "xvlm_class_path"
RNG_KEY = "xvlm_rng_state"


def class_path(obj_or_cls: object) -> str:
    """Importable dotted path of a class (or of an instance's class)."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical_class_path(dotted: str) -> str:
    """The defining module's path of the class ``dotted`` names (``xvlm.methods.CLIPFineTune`` ->
    ``xvlm.methods.clip.CLIPFineTune``); ``dotted`` itself if it cannot be imported."""
    module_name, _, name = dotted.rpartition(".")
    try:
        return class_path(getattr(importlib.import_module(module_name), name))
    except (ImportError, AttributeError, ValueError):
        return dotted


def checkpoint_class_path(checkpoint: dict[str, Any]) -> str | None:
    """The module class a checkpoint was written by, if recorded (by xvlm or by the Lightning CLI)."""
    if CLASS_KEY in checkpoint:
        return checkpoint[CLASS_KEY]
    return checkpoint.get("hyper_parameters", {}).get("_class_path")


def check_checkpoint_class(checkpoint: dict[str, Any], expected: str, source: str = "checkpoint") -> None:
    """Raise if ``checkpoint`` was written by a module class other than ``expected``."""
    found = checkpoint_class_path(checkpoint)
    if found is None:
        return
    found, expected = canonical_class_path(found), canonical_class_path(expected)
    if found != expected:
        raise ValueError(
            f"{source} was written by {found}, but the configured model is {expected}. Resume with the same "
            f"model class, or start from its weights with `--model.init_args.init_weights {source}`."
        )


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, for exact resumption.

    Only tensors and plain Python values, so checkpoints stay loadable with ``torch.load(weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(module: nn.Module, path: str | Path, prefixes: tuple[str, ...] = ("", "backbone.clip.")) -> None:
    """Load the tensors of ``path`` whose names match ``module``'s parameters (start from other weights).

    ``path`` is a Lightning checkpoint (``state_dict`` key) or a plain state dict, read with ``weights_only=True``.
    Names are tried with each of ``prefixes`` prepended (a bare open_clip state dict maps onto
    ``backbone.clip.*``). Fails if no tensor matches or a matching name has another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights: file '{path}' does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = module.state_dict()
    matched: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        for key, value in state.items():
            name = prefix + key
            if name in own and name not in matched:
                if own[name].shape != value.shape:
                    raise ValueError(f"init_weights '{path}': '{key}' has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(own[name].shape)}")
                matched[name] = value
    if not matched:
        raise ValueError(f"init_weights '{path}': no tensor name matches this model; is it an xvlm or open_clip "
                         "checkpoint of the same architecture?")
    module.load_state_dict(matched, strict=False)
