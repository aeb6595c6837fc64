"""``CLIPFineTune``: contrastive fine-tuning of both CLIP towers on class prompts — the baseline of every method.

Each training step encodes one prompt per candidate class (the template drawn at random per class and step)
and trains with the CLIP image-to-text loss against all candidates at once:
``L = CE(τ · f(x) g(T)ᵀ, y)`` with unit-norm image features ``f(x) [B, D]``, class prompt features
``g(T) [K, D]`` and the learnt temperature ``τ = exp(logit_scale)``. The candidates are every seen class
(``negatives='seen'``, ``K = C_seen``) or only the classes present in the batch (``negatives='batch'``, CLIP's
in-batch contrast with one caption per class: cheaper text side for large label spaces or small batches). Either
way every candidate is a negative exactly once, so a batch holding two images of one class never treats that
class's caption as a negative (the flaw of batch-wise caption contrast on small label spaces). With
``symmetric=True`` the text-to-image direction is added for the classes present in the batch, with every image
of the class as a positive.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

from xvlm.methods.base import XVLMModule


class CLIPFineTune(XVLMModule):
    """Contrastive CLIP fine-tuning on class prompts (see module docstring).

    Args:
        symmetric: also apply the text-to-image loss over the classes in the batch.
        negatives: candidate captions of the image-to-text loss: every seen class (``seen``) or the classes in
            the batch (``batch``).
        **kwargs: :class:`XVLMModule` arguments (backbone, prompts, optimiser).
    """

    def __init__(self, symmetric: bool = True, negatives: Literal["seen", "batch"] = "seen", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.backbone.text_aligned_images:
            raise ValueError(f"CLIPFineTune trains the CLIP image tower contrastively; image_encoder="
                             f"{self.hparams.image_encoder!r} has no text-aligned embedding: use image_encoder='clip'")
        if negatives not in ("seen", "batch"):
            raise ValueError(f"negatives={negatives!r}: choose 'seen' (every seen class) or 'batch'")
        self.symmetric = symmetric
        self.negatives = negatives

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Contrastive loss of one batch against one random-template prompt per candidate class.

        Templates are drawn on the device and the prompts' token ids gathered there
        (:meth:`~xvlm.methods.base.XVLMModule.prompt_tokens`): the step tokenizes nothing and reads nothing back.
        """
        target = self.seen_targets(batch)
        classes = self.seen_classes
        if self.negatives == "batch":
            present, target = self.seen_classes_present(batch)
            classes = classes[present]
        choice = torch.randint(len(self.templates), classes.shape, device=classes.device)
        text = self.prompt_tokens().encode(self.backbone, choice, classes)
        image = self.backbone.encode_image(batch["image"])
        logits = self.backbone.logit_scale.exp().clamp(max=100) * image @ text.T
        loss = F.cross_entropy(logits, target)
        if self.symmetric:
            loss = 0.5 * (loss + text_to_image_loss(logits, target))
        return loss


def text_to_image_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in the batch of ``-log Σ_{i: y_i=c} softmax_i(logits[:, c])`` (every image of
    the class a positive), from ``logits [B, K]`` and ``target [B]`` in ``0..K-1``.

    Computed over all ``K`` columns with the absent ones masked out, so no class list is read back from the device.
    """
    columns = torch.arange(logits.shape[1], device=target.device)
    positive = target[None, :] == columns[:, None]  # [K, B]
    present = positive.any(dim=1)
    log_prob = logits.T.log_softmax(dim=1)
    # an absent class's row is all -inf once masked; fill it with zeros so neither value nor gradient is NaN
    positives = torch.where(positive, log_prob, -math.inf).where(present[:, None], 0.0)
    per_class = -positives.logsumexp(dim=1)
    return (per_class * present).sum() / present.sum()
