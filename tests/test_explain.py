"""Explanation rendering, the gallery callback and ``xvlm explain`` (32-px Shapes, CPU)."""

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imread
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import TINY_RUN, xvlm
from torch import nn

from datamodules import ShapesDataModule
from datamodules.transforms import CLIP_MEAN, CLIP_STD
from xvlm.cli import main
from xvlm.explain import ExplanationGallery, render_explanation, sample_explanation, save_figure
from xvlm.explain.gallery import explain_batch
from xvlm.explain.explainers import explainer_names
from xvlm.explain.render import DPI, PANEL_INCHES
from xvlm.methods import CLIPFineTune

PANEL = round(PANEL_INCHES * DPI)
CLASSES = ("circle", "square", "star")


def grey_image(size: int = 32) -> torch.Tensor:
    """A uniform mid-grey ``[3, S, S]`` image, CLIP-normalised."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (torch.full((3, size, size), 0.5) - mean) / std


def corner_map(corner: str, size: int = 32) -> torch.Tensor:
    """``[S, S]`` zeros with ones in one quarter (``"top-left"``, ``"bottom-right"``, ...)."""
    heat = torch.zeros(size, size)
    rows = slice(0, size // 2) if corner.startswith("top") else slice(size // 2, size)
    cols = slice(0, size // 2) if corner.endswith("left") else slice(size // 2, size)
    heat[rows, cols] = 1.0
    return heat


def saved_panels(figure, path: Path) -> list[np.ndarray]:
    """Save ``figure`` and cut every axes' pixels ``[h, w, 3]`` out of the PNG."""
    png = imread(save_figure(figure, path))[..., :3]
    crops = []
    for ax in figure.axes:
        box = ax.get_window_extent()
        top, bottom = png.shape[0] - round(box.y1), png.shape[0] - round(box.y0)
        crops.append(png[top + 2 : bottom - 2, round(box.x0) + 2 : round(box.x1) - 2])
    return crops


def hottest_quarter(panel: np.ndarray) -> str:
    """The quarter of a jet overlay with the most red over blue."""
    redness = panel[..., 0] - panel[..., 2]
    h, w = redness.shape[0] // 2, redness.shape[1] // 2
    quarters = {"top-left": redness[:h, :w], "top-right": redness[:h, w:], "bottom-left": redness[h:, :w],
                "bottom-right": redness[h:, w:]}
    return max(quarters, key=lambda name: quarters[name].mean())


# --------------------------------------------------------------------------------------------- rendering
def test_renderer_draws_each_known_key_of_the_sample_and_ignores_the_rest(tmp_path):
    contributions = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.9, 0.2])
    rationale = torch.linspace(0.0, 1.0, 12)[torch.randperm(12)]
    batch = {
        "predicted": torch.tensor([0, 2]),
        "logits": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]),
        "saliency": torch.rand(2, 32, 32),
        "descriptor_maps": torch.rand(2, 6, 8, 8),
        "descriptor_names": [[f"a{k}" for k in range(6)], [f"descriptor {k}" for k in range(6)]],
        "descriptor_contributions": torch.stack([torch.zeros(6), contributions]),
        "rationale_scores": torch.stack([torch.zeros(12), rationale]),
        "rationale_names": [[f"r{k}" for k in range(12)]] * 2,
        "ot_plan": torch.rand(2, 5, 6),
        "temperature": torch.tensor(0.5),
    }
    figure = render_explanation(grey_image(), sample_explanation(batch, 1), CLASSES, label=1, title="val_00007")

    titles = [ax.get_title() for ax in figure.axes]
    # image + saliency + top-4 descriptor maps by contribution + two rankings = 8 panels in 2 rows of 4
    assert titles == ["pred: star (0.79)\ntrue: square", "saliency", "descriptor: descriptor 4 (0.90)",
                      "descriptor: descriptor 1 (0.50)", "descriptor: descriptor 3 (0.30)",
                      "descriptor: descriptor 5 (0.20)", "descriptor ranking", "rationale ranking"]
    bars = [patch.get_width() for patch in figure.axes[-1].patches]
    assert bars == pytest.approx(rationale.sort(descending=True).values[:10].tolist())
    assert imread(save_figure(figure, tmp_path / "sample.png")).shape[:2] == (2 * PANEL, 4 * PANEL)

    alone = render_explanation(grey_image(), {"predicted": torch.tensor(1)}, CLASSES)
    assert imread(save_figure(alone, tmp_path / "alone.png")).shape[:2] == (PANEL, PANEL)


def test_padding_entries_named_empty_are_never_ranked():
    explanation = {
        "predicted": torch.tensor(0),
        "descriptor_maps": torch.rand(3, 8, 8),
        "descriptor_names": ["stripes", "", "five points"],
        "descriptor_contributions": torch.tensor([-0.2, 0.0, -0.1]),
    }
    figure = render_explanation(grey_image(), explanation, CLASSES)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[1:3] == ["descriptor: five points (-0.10)", "descriptor: stripes (-0.20)"]
    assert len(figure.axes[-1].patches) == 2


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_saliency_panel_follows_the_map(tmp_path, corner):
    image = grey_image()
    opposite = "bottom-right" if corner == "top-left" else "top-left"
    shown = saved_panels(render_explanation(image, {"saliency": corner_map(corner)}, CLASSES), tmp_path / "a.png")
    other = saved_panels(render_explanation(image, {"saliency": corner_map(opposite)}, CLASSES), tmp_path / "b.png")

    assert hottest_quarter(shown[1]) == corner
    assert np.array_equal(shown[0], other[0])  # the image panel does not depend on the map...
    changed = np.abs(shown[1] - other[1]).max(axis=-1) > 0.2
    assert changed.mean() > 0.4  # ...the saliency panel does, over about half its area


class GradientSaliency(L.LightningModule):
    """A module whose ``explain`` needs autograd (like Grad-CAM), with a submodule kept in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 1)
        self.frozen_norm = nn.BatchNorm2d(3).eval()

    def explain(self, batch: dict) -> dict:
        assert not self.training and not self.frozen_norm.training
        image = batch["image"].clone().requires_grad_(True)
        with torch.enable_grad():
            score = self.head(self.frozen_norm(image).mean(dim=(2, 3))).sum()
            (gradient,) = torch.autograd.grad(score, image)
        return {"saliency": gradient.abs().sum(dim=1)}


def test_explain_batch_allows_gradients_inside_inference_mode_and_restores_modes():
    module = GradientSaliency()
    batch = {"image": torch.randn(2, 3, 8, 8)}
    with torch.inference_mode():
        explanation = explain_batch(module, batch)
    assert explanation["saliency"].shape == (2, 8, 8) and explanation["saliency"].abs().sum() > 0
    assert module.training and module.head.training and not module.frozen_norm.training


# --------------------------------------------------------------------------------------------- gallery
def test_gallery_writes_the_same_samples_every_chosen_epoch(tmp_path):
    data = ShapesDataModule(task="objects", image_size=32, batch_size=2, train_size=4, val_size=6, test_size=4,
                            augment=False)
    model = CLIPFineTune(pretrained=None, input_size=32, lr=1e-3, warmup_steps=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=1, logger=logger,
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ExplanationGallery(num_images=3),  # spans two validation batches of 2
                   ExplanationGallery(every_n_epochs=2, num_images=1, split="test", out_dir=str(tmp_path / "test"),
                                      explainer="lazsl")],
    )
    trainer.fit(model, data)

    gallery = Path(logger.log_dir) / "gallery"
    assert sorted(p.name for p in gallery.iterdir()) == ["epoch_000", "epoch_001"]
    for epoch in gallery.iterdir():
        assert sorted(p.name for p in epoch.iterdir()) == ["val_00000.png", "val_00001.png", "val_00002.png"]
        assert imread(epoch / "val_00000.png").shape[:2] == (PANEL, 2 * PANEL)
    assert [str(p.relative_to(tmp_path)) for p in (tmp_path / "test").rglob("*.png")] == [
        "test/epoch_001/test_00000.png"
    ]
    # The LaZSL gallery draws descriptor heat maps and their ranking beside the image: more than two panels.
    assert imread(tmp_path / "test/epoch_001/test_00000.png").shape[1] > 2 * PANEL

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert sorted(tags) == ["gallery/test_00000", "gallery/val_00000", "gallery/val_00001", "gallery/val_00002"]
    assert len({event.step for event in events.Images("gallery/val_00001")}) == 2  # two epochs, no sanity check
    assert len(events.Images("gallery/test_00000")) == 1


# --------------------------------------------------------------------------------------------- xvlm explain
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder with ``tiny.yaml`` and the checkpoint of its 1-epoch, 1-step run (``CKPT``)."""
    folder = tmp_path_factory.mktemp("explain")
    config = copy.deepcopy(TINY_RUN)
    config["trainer"]["limit_train_batches"] = 1
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:  # in-process: `xvlm explain` below is the subprocess under test
        patch.chdir(folder)
        main(["fit", "--config", "tiny.yaml", "--run", "explain", "--trainer.max_epochs", "1"])
    return folder


CKPT = "checkpoints/explain/last.ckpt"


@pytest.mark.slow  # the split path also runs in test_method_configs.py for LICO and SVIP (make test)
def test_explain_command_writes_one_png_per_split_sample(trained):
    result = xvlm("explain", "--config", "tiny.yaml", "--ckpt_path", CKPT, "--split", "val", "--num_images", "3",
                  "--out", "out/val", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("out/val")
    assert sorted(p.name for p in (trained / "out/val").iterdir()) == ["val_00000.png", "val_00001.png",
                                                                        "val_00002.png"]


def test_explain_command_lazsl_writes_descriptor_heat_maps(trained):
    plain = xvlm("explain", "--config", "tiny.yaml", "--ckpt_path", CKPT, "--split", "val", "--num_images", "1",
                 "--out", "out/plain", cwd=trained)
    lazsl = xvlm("explain", "--config", "tiny.yaml", "--ckpt_path", CKPT, "--split", "val", "--num_images", "1",
                 "--out", "out/lazsl", "--lazsl", cwd=trained)
    assert plain.returncode == 0 and lazsl.returncode == 0, lazsl.stderr
    # LaZSL adds a panel per top descriptor and a ranking, so its figure is wider than the saliency one.
    assert imread(trained / "out/lazsl/val_00000.png").shape[1] > imread(trained / "out/plain/val_00000.png").shape[1]


def test_explain_command_writes_one_png_per_image_file(trained):
    Image.fromarray(np.full((40, 56, 3), (220, 30, 30), dtype=np.uint8)).save(trained / "red.png")
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).convert("L").save(trained / "grey.jpg")
    result = xvlm("explain", "--config", "tiny.yaml", "--ckpt_path", CKPT, "--images", "red.png", "grey.jpg",
                  "--out", "out/files", cwd=trained)
    assert result.returncode == 0, result.stderr
    written = sorted((trained / "out/files").iterdir())
    assert [p.name for p in written] == ["000_red.png", "001_grey.png"]
    assert imread(written[0]).shape[:2] == (PANEL, 2 * PANEL)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (("--images", "nowhere.png"), "nowhere.png"),
        (("--ckpt_path", "missing.ckpt"), "missing.ckpt"),
        (("--split", "train"), "train"),
        (("--ckpt_path", "foreign.ckpt"), "xvlm.methods.lico.LICO"),
    ],
)
def test_explain_command_errors_name_the_bad_input(trained, monkeypatch, capsys, override, named):
    checkpoint = torch.load(trained / CKPT, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "xvlm_class_path": "xvlm.methods.lico.LICO"}, trained / "foreign.ckpt")
    monkeypatch.chdir(trained)
    arguments = {"--config": ["tiny.yaml"], "--ckpt_path": [CKPT], "--out": ["out/error"]}
    arguments[override[0]] = list(override[1:])
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", *[item for key, values in arguments.items() for item in (key, *values)]])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err
    assert not (trained / "out/error").exists()


@pytest.mark.parametrize("name", explainer_names())
def test_explain_command_renders_every_registered_explainer(trained, monkeypatch, capsys, name):
    monkeypatch.chdir(trained)
    out = f"out/explainer_{name}"
    main(["explain", "--config", "tiny.yaml", "--ckpt_path", CKPT, "--split", "val", "--num_images", "1",
          "--explainer", name, "--out", out])
    assert capsys.readouterr().out.strip().endswith(out)
    written = sorted((trained / out).iterdir())
    assert [p.name for p in written] == ["val_00000.png"]
    assert imread(written[0]).shape[:2] == (PANEL, 2 * PANEL)  # the image and its saliency panel


def test_explain_command_refuses_an_unknown_explainer_listing_the_choices(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--config", "tiny.yaml", "--ckpt_path", CKPT, "--explainer", "lime", "--out", "out/lime"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "invalid choice: 'lime'" in error
    assert all(f"'{name}'" in error for name in ["module", "lazsl", *explainer_names()])
    with pytest.raises(SystemExit):
        main(["explain", "--config", "tiny.yaml", "--ckpt_path", CKPT, "--lazsl", "--explainer", "gradcam",
              "--out", "out/both"])
    assert "--lazsl and --explainer gradcam" in capsys.readouterr().err
    assert not (trained / "out/lime").exists() and not (trained / "out/both").exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_xvlm_help_lists_explain_next_to_the_lightning_subcommands(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([flag])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict"):
        assert f"    {subcommand} " in text
    assert "    explain " in text and "xvlm explain --help" in text
