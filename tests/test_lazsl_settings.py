"""One ``LaZSLSettings`` for LaZSL scoring: the callback's logged scores, ``explain_lazsl`` and the gallery's maps."""

import dataclasses
import inspect
import re
import zlib
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_lazsl import _datamodule, _stub_trainer

import xvlm.explain.gallery as gallery_module
import xvlm.zeroshot.lazsl as lazsl_module
import xvlm.zeroshot.regions as regions_module
from xvlm.explain import ExplanationGallery
from xvlm.explain.gallery import first_samples
from xvlm.methods import CLIPFineTune
from xvlm.zeroshot import LaZSL, LaZSLSettings, evaluating, lazsl_settings_of
from xvlm.zeroshot.regions import RegionCrops, explain_lazsl

CUSTOM = {"n_crops": 3, "alpha": 0.5, "seed": 7, "eps": 0.01}
"""Non-default options of the callback in the gallery tests (``theta`` varies). A random CLIP's crop and descriptor
similarities spread by only ~1e-4; the small ``eps`` sharpens the plans so that ``θ`` visibly moves them."""
GALLERY_IMAGES = 3


# --------------------------------------------------------------------------------------------- the settings
@pytest.mark.parametrize("option, value", [
    ("n_crops", 0), ("alpha", 0.0), ("beta", 1.5), ("theta", 1.5), ("theta", -0.1), ("eps", 0.0), ("max_iter", 0),
    ("tol", 0.0), ("max_views", 0), ("memory_budget_mb", 0),
])
def test_bad_settings_are_refused_naming_the_option(option, value):
    named = re.escape(f"{option}={value}")
    with pytest.raises(ValueError, match=named):
        LaZSLSettings(**{option: value})
    with pytest.raises(ValueError, match=named):
        LaZSL(**{option: value})


def test_callback_checks_its_own_options():
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        LaZSL(every_n_epochs=0)
    with pytest.raises(ValueError, match="split='some'"):
        LaZSL(split="some")


def test_callback_arguments_are_the_settings_with_their_defaults():
    parameters = inspect.signature(LaZSL).parameters
    for field in dataclasses.fields(LaZSLSettings):
        assert parameters[field.name].default == field.default, field.name
    options = {"n_crops": 5, "alpha": 0.3, "beta": 0.7, "theta": 0.4, "eps": 0.2, "vs_offset": 0.01,
               "select_crops": False, "max_iter": 7, "tol": 1e-3, "seed": 3, "suffix": ".", "max_views": 64}
    assert LaZSL(**options, split="all").settings == LaZSLSettings(**options)
    assert LaZSL().settings == LaZSLSettings()
    assert not any(hasattr(LaZSL(), name) for name in options)  # stored once, in settings


def test_settings_of_a_trainers_callbacks():
    assert lazsl_settings_of([ExplanationGallery(), object()]) is None
    unseen, gzsl = LaZSL(theta=0.5), LaZSL(theta=0.5, split="all")
    assert lazsl_settings_of([object(), unseen, gzsl]) == LaZSLSettings(theta=0.5)
    with pytest.raises(ValueError, match=r"different settings.*theta=0\.5.*theta=0\.6"):
        lazsl_settings_of([unseen, LaZSL(theta=0.6)])


# --------------------------------------------------------------------------------------------- explain_lazsl
@pytest.fixture(scope="module")
def scored():
    """The callback (GZSL, non-default options) and ``explain_lazsl`` on one batch, their sentences recorded."""
    datamodule = _datamodule(val_size=8, batch_size=8)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    torch.manual_seed(0)
    module = CLIPFineTune(pretrained=None, input_size=32)
    settings = LaZSLSettings(n_crops=4, alpha=0.5, beta=0.8, theta=0.6, eps=0.2, vs_offset=0.002, max_iter=40,
                             tol=1e-5, seed=5, suffix=" in a photo.", max_views=10)
    callback = LaZSL(split="all", **dataclasses.asdict(settings))
    sentences = []
    real = lazsl_module.encode_descriptors

    def recorded(encoder, rows, mask):
        sentences.append(rows)
        return real(encoder, rows, mask)

    trainer = _stub_trainer(datamodule)
    encoder = module.zero_shot_encoder()
    with pytest.MonkeyPatch.context() as patch, evaluating(encoder):
        patch.setattr(lazsl_module, "encode_descriptors", recorded)
        patch.setattr(regions_module, "encode_descriptors", recorded)
        callback.setup(trainer, module, "validate")
        callback.on_validation_epoch_start(trainer, module)
        logged = callback.score(encoder, batch["image"], batch["index"])
        explained = explain_lazsl(encoder, batch["image"], batch["index"], datamodule.task, settings=callback.settings,
                                  region_crops=None)
    return encoder, batch, datamodule.task, callback.settings, logged, explained, sentences


def test_explain_lazsl_scores_are_the_callbacks(scored):
    _, _, _, _, logged, explained, sentences = scored
    assert torch.equal(explained["logits"], logged.scores)
    assert torch.equal(explained["boxes"], logged.boxes) and torch.equal(explained["crop_keep"], logged.crop_keep)
    rows = torch.arange(len(logged.scores))
    torch.testing.assert_close(explained["descriptor_contributions"].sum(-1),
                               explained["logits"][rows, explained["predicted"]], atol=1e-6, rtol=0)
    callback_sentences, explain_sentences = sentences
    assert callback_sentences == explain_sentences
    real = [sentence for row in callback_sentences for sentence in row if sentence]
    assert real and all(sentence.endswith(" in a photo.") for sentence in real)


class PixelTowers:
    """Stub towers whose similarities spread widely (a random CLIP's barely do): an image is a fixed random
    projection of its pixels, a sentence a random vector seeded by its text."""

    image_size = 16
    dim = 32

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.randn(3 * self.image_size**2, self.dim, generator=generator)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.flatten(1) @ self.projection, dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        seeds = [zlib.crc32(text.encode()) for text in texts]
        return F.normalize(torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
                                        for seed in seeds]), dim=-1)


@pytest.fixture(scope="module")
def pixel_explanation(scored):
    """``explain_lazsl`` of the batch of :func:`scored` with :class:`PixelTowers` and the callback's settings."""
    _, batch, task, settings, _, _, _ = scored
    towers = PixelTowers()
    return towers, batch, task, settings, explain_lazsl(towers, batch["image"], batch["index"], task,
                                                        settings=settings)


@pytest.mark.parametrize("option, value", [
    ("n_crops", 5), ("alpha", 0.3), ("beta", 0.9), ("theta", 0.9), ("eps", 0.05), ("vs_offset", 1.0),
    ("select_crops", False), ("max_iter", 1), ("tol", 0.5), ("seed", 6), ("suffix", ""),
])
def test_explain_lazsl_uses_every_scoring_option(pixel_explanation, option, value):
    towers, batch, task, settings, explained = pixel_explanation
    changed = explain_lazsl(towers, batch["image"], batch["index"], task,
                            settings=dataclasses.replace(settings, **{option: value}))
    assert not torch.allclose(changed["logits"], explained["logits"], atol=1e-4, rtol=0)


def test_views_per_forward_do_not_change_the_explanation(pixel_explanation):
    towers, batch, task, settings, explained = pixel_explanation
    changed = explain_lazsl(towers, batch["image"], batch["index"], task,
                            settings=dataclasses.replace(settings, max_views=1000))
    for key in ("logits", "descriptor_maps", "descriptor_contributions"):
        torch.testing.assert_close(changed[key], explained[key], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- the gallery
def _record_gallery(patch):
    """Patch the gallery's ``explain_batch`` to also append each explanation to the returned list."""
    explanations = []
    real = gallery_module.explain_batch

    def explain(*args, **kwargs):
        explanations.append(real(*args, **kwargs))
        return explanations[-1]

    patch.setattr(gallery_module, "explain_batch", explain)
    return explanations


def _validate(tmp_path, callbacks):
    """``trainer.validate`` of a fixed tiny CLIP with ``callbacks``; returns the module and the datamodule."""
    datamodule = _datamodule(val_size=8, batch_size=8)
    torch.manual_seed(0)
    module = CLIPFineTune(pretrained=None, input_size=32)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.validate(module, datamodule)
    return module, datamodule


def _gallery_run(tmp_path, theta):
    """Validate with a GZSL LaZSL callback (``theta``, :data:`CUSTOM`) and a LaZSL gallery; returns the callback's
    scores of the first batch, the gallery's explanation, and LaZSL explanations with the callback's and the
    default settings."""
    callback = LaZSL(split="all", theta=theta, **CUSTOM)
    gallery = ExplanationGallery(num_images=GALLERY_IMAGES, explainer="lazsl", out_dir=str(tmp_path / "gallery"))
    scores = []
    real_score = LaZSL.score

    def score(self, *args):
        out = real_score(self, *args)
        scores.append(out.scores)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LaZSL, "score", score)
        explanations = _record_gallery(patch)
        module, datamodule = _validate(tmp_path, [callback, gallery])
    assert len(scores) == 1 and len(explanations) == 1
    samples = first_samples(datamodule.val_dataloader(), GALLERY_IMAGES)
    encoder = module.zero_shot_encoder()
    with evaluating(encoder):
        expected, default = (explain_lazsl(encoder, samples["image"], samples["index"], datamodule.task,
                                           settings=settings) for settings in (callback.settings, None))
    return scores[0], explanations[0], expected, default


@pytest.fixture(scope="module")
def gallery_runs(tmp_path_factory):
    """:func:`_gallery_run` at ``θ = 0.5`` and ``θ = 0.9``."""
    return {theta: _gallery_run(tmp_path_factory.mktemp(f"theta{theta}"), theta) for theta in (0.5, 0.9)}


KEYS = ("logits", "descriptor_maps", "descriptor_contributions", "plans", "boxes")


def test_gallery_maps_explain_the_callbacks_scores(gallery_runs):
    for scores, shown, expected, default in gallery_runs.values():
        for key in KEYS:
            torch.testing.assert_close(shown[key], expected[key], msg=key)
        # the maps are over the region crops, with the callback's other options (θ: next test)
        assert shown["plans"].shape[1] == RegionCrops().n_crops
        assert not torch.allclose(shown["logits"], default["logits"])
        # the gallery's images are the first of the validation batch the callback scored and logged
        torch.testing.assert_close(shown["logits"], scores[:GALLERY_IMAGES], atol=1e-6, rtol=0)


def test_changing_the_callbacks_theta_changes_scores_and_maps(gallery_runs):
    # θ moves the random CLIP's scores and maps by a few 1e-5, ten times the gallery–callback tolerance above
    (scores, shown, _, _), (other_scores, other_shown, _, _) = gallery_runs.values()
    assert (scores - other_scores).abs().max() > 1e-5
    for key in ("descriptor_maps", "plans"):
        assert (shown[key] - other_shown[key]).abs().max() > 1e-5, key
    torch.testing.assert_close(shown["boxes"], other_shown["boxes"])  # same crops: only θ changed


def test_gallery_settings_that_differ_from_the_callbacks_are_refused(tmp_path):
    gallery = ExplanationGallery(explainer="lazsl", lazsl=LaZSLSettings(theta=0.8), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"ExplanationGallery\(lazsl=LaZSLSettings\(.*theta=0\.8.*\)\) differs from "
                                         r"the LaZSL callback's settings LaZSLSettings\(.*theta=0\.5"):
        _validate(tmp_path, [LaZSL(theta=0.5), gallery])
    agreeing = ExplanationGallery(explainer="lazsl", lazsl=LaZSLSettings(theta=0.5))
    agreeing.setup(SimpleNamespace(callbacks=[LaZSL(theta=0.5, split="all"), agreeing]), None, "validate")


def test_gallery_uses_its_own_settings_without_a_callback(tmp_path):
    own = LaZSLSettings(theta=0.5, **CUSTOM)
    with pytest.MonkeyPatch.context() as patch:
        explanations = _record_gallery(patch)
        module, datamodule = _validate(tmp_path, [ExplanationGallery(num_images=GALLERY_IMAGES, explainer="lazsl",
                                                                     lazsl=own, out_dir=str(tmp_path))])
    samples = first_samples(datamodule.val_dataloader(), GALLERY_IMAGES)
    encoder = module.zero_shot_encoder()
    with evaluating(encoder):
        expected = explain_lazsl(encoder, samples["image"], samples["index"], datamodule.task, settings=own)
    for key in KEYS:
        torch.testing.assert_close(explanations[0][key], expected[key], msg=key)


def test_gallery_settings_need_the_lazsl_explainer():
    with pytest.raises(ValueError, match="only explainer='lazsl' uses; got explainer='module'"):
        ExplanationGallery(lazsl=LaZSLSettings())
