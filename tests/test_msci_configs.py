"""MSCI's real-data configs (MIT-States, UT-Zappos, C-GQA) hold the spec's recipe (``methods/msci.md`` §4), train
and validate end to end on CZSL fixtures at their own precision (bf16-mixed) without touching the test split, and
``xvlm test`` of the trained checkpoint scores it; a pair file naming a pair without images fails ``xvlm fit`` with
the file and line."""

import math
from pathlib import Path

import pytest
import yaml
from run_cli import xvlm
from test_czsl_datamodule import write_czsl
from test_method_configs import logged_rows

CONFIGS = Path(__file__).parents[1] / "configs" / "msci"

RECIPE = {  # spec methods/msci.md §4, written from the table, not from the configs
    "mit_states": dict(optimizer="adam", lr=1e-4, weight_decay=1e-5, batch_size=64, eval_batch_size=32,
                       max_epochs=20,
                       loss_weights=[1.0, 1.0, 1.0], attr_dropout=0.3, low_layers=4, high_layers=4),
    "ut_zappos": dict(optimizer="adamw", lr=2.5e-4, weight_decay=1e-5, batch_size=48, eval_batch_size=64,
                      max_epochs=15, loss_weights=[1.0, 1.0, 1.0], attr_dropout=0.3, low_layers=3, high_layers=3),
    "cgqa": dict(optimizer="adam", lr=1.25e-5, weight_decay=1e-5, batch_size=48, eval_batch_size=32,
                 max_epochs=15, loss_weights=[1.0, 0.1, 0.1], attr_dropout=0.0, low_layers=4, high_layers=4),
}
SCHEDULE = dict(lr_step=5, lr_gamma=0.5)  # StepLR, step 5 epochs, gamma 0.5 (every dataset)
FINITE = ("train/loss", "val/czsl_auc", "val/czsl_hm", "val/best_seen", "val/best_unseen", "val/state_acc",
          "val/object_acc", "val/ow_czsl_auc", "val/w_pair", "val/ow_threshold")
UNIT = ("val/czsl_auc", "val/czsl_hm", "val/best_seen", "val/best_unseen", "val/state_acc", "val/object_acc",
        "val/ow_czsl_auc")


def _logged(run_dir: Path) -> dict[str, float]:
    """The last value of every ``<prefix>/<name>`` key the CSV logger wrote under ``run_dir`` (all versions)."""
    return {key: float(value) for row in logged_rows(run_dir) for key, value in row.items() if value and "/" in key}


def _shrunk_run(dataset: str, root: Path) -> dict:
    """The shipped config of ``dataset`` on the fixture at ``root``, with the tiny random tower on the CPU."""
    run = yaml.safe_load((CONFIGS / f"{dataset}.yaml").read_text())
    run["data"]["init_args"].update(root=str(root), image_size=32, batch_size=4, eval_batch_size=3, num_workers=0)
    run["model"]["init_args"].update(model="xvlm-tiny", pretrained=None, input_size=32, low_layers=2, high_layers=2,
                                     cal_heads=4)  # xvlm-tiny: joint dimension 128, depth 4
    run["trainer"].update(accelerator="cpu", max_epochs=1, limit_train_batches=2, enable_progress_bar=False,
                          enable_model_summary=False, log_every_n_steps=1)
    return run


@pytest.mark.parametrize("dataset", sorted(RECIPE))
def test_real_data_config_holds_the_recipe(dataset):
    shipped = yaml.safe_load((CONFIGS / f"{dataset}.yaml").read_text())
    assert shipped["trainer"]["precision"] == "bf16-mixed"
    assert shipped["best_checkpoint"]["monitor"] == "val/czsl_auc"
    model, data = shipped["model"]["init_args"], shipped["data"]["init_args"]
    recipe = RECIPE[dataset] | SCHEDULE
    shipped_recipe = {key: model[key] for key in recipe if key in model}
    shipped_recipe.update(batch_size=data["batch_size"], eval_batch_size=data["eval_batch_size"],
                          max_epochs=shipped["trainer"]["max_epochs"])
    assert shipped_recipe.keys() == recipe.keys()
    for key, expected in recipe.items():
        assert shipped_recipe[key] == pytest.approx(expected), key
    assert (model["model"], model["pretrained"], data["image_size"]) == ("ViT-L-14", "openai", 224)


@pytest.mark.slow  # each config's recipe is checked above in make test; the runs take a minute each
@pytest.mark.parametrize("dataset", sorted(RECIPE))
def test_real_data_config_trains_validates_and_tests_on_czsl_fixtures_in_bf16(tmp_path, dataset):
    fixture = write_czsl(tmp_path / "data")  # no feasibility file: "auto" falls back to the text tower's
    run = _shrunk_run(dataset, fixture.root)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    fitted = xvlm("fit", "--config", "run.yaml", "--run", dataset, cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    logged = _logged(tmp_path / f"outputs/{dataset}/csv")
    for key in FINITE:
        assert math.isfinite(logged[key]), (key, logged.get(key))
    for key in UNIT:
        assert 0 <= logged[key] <= 1, (key, logged[key])
    assert not [key for key in logged if key.startswith("test/")]  # training never evaluates the test split
    last = tmp_path / "checkpoints" / dataset / "last.ckpt"
    assert last.is_file()

    tested = xvlm("test", "--config", "run.yaml", "--run", dataset, "--ckpt_path", str(last), cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    logged = _logged(tmp_path / f"outputs/{dataset}/csv")
    for key in ("test/czsl_auc", "test/ow_czsl_auc"):
        assert key in logged and 0 <= logged[key] <= 1, (key, logged.get(key))


@pytest.mark.slow  # one more ``xvlm`` subprocess; test_czsl_datamodule.py checks the message in-process
def test_pair_without_images_fails_fit_naming_the_file_and_line(tmp_path):
    fixture = write_czsl(tmp_path / "data")
    with fixture.pair_file("test").open("a") as file:  # line 5: after the 3 pairs and the trailing blank line
        file.write("Faux.Fur traffic_light\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_shrunk_run("mit_states", fixture.root)))
    fitted = xvlm("fit", "--config", "run.yaml", "--run", "bad", cwd=tmp_path)
    assert fitted.returncode != 0
    for text in (f"{fixture.pair_file('test')}: line 5", "'Faux.Fur traffic_light'", "no test image"):
        assert text in fitted.stderr, (text, fitted.stderr[-3000:])
    assert not (tmp_path / "checkpoints" / "bad" / "last.ckpt").exists()
