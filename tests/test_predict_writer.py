"""``xvlm predict`` (in process) on a folder of unlabelled images of odd sizes: one row per readable image, written
through ``PredictionWriter``; an unreadable file follows the datamodule's ``on_bad_image``; ranks' parts merge."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from datamodules.loading import BadImageError
from xvlm.cli import main
from xvlm.prediction_writer import PredictionWriter, read_jsonl, summary_columns

CLASSES = ("ant", "bee", "cat")
MODEL = dict(model="xvlm-tiny", pretrained=None, input_size=32, lr=1e-3, warmup_steps=1, explainer="input_x_gradient")
DATA = dict(image_size=32, batch_size=4, num_workers=0, unseen_classes=["cat"])
SIZES = {"wide.png": (23, 61), "tall.jpg": (57, 19), "odd.png": (33, 35), "nested/deep.png": (40, 27)}
"""Readable images of the predict folder, ``(height, width)``."""
OPTIONS = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=1, num_sanity_val_steps=0)


def _image(path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A class-folder dataset, a CLIPFineTune trained one step on it by ``xvlm fit`` (config, checkpoint), and a
    predict folder of odd-sized images with one corrupt file."""
    folder = tmp_path_factory.mktemp("predict")
    for split in ("train", "val"):
        for k, name in enumerate(CLASSES):
            for i in range(2):
                _image(folder / "data" / split / name / f"{i}.png", 24, 24, seed=10 * k + i)
    for seed, (name, (height, width)) in enumerate(SIZES.items()):
        _image(folder / "photos" / name, height, width, seed)
    (folder / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    config = {"run": "photos", "seed_everything": 0, "trainer": OPTIONS,
              "model": {"class_path": "xvlm.methods.CLIPFineTune", "init_args": MODEL},
              "data": {"class_path": "datamodules.ImageFolderDataModule",
                       "init_args": dict(DATA, root=str(folder / "data"))}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main(["fit", "--config", "run.yaml", "--trainer.max_steps", "1"])
    return folder


def _predict(*options: str) -> None:
    main(["predict", "--config", "run.yaml", "--ckpt_path", "checkpoints/photos/last.ckpt",
          "--data.init_args.predict_dir", "photos", *options])


def test_predict_writes_one_row_per_readable_image_and_skips_the_corrupt_one(run, monkeypatch):
    monkeypatch.chdir(run)
    with pytest.warns(UserWarning, match="broken.png"):
        _predict("--data.init_args.on_bad_image", "skip", "--predictions.path", "out/rows.csv",
                 "--predictions.explain", "true")
    with open(run / "out/rows.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["path"] for row in rows) == sorted(f"photos/{name}" for name in SIZES)  # as predict_dir says
    assert [int(row["index"]) for row in rows] == sorted(int(row["index"]) for row in rows)
    for row in rows:
        classes = [row[f"class_{k}"] for k in (1, 2, 3)]
        probabilities = [float(row[f"prob_{k}"]) for k in (1, 2, 3)]
        assert sorted(classes) == sorted(CLASSES)  # three classes: the top 5 are all of them, each once
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        assert row["seen"] == str(row["class_1"] != "cat")
        assert "top_rationales" not in row and "label" not in row  # a saliency map only; no labels
    pictures = sorted(path.name for path in (run / "out/rows_explanations").iterdir())
    assert pictures == sorted(f"{int(row['index']):05d}_{row['path'].split('/')[-1].split('.')[0]}.png"
                              for row in rows)


def test_predict_stops_at_the_corrupt_image_under_on_bad_image_error(run, monkeypatch):
    monkeypatch.chdir(run)
    with pytest.raises(BadImageError, match="broken.png"):
        _predict("--predictions.path", "stopped.jsonl")
    assert not (run / "stopped.jsonl").exists()


def test_ranks_write_parts_that_rank_zero_merges_once_per_image(tmp_path):
    writer = PredictionWriter(str(tmp_path / "rows.jsonl"))
    shares = {1: [{"index": 3, "class_1": "bee"}, {"index": 1, "class_1": "ant"}],
              0: [{"index": 0, "class_1": "cat"}, {"index": 1, "class_1": "ant"}]}  # index 1 served twice
    for rank in (1, 0):  # rank 1 finishes first: it writes its part and leaves the merge to rank 0
        writer._rows = shares[rank]
        trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0,
                                  strategy=SimpleNamespace(barrier=lambda name: None))
        writer.on_predict_epoch_end(trainer, None)
        assert (tmp_path / "rows.jsonl").exists() == (rank == 0)
    assert [row["index"] for row in read_jsonl(tmp_path / "rows.jsonl")] == [0, 1, 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rows.jsonl"]  # the parts are gone


def test_summary_is_the_best_entry_of_every_ranking():
    explanation = {"saliency": np.zeros((4, 4)), "rationales_names": ["stripes", "", "wings"],
                   "rationales_scores": np.array([0.2, 0.9, 0.5]), "attribute_names": ["red", "round"],
                   "attribute_contributions": np.array([-1.0, 2.0]), "patches_names": ["kept"]}
    assert summary_columns(explanation) == {"top_rationales": "wings", "top_rationales_score": 0.5,
                                            "top_attribute": "round", "top_attribute_score": 2.0}
    assert json.loads(json.dumps(summary_columns(explanation)))  # plain values, as JSONL rows need
