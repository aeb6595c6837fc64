"""The method configs beyond the zoo-wide check (``test_method_zoo.py``): exact resume of a LICO run, LICO on class
folders with a timm encoder and on CIFAR pickles with a wide ResNet, ``xvlm explain`` of a LICO and an SVIP
checkpoint (SVIP's patch selection, attribute maps and rankings drawn)."""

import csv
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from run_cli import straight_and_resumed, xvlm

from xvlm.explain.render import DPI, MAX_COLUMNS, PANEL_INCHES

CONFIGS = Path(__file__).parents[1] / "configs"
SHRUNK_CALLBACK_ARGS = {"max_batches": 1, "n_crops": 4, "steps": 4, "num_images": 2}


def shrunk(config: Path) -> dict:
    """``config`` with a random-init backbone, tiny data and cheap callbacks; everything else as shipped."""
    run = yaml.safe_load(config.read_text())
    run["model"]["init_args"]["pretrained"] = None
    run["data"]["init_args"].update(batch_size=8, train_size=16, val_size=16)
    run["trainer"].update(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                          log_every_n_steps=1, limit_val_batches=1)
    for callback in run["trainer"].get("callbacks", []):
        args = callback.setdefault("init_args", {})
        args.update({k: v for k, v in SHRUNK_CALLBACK_ARGS.items() if k in args})
    return run


def logged_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("version_*/metrics.csv")):
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    return rows


@pytest.mark.slow  # at an epoch boundary; test_resume.py (make test) kills LICO mid-epoch and checks the same
def test_lico_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    run = shrunk(CONFIGS / "lico" / "shapes.yaml")
    run["trainer"]["callbacks"] = [c for c in run["trainer"]["callbacks"] if c["class_path"].endswith("EpochSummary")]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    straight_and_resumed("run.yaml", epochs=2, stop_after=1, cwd=tmp_path)
    expected, got = (torch.load(tmp_path / f"checkpoints/{name}/last.ckpt", weights_only=True)
                     for name in ("straight", "split"))
    assert got["global_step"] == expected["global_step"] == 4
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    assert any(k.startswith("prompts.") for k in got["state_dict"]) and "mm_log_scale" in got["state_dict"]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name


def test_lico_trains_on_a_class_folder_dataset_with_a_timm_encoder(tmp_path):
    from test_folder_datamodule import write_image_tree

    write_image_tree(tmp_path / "data", colours={"n001": (200, 30, 30), "n002": (30, 200, 30), "n003": (30, 30, 200)},
                     counts={"train": 4, "val": 4})
    (tmp_path / "data/names.json").write_text('{"n001": "red thing", "n002": "green thing", "n003": "blue thing"}')
    run = yaml.safe_load((CONFIGS / "lico" / "imagenet.yaml").read_text())
    run["trainer"] = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                      "log_every_n_steps": 1, "callbacks": run["trainer"]["callbacks"]}
    run["trainer"]["callbacks"][1]["init_args"].update(max_batches=1, steps=4)
    run["model"]["init_args"].update(image_encoder="timm:resnet18", input_size=64, model="xvlm-tiny",
                                     pretrained=None, lr=0.01, warmup_steps=0)
    run["data"]["init_args"].update(root="data", class_names="data/names.json", image_size=64, batch_size=6,
                                    num_workers=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    result = xvlm("fit", "--config", "run.yaml", "--run", "folder", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = logged_rows(tmp_path / "outputs/folder/csv")
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/ce", "train/mm", "train/ot", "val/acc", "saliency/insertion", "saliency/deletion"} <= logged
    assert "saliency/mass_in_mask" not in logged  # class folders carry no masks
    checkpoint = torch.load(tmp_path / "checkpoints/folder/last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["head.weight"].shape == (3, 512)


PANELS = {"lico": 2, "svip": 11, "msci": 12, "ecor": 6}
"""Panels ``xvlm explain`` draws per image: the image and the saliency; SVIP adds its 3 selection maps, its top 4
attribute maps and the attribute and margin rankings; MSCI its 2 x 3 stage attention maps (low/high level x
pair/state/object) and the pair, state, object and level rankings; ECOR its rankings of rationales, of pair
sentences and of the rationales of the predicted and of the true category. ``make test-all`` renders every one;
``make test`` checks every method's ``explain`` output in process (``test_method_zoo``) and the command itself
(``test_explain``)."""


@pytest.mark.slow  # the CLI's explain is tested in make test by test_explain.py; each method's PNG here
@pytest.mark.parametrize("method", sorted(PANELS))
def test_explain_renders_a_checkpoints_maps_as_png_files(tmp_path, method):
    run = shrunk(CONFIGS / method / "shapes.yaml")
    run["trainer"]["callbacks"] = []
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    trained = xvlm("fit", "--config", "run.yaml", "--run", method, "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "1", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = xvlm("explain", "--config", "run.yaml", "--ckpt_path", f"checkpoints/{method}/last.ckpt", "--split",
                  "val", "--num_images", "2", "--out", "overlays", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png")) == ["val_00000.png", "val_00001.png"]
    columns = min(PANELS[method], MAX_COLUMNS)
    rows = math.ceil(PANELS[method] / columns)
    picture = matplotlib.image.imread(tmp_path / "overlays" / "val_00000.png")
    assert picture.shape[:2] == (rows * PANEL_INCHES * DPI, columns * PANEL_INCHES * DPI)


def test_lico_cifar_recipe_trains_a_wide_resnet_on_cifar_pickles(tmp_path):
    from test_cifar_datamodule import NAMES, write_fake_cifar

    write_fake_cifar(tmp_path / "data/cifar", variant="cifar100")
    run = yaml.safe_load((CONFIGS / "lico" / "cifar100.yaml").read_text())
    run["trainer"].update(accelerator="cpu", devices=1, max_epochs=1, precision="32-true", enable_progress_bar=False,
                          log_every_n_steps=1, limit_train_batches=2)
    run["trainer"]["callbacks"][1]["init_args"].update(max_batches=1, steps=4)
    run["model"]["init_args"].update(image_encoder="timm:wrn28_2", model="xvlm-tiny", pretrained=None)
    run["data"]["init_args"].update(batch_size=8, num_workers=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    result = xvlm("fit", "--config", "run.yaml", "--run", "cifar", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = {key for row in logged_rows(tmp_path / "outputs/cifar/csv") for key, value in row.items() if value}
    assert {"train/ot", "train/mm", "val/acc", "saliency/overall"} <= logged
    state = torch.load(tmp_path / "checkpoints/cifar/last.ckpt", weights_only=True)["state_dict"]
    assert state["head.weight"].shape == (len(NAMES), 128)  # WRN-28-2: 128 channels of an 8 x 8 map
    assert state["mapper.3.weight"].shape[0] == 64
