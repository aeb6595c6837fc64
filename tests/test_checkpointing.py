import errno
import os
import random
import re
import stat

import numpy as np
import pytest
import torch
from torch import nn

from xvlm.checkpointing import (
    AtomicCheckpointIO,
    capture_rng_state,
    check_checkpoint_class,
    class_path,
    load_checkpoint_file,
    load_weights,
    newest_loadable_checkpoint,
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


# --------------------------------------------------------------------------------------------- atomic writes
def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((4,), value)}, "epoch": 0}


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), target)
    io.save_checkpoint(_checkpoint(2.0), target)
    assert torch.equal(load_checkpoint_file(target)["state_dict"]["w"], torch.full((4,), 2.0))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # readable by the team, as any new file


class _FullDisk(AtomicCheckpointIO):
    """Writes half the checkpoint, then fails as a full disk does."""

    def write(self, checkpoint, file):
        file.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), target)
    before = target.read_bytes()
    with pytest.raises(OSError, match=r"could not write checkpoint .*last\.ckpt: the disk is full; the previous file"):
        _FullDisk().save_checkpoint(_checkpoint(2.0), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# --------------------------------------------------------------------------------------------- --ckpt_path last
def test_newest_loadable_checkpoint_skips_truncated_and_foreign_files_without_deleting_them(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({**_checkpoint(1.0), "xvlm_class_path": "xvlm.methods.clip.CLIPFineTune"}, tmp_path / "a.ckpt")
    io.save_checkpoint({**_checkpoint(2.0), "xvlm_class_path": "xvlm.methods.lico.LICO"}, tmp_path / "b.ckpt")
    io.save_checkpoint({**_checkpoint(3.0), "xvlm_class_path": "xvlm.methods.clip.CLIPFineTune"}, tmp_path / "c.ckpt")
    good = (tmp_path / "c.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(good[: len(good) // 2])  # killed mid-write by a non-atomic writer
    for age, name in enumerate(["last.ckpt", "c.ckpt", "b.ckpt", "a.ckpt"]):
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))
    reports = []
    assert newest_loadable_checkpoint(tmp_path, "xvlm.methods.clip.CLIPFineTune", reports.append) == tmp_path / "c.ckpt"
    assert len(reports) == 1 and re.search(r"skipping .*last\.ckpt: checkpoint .* cannot be loaded", reports[0])
    os.utime(tmp_path / "b.ckpt", (2e9, 2e9))  # newest, but written by LICO
    with pytest.warns(UserWarning, match=r"skipping .*b\.ckpt: .*written by xvlm\.methods\.lico\.LICO"):
        assert newest_loadable_checkpoint(tmp_path, "xvlm.methods.clip.CLIPFineTune") == tmp_path / "c.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt", "c.ckpt", "last.ckpt"]
    assert newest_loadable_checkpoint(tmp_path / "missing") is None


def test_a_truncated_checkpoint_is_an_error_naming_it(tmp_path):
    path = tmp_path / "cut.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint .*cut\.ckpt cannot be loaded .* truncated"):
        load_checkpoint_file(path)
    (tmp_path / "plain.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"plain\.pt cannot be loaded"):
        load_checkpoint_file(tmp_path / "plain.pt")
