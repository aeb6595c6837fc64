"""End-to-end runs of the ``xvlm`` command as a user would type it (subprocesses, 32-px Shapes, CPU)."""

import csv
import os
from pathlib import Path

import pytest
import torch
import yaml
from run_cli import straight_and_resumed, xvlm

from xvlm.cli import main

TINY_RUN = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "callbacks": [{"class_path": "xvlm.callbacks.EpochSummary"}],
    },
    "model": {
        "class_path": "xvlm.methods.CLIPFineTune",
        "init_args": {"model": "xvlm-tiny", "pretrained": None, "input_size": 32, "lr": 1e-3, "warmup_steps": 2},
    },
    "data": {
        "class_path": "datamodules.ShapesDataModule",
        "init_args": {"image_size": 32, "batch_size": 8, "train_size": 24, "val_size": 16},
    },
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY_RUN))
    return folder


@pytest.mark.slow  # make test keeps the stronger mid-epoch SIGKILL resume of test_resume (weights, optimiser, logs)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(workdir):
    straight, interrupted = straight_and_resumed("tiny.yaml", epochs=3, stop_after=2, cwd=workdir)
    assert (interrupted["epoch"], interrupted["global_step"]) == (1, 6)

    expected = torch.load(workdir / "checkpoints/straight/last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(workdir / "checkpoints/split/last.ckpt", map_location="cpu", weights_only=True)
    assert got["epoch"] == expected["epoch"] == 2
    assert got["global_step"] == expected["global_step"] == 9
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    moment = next(iter(expected["optimizer_states"][0]["state"].values()))["exp_avg"]
    assert torch.equal(next(iter(got["optimizer_states"][0]["state"].values()))["exp_avg"], moment)
    # The third epoch did change the weights, so their equality above is not trivial.
    assert not all(torch.equal(interrupted["state_dict"][k], v) for k, v in expected["state_dict"].items())

    # Every epoch printed its evaluation line, and logs of both halves of the run were kept.
    assert straight.stdout.count("val/U ") == 3 and "Checkpoints: checkpoints/straight/" in straight.stdout
    assert "Logs:        outputs/straight/csv/version_0/" in straight.stdout
    rows = []
    for path in sorted((workdir / "outputs/split/csv").glob("version_*/metrics.csv")):
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    assert {row["epoch"] for row in rows if row.get("val/U")} == {"0", "1", "2"}


@pytest.fixture(scope="module")
def existing_run(workdir) -> Path:
    """``last.ckpt`` of run ``existing``: one epoch of ``tiny.yaml``, fitted by the CLI in this process."""
    here = os.getcwd()
    os.chdir(workdir)
    try:
        main(["fit", "--config", "tiny.yaml", "--run", "existing", "--trainer.max_epochs", "1"])
    finally:
        os.chdir(here)
    return workdir / "checkpoints/existing/last.ckpt"


def test_a_fresh_fit_does_not_overwrite_an_existing_run(workdir, existing_run):
    before = existing_run.read_bytes()
    again = xvlm("fit", "--config", "tiny.yaml", "--run", "existing", "--trainer.max_epochs", "1", cwd=workdir)
    assert again.returncode != 0
    assert "run 'existing' already has checkpoints" in again.stderr and "--ckpt_path last" in again.stderr
    assert existing_run.read_bytes() == before


def test_checkpoint_of_another_model_class_is_refused(workdir, existing_run, tmp_path):
    ckpt = existing_run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["xvlm_class_path"] = "xvlm.methods.lico.LICO"
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    result = xvlm("fit", "--config", "tiny.yaml", "--run", "foreign", "--ckpt_path", str(foreign), cwd=workdir)
    assert result.returncode != 0
    assert "xvlm.methods.lico.LICO" in result.stderr and "xvlm.methods.clip.CLIPFineTune" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "named"),
    [  # an unknown key and a wrong type in a config file: test_faults.py (in make test) names the file too
        pytest.param(("--model.init_args.lerning_rate", "0.1"), "lerning_rate", marks=pytest.mark.slow),
        pytest.param(("--data.init_args.batch_size", "many"), "batch_size", marks=pytest.mark.slow),
        (("--config", "missing.yaml"), "missing.yaml"),
        (("--model.init_args.model", "ViT-Q-99"), "ViT-Q-99"),
        pytest.param(("--model.init_args.pretrained", "nowhere/weights.pt"), "nowhere/weights.pt",
                     marks=pytest.mark.slow),
    ],
)
def test_config_errors_name_the_bad_key_without_a_traceback(workdir, override, named):
    result = xvlm("fit", "--config", "tiny.yaml", *override, "--trainer.max_epochs", "1", cwd=workdir)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_print_config_shows_every_method_hyper_parameter(workdir):
    result = xvlm("fit", "--config", "tiny.yaml", "--print_config", cwd=workdir)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    init_args = config["model"]["init_args"]
    assert {"model", "pretrained", "freeze", "init_weights", "templates", "lr", "weight_decay", "symmetric"} <= set(
        init_args
    )
    assert config["best_checkpoint"]["monitor"] == "val/H"
    assert config["resume_checkpoint"]["save_last"] is True
