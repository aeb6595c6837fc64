"""SVIP's real-data configs (CUB, AwA2, SUN) train and validate end to end on xlsa17 fixtures at their own precision
(bf16-mixed); ``xvlm explain`` of the Shapes config is in ``test_method_configs.py``."""

import math
from pathlib import Path

import pytest
import yaml
from run_cli import xvlm
from test_method_configs import logged_rows
from test_xlsa_datamodule import write_cub_root, write_xlsa

CONFIGS = Path(__file__).parents[1] / "configs" / "svip"


@pytest.mark.parametrize("dataset", ["cub", pytest.param("awa2", marks=pytest.mark.slow),
                                     pytest.param("sun", marks=pytest.mark.slow)])
def test_real_data_config_trains_and_validates_on_xlsa_fixtures_in_bf16(tmp_path, dataset):
    fixture = write_xlsa(tmp_path, dataset.upper())
    run = yaml.safe_load((CONFIGS / f"{dataset}.yaml").read_text())
    assert run["trainer"]["precision"] == "bf16-mixed"
    data = run["data"]["init_args"]
    data.update(split_root=str(fixture.split_root), image_root=str(fixture.image_root), attribute_names=None,
                image_size=64, batch_size=4, num_workers=0, holdout_fraction=0.25)
    if dataset == "cub":
        data["cub_root"] = str(write_cub_root(fixture, tmp_path))
    run["model"]["init_args"].update(model="xvlm-tiny", pretrained=None, keep=0.75)
    run["trainer"].update(accelerator="cpu", max_epochs=1, limit_train_batches=2, enable_progress_bar=False,
                          enable_model_summary=False, log_every_n_steps=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    fitted = xvlm("fit", "--config", "run.yaml", "--run", dataset, cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    logged = {key: float(value) for row in logged_rows(tmp_path / f"outputs/{dataset}/csv")
              for key, value in row.items() if value and "/" in key}
    for key in ("train/loss", "val/H", "val/H_cal", "val/calibration", "val/zsl"):
        assert math.isfinite(logged[key]), key
    assert ("val/keep_precision" in logged) == (dataset == "cub")  # the birds' boxes are CUB's masks
    assert (tmp_path / "checkpoints" / dataset / "last.ckpt").is_file()
