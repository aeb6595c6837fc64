"""Model names with their own weights (``hf-hub:``, ``local-dir:``) against ``pretrained``: the default ``auto``
leaves it unset for them, setting it is an error naming both; nothing here reaches the network."""

import pytest
import yaml

from xvlm import backbones
from xvlm.backbones import VisionLanguageModel
from xvlm.cli import main
from xvlm.methods import CLIPFineTune

HUB = "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K"


class Built(Exception):
    """Raised by the stand-in of ``open_clip.create_model``, with the arguments it was called with."""


@pytest.fixture
def no_download(monkeypatch):
    def create_model(name, pretrained=None, **kwargs):
        raise Built(name, pretrained)

    monkeypatch.setattr(backbones.open_clip, "create_model", create_model)


@pytest.mark.parametrize("model", [HUB, "local-dir:exported/towers"])
def test_a_model_with_its_own_weights_is_built_without_pretrained_by_default(no_download, model):
    with pytest.raises(Built) as built:
        VisionLanguageModel(model)
    assert built.value.args == (model, None)


@pytest.mark.parametrize("model", [HUB, "local-dir:exported/towers"])
@pytest.mark.parametrize("pretrained", ["shapes", "openai"])
def test_pretrained_set_with_such_a_model_is_an_error_naming_both(no_download, model, pretrained):
    with pytest.raises(ValueError, match=rf"model='{model}'.*pretrained='{pretrained}'"):
        CLIPFineTune(model=model, pretrained=pretrained)


def test_auto_is_shapes_for_the_projects_architectures_only(no_download, monkeypatch):
    monkeypatch.setitem(backbones.LOCAL_SOURCES, "shapes", lambda model: f"built/{model}-shapes.pt")
    assert backbones._resolve_pretrained("xvlm-tiny", "auto") == ("built/xvlm-tiny-shapes.pt", None)
    with pytest.raises(ValueError, match=r"model 'ViT-B-16' has no default weights.*'openai'.*null"):
        VisionLanguageModel("ViT-B-16")


def test_the_cli_names_both_options(tmp_path, monkeypatch, capsys):
    config = {"model": {"class_path": "xvlm.methods.CLIPFineTune", "init_args": {"model": HUB, "pretrained": "shapes"}},
              "data": {"class_path": "datamodules.ShapesDataModule", "init_args": {"image_size": 32}},
              "trainer": {"accelerator": "cpu", "logger": False}}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "hub.yaml"])
    assert f"model='{HUB}' takes its weights from that source" in capsys.readouterr().err
