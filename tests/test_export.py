"""``xvlm export`` (in process): a fine-tuned module's towers leave as an open_clip folder that open_clip loads alone,
with the module's features and the datamodule's preprocessing; towers open_clip cannot build (conv stem, prompt
tokens, MSCI's block adapters) load through xvlm with the same features."""

import json

import lightning as L
import open_clip
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torchvision.transforms import Normalize

from datamodules import ShapesDataModule
from datamodules.transforms import CLIP_MEAN, CLIP_STD
from xvlm.backbones import VisionLanguageModel
from xvlm.cli import main
from xvlm.export import PARTS_FILE, export_module, tower_export, write_export
from xvlm.hub_folder import CONFIG_FILE
from xvlm.methods import MSCI, CLIPFineTune

TEST_VIT = {  # a two-block ViT that open_clip builds from its config alone (no conv stem, no registers)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
MODEL = dict(model="xvlm-test-vit", pretrained=None, input_size=32, lr=1e-3, warmup_steps=1)
DATA = dict(task="objects", image_size=32, batch_size=8, train_size=24, val_size=8, test_size=8, num_workers=0)
OPTIONS = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CLIPFineTune on the test ViT (random weights at 48 px, used at 32 px), three steps and a validation epoch
    on Shapes; its config and checkpoint, as the CLI would have written them."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "xvlm-test-vit.json").write_text(json.dumps(TEST_VIT))
    open_clip.add_model_config(folder / "xvlm-test-vit.json")
    L.seed_everything(0)
    module = CLIPFineTune(**MODEL)
    before = {k: v.clone() for k, v in module.backbone.clip.state_dict().items()}
    best = ModelCheckpoint(dirpath=folder, monitor="val/seen_top1", mode="max", filename="best")
    trainer = L.Trainer(max_steps=3, callbacks=[best], num_sanity_val_steps=0, **OPTIONS)
    trainer.fit(module, ShapesDataModule(**DATA))
    trainer.save_checkpoint(folder / "last.ckpt")
    assert not torch.equal(before["visual.proj"], module.backbone.clip.visual.proj)  # it was fine-tuned
    config = {"run": "test-vit", "seed_everything": 1, "trainer": {"accelerator": "cpu", "logger": False},
              "model": {"class_path": "xvlm.methods.CLIPFineTune", "init_args": MODEL},
              "data": {"class_path": "datamodules.ShapesDataModule", "init_args": DATA}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder, module.eval()


def test_export_loads_in_open_clip_with_the_fine_tuned_features_and_preprocessing(trained, monkeypatch, capsys):
    folder, module = trained
    monkeypatch.chdir(folder)
    main(["export", "--config", "run.yaml", "--ckpt_path", "last.ckpt", "--out", "exported"])
    assert "open_clip loads it" in capsys.readouterr().out

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder / 'exported'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder / 'exported'}")
    encoder = module.zero_shot_encoder()
    images = torch.randn(4, 3, 32, 32)
    texts = module.class_prompts(module.templates[0])
    with torch.no_grad():
        image_gap = (model.eval().encode_image(images, normalize=True) - encoder.encode_image(images)).abs().max()
        text_gap = (model.encode_text(tokenizer(texts), normalize=True) - encoder.encode_texts(texts)).abs().max()
    assert image_gap <= 1e-6 and text_gap <= 1e-6

    normalise = next(step for step in preprocess.transforms if isinstance(step, Normalize))
    assert normalise.mean == pytest.approx(CLIP_MEAN) and normalise.std == pytest.approx(CLIP_STD)
    config = json.loads((folder / "exported" / CONFIG_FILE).read_text())
    assert config["preprocess_cfg"]["resize_mode"] == "squash"  # the Shapes evaluation transform resizes to a square
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32 and model.visual.image_size == (32, 32)
    assert "xvlm" not in config and not (folder / "exported" / PARTS_FILE).exists()  # CLIPFineTune has no parts

    card = (folder / "exported" / "README.md").read_text()
    assert "library_name: open_clip" in card and "xvlm.methods.clip.CLIPFineTune" in card
    assert "| val/seen_top1 |" in card and "best.ckpt" in card and "- unseen (" in card


def test_xvlm_tiny_export_loads_through_xvlm(tiny_vit, tmp_path):
    export = tower_export(tiny_vit, {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)})
    assert "convolutional stem" in export.needs_xvlm
    assert export.config["xvlm"] == {"conv_stem": [32, 64, 128], "register_tokens": 0, "block_adapters": None}
    write_export(tmp_path, export, {}, "card")
    loaded = VisionLanguageModel(f"local-dir:{tmp_path}").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), tiny_vit.encode_image(images))
        assert torch.equal(loaded.encode_texts(["a red star"]), tiny_vit.encode_texts(["a red star"]))


def test_prompt_tokens_load_through_xvlm_and_other_block_adapters_are_refused(trained, tmp_path):
    towers = VisionLanguageModel("xvlm-test-vit", pretrained=None, image_size=32).eval()
    towers.add_prompt_tokens(3)
    export = tower_export(towers, {})
    assert export.config["xvlm"] == {"conv_stem": None, "register_tokens": 3, "block_adapters": None}
    write_export(tmp_path, export, {"head.weight": torch.ones(2, 2)}, "card")
    assert torch.equal(load_file(tmp_path / PARTS_FILE)["head.weight"], torch.ones(2, 2))
    loaded = VisionLanguageModel(f"local-dir:{tmp_path}").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), towers.encode_image(images))

    towers.add_block_adapters(attn=lambda width: torch.nn.Linear(width, width))
    with pytest.raises(ValueError, match="Linear block adapters on the attn branch; only BottleneckAdapter"):
        tower_export(towers, {})


def test_msci_export_loads_through_xvlm_with_the_adapted_features(tmp_path):
    torch.manual_seed(0)
    data = ShapesDataModule(task="compositions", image_size=32, batch_size=8, train_size=8, val_size=8, test_size=8,
                            num_workers=0, augment=False)
    module = MSCI(pretrained=None, input_size=32, low_layers=2, high_layers=2, cal_heads=4, adapter_dim=8,
                  adapter_scale=0.5)
    module.attach_task(data.task)
    encoder = module.eval().zero_shot_encoder()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        clip_features = encoder.encode_image(images)
        for param in encoder.adapter_parameters():  # they start at W_up = 0, which changes nothing
            param.normal_(0.0, 0.2)
        adapted = encoder.encode_image(images)
    assert (adapted - clip_features).abs().max() > 1e-2

    export, _ = export_module(module, data, tmp_path / "msci")
    assert "convolutional stem" in export.needs_xvlm and "attention and MLP branch" in export.needs_xvlm
    spec = {"dim": 8, "scale": 0.5, "dropout": 0.1}
    assert export.config["xvlm"]["block_adapters"] == {"attn": spec, "mlp": spec}
    parts = load_file(tmp_path / "msci" / PARTS_FILE)
    assert "prompts.vocab" in parts and any(name.startswith("stages.") for name in parts)
    assert not any("adapter" in name for name in parts)  # the adapters are in the towers' weights
    card = (tmp_path / "msci" / "README.md").read_text()
    assert "VisionLanguageModel('local-dir:" in card and "compositional pair scores" in card

    loaded = VisionLanguageModel(f"local-dir:{tmp_path / 'msci'}").eval()
    assert len(list(loaded.adapter_modules())) == 2 * 4
    with torch.no_grad():
        assert (loaded.encode_image(images) - adapted).abs().max() <= 1e-6
        assert torch.equal(loaded.encode_texts(["a red star"]), encoder.encode_texts(["a red star"]))
