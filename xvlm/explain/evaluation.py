"""Saliency evaluation during training: how faithful and how well placed a method's ``explain`` maps are.

:class:`SaliencyEvaluation` scores ``pl_module.explain(batch)["saliency"]`` (or the maps of a named explainer,
:mod:`xvlm.explain.explainers`) for the predicted class against
``pl_module.classify`` with the metrics of :mod:`xvlm.metrics.saliency` (insertion/deletion AUCs, and mass in mask
and pointing game where batches carry a ``mask``), after validation epochs. The module is used through the
:class:`xvlm.contracts.ExplainableModule` protocol only.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback

from xvlm.contracts import ExplainableModule
from xvlm.explain.explainers import explain_with, get_explainer
from xvlm.explain.gallery import explain_batch, split_loader
from xvlm.metrics.saliency import SaliencyMetrics, saliency_scores


class SaliencyEvaluation(Callback):
    """After every ``every_n_epochs``-th validation epoch, logs ``saliency/<key>`` for the module's explanations.

    The samples are the first ``max_batches`` batches of the datamodule's ``<split>_dataloader()`` (a fresh,
    unsharded loader, read once and kept), so every epoch scores the same images and every rank scores them all;
    the sanity check is skipped. Each batch is explained and scored by :func:`~xvlm.explain.gallery.explain_batch`
    (eval mode, every submodule's mode restored after; outside inference mode, so ``explain`` may turn gradients on
    with ``torch.enable_grad()``). Logged keys, means over the samples: ``insertion``, ``deletion``, ``overall``
    (= insertion − deletion) and, when batches have a ``mask``, ``mass_in_mask`` and ``pointing``
    (:class:`~xvlm.metrics.saliency.SaliencyMetrics`).

    Args:
        max_batches: batches of the split to score.
        steps: insertion/deletion steps ``T``.
        every_n_epochs: score after epochs ``n - 1, 2n - 1, ...``.
        split: datamodule split the samples come from.
        blur_kernel: Gaussian kernel side of the insertion start image.
        blur_sigma: its standard deviation in pixels.
        explainer: the explainer whose maps are scored (a name of :data:`~xvlm.explain.explainers.EXPLAINERS`);
            ``None`` scores the module's own ``explain`` (its configured explainer).
    """

    def __init__(self, max_batches: int = 2, steps: int = 16, every_n_epochs: int = 1,
                 split: Literal["val", "test"] = "val", blur_kernel: int = 11, blur_sigma: float = 5.0,
                 explainer: str | None = None) -> None:
        if max_batches < 1 or steps < 1 or every_n_epochs < 1:
            raise ValueError(f"SaliencyEvaluation needs max_batches, steps and every_n_epochs >= 1; got "
                             f"{max_batches}, {steps} and {every_n_epochs}")
        if explainer is not None:
            get_explainer(explainer)  # an unknown name fails here, listing the choices
        self.explainer = explainer
        self.max_batches = max_batches
        self.every_n_epochs = every_n_epochs
        self.split = split
        self.curve_options = {"steps": steps, "blur_kernel": blur_kernel, "blur_sigma": blur_sigma}
        self.metric = SaliencyMetrics(sync_on_compute=False)
        self._batches: list[dict[str, Any]] | None = None

    def _samples(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        if self._batches is None:
            loader = split_loader(trainer, self.split, "SaliencyEvaluation")
            self._batches = [move_data_to_device(batch, "cpu") for batch in islice(loader, self.max_batches)]
        return self._batches

    def _scorer(self, module: ExplainableModule) -> Callable[[dict[str, Any]], dict[str, torch.Tensor]]:
        """``batch -> saliency_scores`` of ``module.explain(batch)`` (or of the named explainer) for its predicted
        classes."""

        def score(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            if self.explainer is None:
                explanation = module.explain(batch)
            else:
                explanation = explain_with(module, batch, self.explainer)
            return saliency_scores(module.classify, batch["image"], explanation["saliency"],
                                   explanation["predicted"], batch.get("mask"), **self.curve_options)

        return score

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: ExplainableModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        with torch.inference_mode(False):
            self.metric.reset()
            for batch in self._samples(trainer):
                self.metric.update(**explain_batch(pl_module, batch, self._scorer(pl_module)))
            values = self.metric.compute()
        pl_module.log_dict({f"saliency/{key}": value.to(pl_module.device) for key, value in values.items()},
                           sync_dist=True)
