import random

import numpy as np
import pytest
import torch
from torch import nn

from xvlm.checkpointing import (
    capture_rng_state,
    check_checkpoint_class,
    class_path,
    load_weights,
    restore_rng_state,
)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_checkpoint_of_another_class_is_refused_naming_both():
    checkpoint = {"hyper_parameters": {"_class_path": "xvlm.methods.lico.LICO"}}
    with pytest.raises(ValueError, match=r"xvlm\.methods\.lico\.LICO.*xvlm\.methods\.clip\.CLIPFineTune"):
        check_checkpoint_class(checkpoint, "xvlm.methods.clip.CLIPFineTune", source="run.ckpt")
    check_checkpoint_class(checkpoint, "xvlm.methods.lico.LICO")


def test_re_exported_and_defining_paths_of_one_class_match():
    checkpoint = {"xvlm_class_path": "xvlm.methods.clip.CLIPFineTune"}
    check_checkpoint_class(checkpoint, "xvlm.methods.CLIPFineTune")
    with pytest.raises(ValueError, match=r"configured model is xvlm\.methods\.base\.XVLMModule"):
        check_checkpoint_class(checkpoint, "xvlm.methods.XVLMModule")


def test_class_path_names_the_defining_module():
    assert class_path(nn.Linear) == "torch.nn.modules.linear.Linear"


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.clip = nn.Linear(3, 2)
        self.head = nn.Linear(2, 2)


def test_load_weights_from_a_lightning_checkpoint_and_from_a_bare_state_dict(tmp_path):
    source, target = _Net(), _Net()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "run.ckpt")
    load_weights(target, tmp_path / "run.ckpt")
    assert torch.equal(target.head.weight, source.head.weight)

    bare, fresh = nn.Linear(3, 2), _Net()
    torch.save(bare.state_dict(), tmp_path / "clip.pt")
    load_weights(fresh, tmp_path / "clip.pt")
    assert torch.equal(fresh.backbone.clip.weight, bare.weight)


def test_load_weights_rejects_files_that_do_not_fit(tmp_path):
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="no tensor name matches"):
        load_weights(_Net(), tmp_path / "foreign.pt")
    torch.save({"head.weight": torch.zeros(5, 5)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(5, 5\)"):
        load_weights(_Net(), tmp_path / "shape.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(_Net(), tmp_path / "missing.pt")
