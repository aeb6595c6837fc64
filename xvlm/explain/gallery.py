"""Galleries of explained samples: take a fixed set of samples, run ``explain`` on them, write one PNG each.

:class:`ExplanationGallery` does it after validation epochs; ``xvlm explain`` (:mod:`xvlm.cli.explain`) does
it once from a checkpoint. Both call a module's ``explain(batch)`` through :func:`explain_batch`: in eval mode
under ``torch.no_grad()`` but outside inference mode, so a method that needs gradients (Grad-CAM) can turn them on
with ``torch.enable_grad()`` inside ``explain``. Instead of the module's own ``explain``, both can render a named
explainer (:func:`named_explainer`: ``lazsl`` or any of :data:`xvlm.explain.explainers.EXPLAINERS`). Modules are
used through the :class:`xvlm.contracts.ExplainableModule` protocol only. LaZSL galleries explain with the
trainer's LaZSL callback settings (:func:`xvlm.zeroshot.lazsl_settings_of`), so their maps explain the logged
scores (the maps themselves over the smaller region crops, :class:`xvlm.zeroshot.regions.RegionCrops`), cut from the
samples' original images when the datamodule serves them (:class:`xvlm.contracts.OriginalImages`), as the callback's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from xvlm.contracts import ExplainableModule, WholeSplits
from xvlm.explain.explainers import explain_with, explainer_names
from xvlm.explain.render import per_sample_entries, render_explanation, sample_explanation, save_figure
from xvlm.zeroshot.lazsl import LaZSLSettings, evaluating, lazsl_settings_of, original_reader
from xvlm.zeroshot.regions import RegionCrops, lazsl_explainer


def _concat(parts: list[Any]) -> Any:
    """Tensors joined along dim 0, anything else (lists of strings) chained."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [item for part in parts for item in part]


def first_samples(loader: Iterable[dict[str, Any]], count: int) -> dict[str, Any]:
    """The first ``count`` samples a loader yields (fewer if it runs out), as one batch-first dict on the CPU.

    Only per-sample entries are kept (:func:`~xvlm.explain.render.per_sample_entries`): batch-level values, such as
    the ``skipped_images`` count of an ``on_bad_image: skip`` loader, describe no sample.
    """
    parts: list[dict[str, Any]] = []
    taken = 0
    for batch in loader:
        parts.append(per_sample_entries(move_data_to_device(batch, "cpu")))
        taken += len(batch["image"])
        if taken >= count:
            break
    if not parts:
        raise ValueError("the loader yielded no samples to explain")
    return {key: _concat([part[key] for part in parts])[:count] for key in parts[0]}


def split_loader(trainer: L.Trainer, split: str, owner: str) -> Iterable[dict[str, Any]]:
    """A fresh loader of the whole ``split`` of the trainer's datamodule, the same on every rank
    (:class:`~xvlm.contracts.WholeSplits`), else its ``<split>_dataloader()``; ``owner`` names the caller in the
    error."""
    if isinstance(trainer.datamodule, WholeSplits):
        return trainer.datamodule.loader(split, sharded=False)
    loader = getattr(trainer.datamodule, f"{split}_dataloader", None)
    if loader is None:
        raise ValueError(f"{owner}(split='{split}') needs a datamodule with {split}_dataloader(); "
                         f"got {type(trainer.datamodule).__name__}")
    return loader()


def sample_names(batch: dict[str, Any], prefix: str) -> list[str]:
    """``"<prefix>_<index>"`` per sample: the dataset ``index`` when the batch has one, else the position."""
    indices = batch["index"].tolist() if "index" in batch else range(len(batch["image"]))
    return [f"{prefix}_{int(index):05d}" for index in indices]


def gallery_explainers() -> list[str]:
    """What a gallery or ``xvlm explain`` can render: ``module`` (the module's own ``explain``), ``lazsl`` and every
    registered explainer."""
    return ["module", "lazsl", *explainer_names()]


def named_explainer(
    module: ExplainableModule, name: str, lazsl: LaZSLSettings | None = None,
    region_crops: RegionCrops | None = RegionCrops(),
    originals: Callable[[int], torch.Tensor | None] | None = None,
) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """``batch -> explanation`` by ``name`` (one of :func:`gallery_explainers`): ``None`` for ``module`` (the module's
    own ``explain``), LaZSL's region maps for ``lazsl`` (scored with ``lazsl`` settings, maps over ``region_crops``,
    crops cut from ``originals(index)`` when it serves the batch, :func:`xvlm.zeroshot.regions.lazsl_explainer`),
    else the registered explainer."""
    if name == "module":
        return None
    if name == "lazsl":
        return lazsl_explainer(module, lazsl, region_crops, originals)
    if name not in explainer_names():
        raise ValueError(f"unknown explainer {name!r}; choose one of {', '.join(gallery_explainers())}")
    return partial(explain_with, module, explainer=name)


def explain_batch(
    module: ExplainableModule,
    batch: dict[str, Any],
    explainer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``explainer(batch)`` (default ``module.explain``) on the module's device in eval mode under
    ``torch.no_grad()`` outside inference mode, with every submodule's mode restored after.

    Returns:
        The explanation with its tensors on the CPU (keys: :mod:`xvlm.explain.render`).
    """
    with torch.inference_mode(False), evaluating(module):
        explanation = (explainer or module.explain)(move_data_to_device(batch, module.device))
    return move_data_to_device(explanation, "cpu")


def render_explained(batch: dict[str, Any], explanation: dict[str, Any], names: Sequence[str],
                     class_names: Sequence[str]) -> list[Figure]:
    """One figure per sample of ``batch`` (``image [B, 3, H, W]``, optional ``label [B]``) from its batch-first
    ``explanation`` (:func:`explain_batch`), titled by ``names``."""
    labels = batch["label"].tolist() if "label" in batch else [None] * len(names)
    return [
        render_explanation(batch["image"][i], sample_explanation(explanation, i), class_names, label=labels[i],
                           title=names[i])
        for i in range(len(names))
    ]


def render_batch(
    module: ExplainableModule,
    batch: dict[str, Any],
    names: Sequence[str],
    explainer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[Figure]:
    """One figure per sample of ``batch`` (:func:`render_explained`); ``explainer`` as in :func:`explain_batch`."""
    return render_explained(batch, explain_batch(module, batch, explainer), names, module.task.class_names)


class ExplanationGallery(Callback):
    """After every ``every_n_epochs``-th validation epoch, writes the explanations of a fixed set of samples.

    The samples are the first ``num_images`` of the datamodule's ``<split>_dataloader()`` (a fresh, unsharded
    loader, read once and kept), so every epoch shows the same images. PNGs go to
    ``<out_dir>/epoch_NNN/<split>_<index>.png`` (``NNN`` the 0-based epoch, as in checkpoint names; ``out_dir``
    defaults to ``<trainer.log_dir>/gallery``) and, when a :class:`TensorBoardLogger` is attached, to TensorBoard
    under ``gallery/<split>_<index>``. The sanity check is skipped; only global rank 0 explains and writes.

    With ``explainer='lazsl'`` the maps are computed with the settings of the trainer's
    :class:`~xvlm.zeroshot.LaZSL` callback when it has one, so they explain the scores it logs; else with
    ``lazsl`` (or the defaults). The heat maps
    are drawn over ``region_crops``, on the samples' original images when the datamodule serves them
    (:func:`original_reader`). Giving ``lazsl`` that differs from the callback's settings is an error at setup.

    Args:
        every_n_epochs: write after epochs ``n - 1, 2n - 1, ...``.
        num_images: samples in the gallery.
        split: datamodule split the samples come from.
        out_dir: root folder of the epoch folders.
        explainer: ``module`` renders the method's own ``explain`` (its configured explainer); ``lazsl`` renders
            LaZSL's per-descriptor region heat maps of the module's zero-shot towers; any name of
            :data:`~xvlm.explain.explainers.EXPLAINERS` renders that explainer's map of the predicted class.
        lazsl: LaZSL settings of ``explainer='lazsl'`` for trainers without a LaZSL callback (YAML:
            ``lazsl: {theta: 0.5}``).
        region_crops: crops of ``explainer='lazsl'``'s heat maps (YAML: ``region_crops: {n_crops: 32, beta: 0.4}``;
            ``null``: the scoring crops), :class:`~xvlm.zeroshot.regions.RegionCrops`.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, split: Literal["val", "test"] = "val",
                 out_dir: str | None = None, explainer: str = "module",
                 lazsl: LaZSLSettings | None = None, region_crops: RegionCrops | None = RegionCrops()) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(f"ExplanationGallery needs every_n_epochs >= 1 and num_images >= 1; got "
                             f"{every_n_epochs} and {num_images}")
        choices = gallery_explainers()
        if explainer not in choices:
            raise ValueError(f"ExplanationGallery(explainer={explainer!r}): choose one of {', '.join(choices)}")
        if lazsl is not None and explainer != "lazsl":
            raise ValueError(f"ExplanationGallery(lazsl=...) sets LaZSL options, which only explainer='lazsl' uses; "
                             f"got explainer={explainer!r}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.split = split
        self.out_dir = out_dir
        self.explainer = explainer
        self.lazsl = lazsl
        self.region_crops = region_crops
        self._lazsl_settings: LaZSLSettings | None = None
        self._batch: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Settle the LaZSL settings of ``explainer='lazsl'``: the trainer's LaZSL callback's, else ``lazsl``.

        Raises:
            ValueError: ``lazsl`` was given and differs from the LaZSL callback's settings (both are named).
        """
        if self.explainer != "lazsl":
            return
        logged = lazsl_settings_of(trainer.callbacks)
        if logged is not None and self.lazsl is not None and self.lazsl != logged:
            raise ValueError(f"ExplanationGallery(lazsl={self.lazsl!r}) differs from the LaZSL callback's settings "
                             f"{logged!r}: the heat maps would explain other scores than the logged ones. Drop the "
                             "gallery's lazsl (it then uses the callback's) or make the two equal.")
        self._lazsl_settings = logged if logged is not None else self.lazsl

    def _explainer(self, module: ExplainableModule,
                   trainer: L.Trainer) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """``batch -> explanation`` of the gallery's explainer (``None``: the module's own ``explain``)."""
        return named_explainer(module, self.explainer, self._lazsl_settings, self.region_crops,
                               original_reader(trainer.datamodule, self.split))

    def _samples(self, trainer: L.Trainer) -> dict[str, Any]:
        if self._batch is None:
            with torch.inference_mode(False):
                self._batch = first_samples(split_loader(trainer, self.split, "ExplanationGallery"), self.num_images)
        return self._batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: ExplainableModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        root = Path(self.out_dir or Path(trainer.log_dir) / "gallery")  # log_dir is collective: every rank asks
        if not trainer.is_global_zero:
            return
        batch = self._samples(trainer)
        names = sample_names(batch, self.split)
        folder = root / f"epoch_{trainer.current_epoch:03d}"
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        for name, figure in zip(names, render_batch(pl_module, batch, names, self._explainer(pl_module, trainer))):
            save_figure(figure, folder / f"{name}.png")
            for logger in loggers:
                logger.experiment.add_figure(f"gallery/{name}", figure, global_step=trainer.global_step, close=False)
