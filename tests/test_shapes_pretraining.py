import json
from dataclasses import replace

import pytest
import yaml
import torch
from open_clip.model import resize_pos_embed

from xvlm import shapes_pretraining
from xvlm.backbones import VisionLanguageModel
from xvlm.shapes_pretraining import RECIPES, build_shapes_backbone, shapes_backbone_path


@pytest.fixture(scope="module")
def quick_recipes(tmp_path_factory):
    """Point the backbone cache at a temporary folder and shrink the build to a few steps."""
    root = tmp_path_factory.mktemp("checkpoints")
    quick = {name: replace(recipe, steps=3, batch_size=16, val_size=64) for name, recipe in RECIPES.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XVLM_CHECKPOINT_DIR", str(root))
        patch.setattr(shapes_pretraining, "RECIPES", quick)
        yield root


@pytest.fixture(scope="module")
def built(quick_recipes):
    """Build the quick backbone once; return its path and whether the caller's RNG stream survived."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    path = shapes_backbone_path("xvlm-tiny")
    return path, torch.equal(torch.rand(3), expected_next)


def test_build_caches_weights_and_report_and_keeps_the_callers_random_stream(quick_recipes, built):
    path, rng_untouched = built
    assert rng_untouched, "building the backbone changed the caller's RNG"
    assert path == quick_recipes / "backbones" / "xvlm-tiny-shapes.pt"
    assert not path.with_suffix(".partial").exists()
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["zsl_chance"] == pytest.approx(1 / 64, abs=1e-4)
    assert report["recipe"]["image_size"] == RECIPES["xvlm-tiny"].image_size
    assert report["evaluated_at_px"] == VisionLanguageModel("xvlm-tiny", pretrained=None).image_size  # as loaded
    for key in ("S", "U", "H", "zsl", "zsl_shape", "zsl_colour", "zsl_pattern", "train_seconds"):
        assert 0.0 <= report[key] <= (1.0 if key != "train_seconds" else 1e4)

    loaded = VisionLanguageModel("xvlm-tiny", pretrained="shapes")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    grid = RECIPES["xvlm-tiny"].image_size // 8
    assert saved["visual.positional_embedding"].shape[0] == 1 + grid * grid  # trained at the recipe's size
    resize_pos_embed(saved, loaded.clip)  # ... and loaded at the architecture's, as open_clip resizes it
    for name, tensor in loaded.clip.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_second_use_loads_the_cache_without_rebuilding(built, monkeypatch):
    first, _ = built
    monkeypatch.setattr(shapes_pretraining, "build_shapes_backbone", lambda *a, **k: pytest.fail("rebuilt"))
    assert shapes_backbone_path("xvlm-tiny") == first


def test_only_known_architectures_have_a_shapes_backbone(quick_recipes):
    with pytest.raises(ValueError, match="pretrained='shapes' exists for"):
        shapes_backbone_path("ViT-B-16")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "seed", "zsl", "h", "shape"),
    [("xvlm-tiny", 0, 0.60, 0.35, 0.40), ("xvlm-tiny", 1, 0.60, 0.35, 0.40), ("xvlm-tiny", 2, 0.60, 0.35, 0.40),
     ("xvlm-tiny-rn", 0, 0.70, 0.45, None)],
)
def test_full_build_meets_the_transfer_targets(tmp_path, name, seed, zsl, h, shape):
    """The recipe, not one lucky seed: every seed draws its own class split and its own training images."""
    report = build_shapes_backbone(name, tmp_path / f"{name}.pt", replace(RECIPES[name], seed=seed))
    assert report["train_seconds"] <= 300
    assert report["zsl"] >= zsl and report["H"] >= h
    if shape is not None:
        assert report["zsl_shape"] >= shape


def test_building_from_the_cli_uses_the_build_recipe_not_the_run_settings(quick_recipes, tmp_path, monkeypatch):
    from test_cli import TINY_RUN
    from xvlm.cli import main

    monkeypatch.setenv("XVLM_CHECKPOINT_DIR", str(tmp_path / "fresh"))
    monkeypatch.chdir(tmp_path)
    config = {**TINY_RUN, "model": {**TINY_RUN["model"], "init_args": {
        **TINY_RUN["model"]["init_args"], "pretrained": "shapes", "input_size": None, "lr": 0.123}}}
    config["data"] = {**config["data"], "init_args": {**config["data"]["init_args"], "image_size": 64}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", "run.yaml", "--trainer.max_epochs", "1"])
    report = json.loads((tmp_path / "fresh/backbones/xvlm-tiny-shapes.json").read_text())
    assert report["recipe"]["lr"] == shapes_pretraining.RECIPES["xvlm-tiny"].lr != 0.123
    assert (tmp_path / "checkpoints/default/last.ckpt").is_file()


def test_the_build_command_overrides_only_the_given_recipe_fields(tmp_path):
    shapes_pretraining.main(["--model", "xvlm-tiny-rn", "--steps", "2", "--batch-size", "8", "--val-size", "32",
                             "--augment", "--negatives", "batch", "--out", str(tmp_path / "rn.pt")])
    report = json.loads((tmp_path / "rn.json").read_text())
    expected = replace(RECIPES["xvlm-tiny-rn"], steps=2, batch_size=8, val_size=32, augment=True, negatives="batch")
    assert RECIPES["xvlm-tiny-rn"].augment is False  # so the flag really changed it
    assert report["recipe"] == {k: getattr(expected, k) for k in report["recipe"]}
    assert (tmp_path / "rn.pt").is_file()
