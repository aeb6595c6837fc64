"""``xvlm transfer`` (in process): every run tested on every run's data; each cell is what ``Trainer.test`` of that
checkpoint on that datamodule logs, the rows follow the configs, the columns their data."""

import lightning as L
import pytest
import yaml

from datamodules import ShapesDataModule
from xvlm.cli import main
from xvlm.methods import ECOR

MODEL = dict(model="xvlm-tiny", pretrained=None, input_size=32, n_prompt_tokens=2, warmup_steps=1)
WORLDS = {"six": ["circle", "square", "triangle", "star", "hexagon", "cross"], "two": ["heart", "crescent"]}
OPTIONS = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def _data(shapes: list[str]) -> dict:
    return dict(task="objects", shapes=shapes, image_size=32, batch_size=8, train_size=16, val_size=8, test_size=8,
                num_workers=0)


def test_transfer_writes_the_matrix_of_every_run_on_every_runs_data(tmp_path, monkeypatch):
    checkpoints, expected = {}, {}
    for name, shapes in WORLDS.items():
        L.seed_everything(len(name))
        module = ECOR(**MODEL)
        trainer = L.Trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, **OPTIONS)
        trainer.fit(module, ShapesDataModule(**_data(shapes)))
        checkpoints[name] = tmp_path / f"{name}.ckpt"
        trainer.save_checkpoint(checkpoints[name])
        for other, other_shapes in WORLDS.items():  # the independent path: Trainer.test of the module
            (metrics,) = L.Trainer(**OPTIONS).test(module, ShapesDataModule(**_data(other_shapes)), verbose=False)
            expected[name, other] = metrics["test/RR"]
        config = {"run": name, "seed_everything": 0, "trainer": {"accelerator": "cpu", "logger": False},
                  "model": {"class_path": "xvlm.methods.ECOR", "init_args": MODEL},
                  "data": {"class_path": "datamodules.ShapesDataModule", "init_args": _data(shapes)}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    main(["transfer", "--configs", "six.yaml", "two.yaml", "--ckpt_paths", str(checkpoints["six"]),
          str(checkpoints["two"]), "--out", "matrix.md", "--trainer.enable_progress_bar", "false"])
    lines = (tmp_path / "matrix.md").read_text().splitlines()
    assert lines[0].split(" | ")[1:] == ["six", "two |"]
    cells = {(row.split(" | ")[0].strip("| "), column): float(value)
             for row in lines[2:] for column, value in zip(WORLDS, row.strip("| ").split(" | ")[1:])}
    assert cells.keys() == expected.keys()
    for key, value in expected.items():
        assert cells[key] == pytest.approx(value, abs=5e-4), key  # the table rounds to 3 decimals
    assert len({round(v, 3) for v in cells.values()}) > 1  # the cells differ: each is its own run and data


def test_transfer_refuses_unequal_lists_and_missing_files(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("{}")
    with pytest.raises(SystemExit):
        main(["transfer", "--configs", str(tmp_path / "a.yaml"), "--ckpt_paths", "x.ckpt", "y.ckpt", "--out", "m.md"])
    assert "1 configs but 2 checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["transfer", "--configs", str(tmp_path / "a.yaml"), "--ckpt_paths", "missing.ckpt", "--out", "m.md"])
    assert "file 'missing.ckpt' does not exist" in capsys.readouterr().err
