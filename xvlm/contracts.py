"""What callbacks, rendering and ``xvlm explain`` may rely on in a method: a ``typing.Protocol``, not an import.

``xvlm.explain`` and ``xvlm.zeroshot`` are typed against :class:`ExplainableModule` and import no method
(``pyproject.toml`` declares the rule; ``lint-imports`` checks it). Every
:class:`~xvlm.methods.base.XVLMModule` satisfies it; so does any ``LightningModule`` that provides these members,
which is what lets a method from outside the package use the LaZSL callback, the gallery and the saliency metrics.
:class:`OriginalImages` and :class:`WholeSplits` are the members of a datamodule that LaZSL, the explanation
callbacks and ``xvlm explain`` use beyond ``task`` and the ``<split>_dataloader`` methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from datamodules.task import Task
from xvlm.backbones import VisionLanguageModel


@runtime_checkable
class ExplainableModule(Protocol):
    """The members of a method that the evaluation and explanation code uses (contracts 1, 3 and 4 of DESIGN.md).

    Attributes:
        task: the label space the module was attached to (``None`` before ``setup``).
        backbone: the towers the explainers of :mod:`xvlm.explain.explainers` look into (``image_tower``,
            ``text_aligned_images``; the ViT stepper ``embed_patches``/``run_blocks``/``project_tokens``). A module
            may also have ``class_text_features(classes) -> [len(classes), D]`` unit-norm class text features, which
            the text-based explainers then use instead of the default prompt.
        device: where the module's parameters live.
    """

    task: Task | None
    backbone: VisionLanguageModel

    @property
    def device(self) -> torch.device: ...

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable class logits ``[B, C]`` of images ``[B, 3, H, W]`` over the task's classes."""
        ...

    def explain(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Named maps of a batch: at least ``saliency [B, H, W]``, ``predicted [B]`` and ``logits [B, C]``."""
        ...

    def zero_shot_encoder(self) -> VisionLanguageModel | None:
        """The image and text towers as they are now, or ``None`` when the image side is not text-aligned."""
        ...

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> nn.Module: ...


@runtime_checkable
class OriginalImages(Protocol):
    """A datamodule that serves the original images of its samples (``datamodules.loading.ZooDataModule`` does).

    LaZSL (:class:`xvlm.zeroshot.LaZSL`, :func:`xvlm.zeroshot.regions.lazsl_explainer`) cuts its crops from these
    originals, wherever they fall and at full resolution, instead of from the resized, centre-cropped batch.
    """

    def original_image(self, split: str, index: int) -> torch.Tensor | None:
        """Sample ``index`` (the batch's ``index``) of ``split`` as decoded, ``[3, H, W]`` uint8 RGB at its own size,
        before any transform; None when the split has no originals (arrays already at model size)."""
        ...


@runtime_checkable
class WholeSplits(Protocol):
    """A datamodule whose loaders can serve a whole split on any rank (``datamodules.loading.ZooDataModule`` does).

    Its ``<split>_dataloader()`` methods serve this rank's share under DDP; the saliency evaluation and the
    explanation gallery read the same first samples on every rank, so their numbers and pictures do not depend on
    the number of processes (:func:`xvlm.explain.gallery.split_loader`).
    """

    def loader(self, split: str, sharded: bool = True) -> Any:
        """The loader of ``split``: this rank's share (``sharded``) or the whole split in order."""
        ...
