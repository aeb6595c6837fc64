"""ECOR's DROR configs hold DROR's recipe (spec ``methods/ecor.md`` §4) and train, validate and test end to end on
a fixture in DROR's layout at their own precision (bf16-mixed); ``xvlm transfer`` tests every run on every run's
data and writes the matrix."""

import math

import pytest
import yaml
from run_cli import xvlm
from test_method_configs import CONFIGS, logged_rows
from test_rationales_datamodule import write_dror

RECIPE = {  # spec methods/ecor.md §4, from its table, not from the configs
    "dror_cifar10": dict(model="ViT-L-14", n_prompt_tokens=3, optimizer="sgd", lr=40.0, momentum=0.9, weight_decay=0.0,
                         warmup_steps=1000),
    "dror_cifar100": dict(model="ViT-L-14", n_prompt_tokens=3, optimizer="sgd", lr=40.0, momentum=0.9,
                          weight_decay=0.0, warmup_steps=1000),
    "dror_imagenet": dict(model="ViT-B-32", n_prompt_tokens=30, optimizer="sgd", lr=10.0, momentum=0.9,
                          weight_decay=0.0, warmup_steps=1000),
}


def _shrunk(dataset: str, tree, tmp_path) -> dict:
    run = yaml.safe_load((CONFIGS / "ecor" / f"{dataset}.yaml").read_text())
    run["data"]["init_args"].update(root=str(tree.root), rationales=str(tree.json), image_size=32, batch_size=4,
                                    num_workers=0)
    run["model"]["init_args"].update(model="xvlm-tiny", pretrained=None, input_size=32, n_prompt_tokens=2,
                                     text_cache=str(tmp_path / "cache"), warmup_steps=2)
    run["trainer"].update(accelerator="cpu", max_epochs=1, limit_train_batches=2, enable_progress_bar=False,
                          enable_model_summary=False, log_every_n_steps=1)
    return run


@pytest.mark.parametrize("dataset", sorted(RECIPE))
def test_dror_config_holds_drors_recipe(dataset):
    shipped = yaml.safe_load((CONFIGS / "ecor" / f"{dataset}.yaml").read_text())
    assert shipped["trainer"]["precision"] == "bf16-mixed" and shipped["best_checkpoint"]["monitor"] == "val/RR"
    model = shipped["model"]["init_args"]
    assert {key: model[key] for key in RECIPE[dataset]} == RECIPE[dataset]
    assert model["factorization"] == "rationale_first" and model["pretrained"] == "openai"


@pytest.mark.slow  # each config's recipe is checked above in make test; the runs take a minute each
@pytest.mark.parametrize("dataset", sorted(RECIPE))
def test_dror_config_trains_validates_and_tests_on_a_dror_fixture_in_bf16(tmp_path, dataset):
    tree = write_dror(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_shrunk(dataset, tree, tmp_path)))
    fitted = xvlm("fit", "--config", "run.yaml", "--run", "dror", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    logged = {k: float(v) for row in logged_rows(tmp_path / "outputs/dror/csv") for k, v in row.items() if v and "/" in k}
    verdicts = [logged[f"val/{v}"] for v in ("RR", "RW", "WR", "WW")]
    assert all(0 <= v <= 1 for v in verdicts) and sum(verdicts) == pytest.approx(1.0, abs=1e-6)
    assert math.isfinite(logged["train/loss"]) and 0 <= logged["val/compat_RR"] <= 1
    assert not any(k.startswith("test/") for k in logged)  # the test split waits for xvlm test
    assert list((tmp_path / "cache").glob("ecor-pairs-*.pt")) == []  # random weights are never cached
    tested = xvlm("test", "--config", "run.yaml", "--run", "dror-test", "--ckpt_path", "checkpoints/dror/last.ckpt",
                  cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    rows = logged_rows(tmp_path / "outputs/dror-test/csv")
    tested_rr = float(next(r["test/RR"] for r in rows if r.get("test/RR")))
    assert 0 <= tested_rr <= 1
    if dataset == "dror_cifar10":
        _transfer_to_shapes(tmp_path, tested_rr)


def _transfer_to_shapes(tmp_path, tested_rr: float) -> None:
    """``xvlm transfer`` between the fixture run and Shapes ``objects`` (the same model settings, so the one
    checkpoint serves both rows): a 2 x 2 matrix whose fixture cell is ``xvlm test``'s number."""
    run = yaml.safe_load((tmp_path / "run.yaml").read_text())
    run["run"] = "shapes"
    run["data"] = {"class_path": "datamodules.ShapesDataModule",
                   "init_args": {"task": "objects", "image_size": 32, "batch_size": 4, "test_size": 8,
                                 "num_workers": 0}}
    (tmp_path / "shapes.yaml").write_text(yaml.safe_dump(run))
    checkpoint = "checkpoints/dror/last.ckpt"
    result = xvlm("transfer", "--configs", "run.yaml", "shapes.yaml", "--ckpt_paths", checkpoint, checkpoint,
                  "--out", "transfer.md", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "transfer.md").read_text().splitlines()
    cells = [[float(v) for v in line.strip("| ").split(" | ")[1:]] for line in lines[2:]]
    assert len(cells) == 2 and all(len(row) == 2 and all(0 <= v <= 1 for v in row) for row in cells)
    assert cells[0][0] == pytest.approx(tested_rr, abs=1e-3)  # the diagonal is the in-dataset test number
