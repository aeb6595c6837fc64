"""SVIP: semantically contextualised visual patches for attribute-based zero-shot learning (Chen et al., ICCV 2025).

A ViT's patch tokens predict class attributes; patches unrelated to the object are not dropped but contextualised
at the input. With ``B`` images, a patch grid ``(h, w)`` of ``N`` tokens of width ``W``, super-patches of ``s × s``
patches (``G = N / s²``, :mod:`xvlm.patches`), ``K`` attributes and ``C`` classes:

- **Selector** (SSPS): ``p̂ = σ(MLP(PE)) [B, G]``, the probability that a super-patch is unrelated, from the grouped
  raw patch embeddings ``PE [B, G, s²W]`` (before the class token and the position embeddings,
  :meth:`~xvlm.backbones.VisionLanguageModel.embed_patches`), MLP ``s²W → hidden → 1``.
- **Teacher** (training): attention rollout ``R = Â_L ⋯ Â_1``, ``Â_l = ½A_l + ½I`` of pass A
  (:func:`xvlm.patches.attention_rollout`), ``r = R[class, patches]`` averaged over each super-patch
  (:func:`xvlm.patches.superpatch_scores`); the keep set ``S`` is the top-``M`` super-patches of ``r`` and the
  selector's target is ``y_g = [g ∉ S]``.
- **Contextualisation** (PSC): ``e = (Linear_{K→s²}(Linear_{Dw→W}(V)ᵀ))ᵀ [s², W]`` from fixed attribute word vectors
  ``V [K, Dw]``, one vector per sub-patch, added to the patch embeddings of every super-patch outside the keep set.
- **Attribute head** (P2A) and class score: ``Â = Linear_{s²W→K}(Z) [B, G, K]`` on the grouped last-block tokens
  after the tower's last LayerNorm, ``â = pool_{g} Â``, ``logits = σ_s · â · (a_c / ‖a_c‖)ᵀ`` with class attribute
  vectors ``a_c`` (``σ_s = sigma``; ``normalize_pred`` also normalises ``â``).
- **Training**, two passes: A on the image (keep set ``S`` from the teacher, ``â_A`` pooled over ``S``), B with
  ``e`` added outside ``S`` (``â_B`` pooled over the ``M`` tokens of ``Z_B`` most aligned with their mean)::

      L = CE(logits_A, y) + CE(logits_B, y) + λ₁ Div(A, B) + λ₂ BCE(p̂, y_patch) + w_dec L_dec

  over the seen classes, ``Div = T² · mean_{b,c} p_B log(p_B / p_A)`` with ``p = softmax(â · āᵀ / T)``
  (``divergence='kl'``; ``'jsd'`` is the paper's Jensen–Shannon divergence, same scaling), and
  ``L_dec = mean_groups mean_b ‖â_B[b, group]‖₂`` over the task's attribute groups
  (``task.extras["attribute_groups"]``; one group per attribute when the task has none).
- **Inference** (one pass): the ``M`` super-patches of lowest ``p̂`` are kept, ``e`` is added to the rest, and
  ``Â`` is mean-pooled over all ``G`` tokens (``infer_tokens='all'``) or the kept ones (``'kept'``).

Schedule (spec §4): the first ``warmup_epochs`` epochs train only the selector, the two W2P layers and P2A at
``warmup_lr``; then everything trains at ``lr · lr_decay^⌊epoch / lr_decay_every⌋`` (absolute epoch), with Adam
``betas`` and no weight decay, one optimiser and one ``LambdaLR`` for the whole run. Gradient clipping is the
trainer's ``gradient_clip_val`` (the configs set the reference's global norm 1.0). The base options
``optimizer``, ``momentum``, ``warmup_steps`` and ``head_lr`` are not used.

Evaluation is the shared one (GZSL S/U/H/ZSL with calibrated stacking chosen on validation,
:mod:`xvlm.methods.base`); on data with object masks (Shapes; CUB with ``cub_root``) validation also logs
``val/keep_precision``, the share of the kept super-patches' pixels that lie on the object, and
``val/keep_precision_random``, the same for a uniformly random selection of ``M`` super-patches (its expectation:
the mask's share of the image; keeping ``M`` of ``G`` caps the precision at ``min(1, share · G / M)``), and
``val/keep_recall``, the share of the object's pixels that are kept (a random selection's: ``M / G``). ``explain`` adds the selection maps, the teacher and the attribute evidence
(:meth:`SVIP.explain`). :meth:`zero_shot_encoder` is the shared one: the fine-tuned open_clip towers.

Deviations from the reference code (uqzhichen/SVIP), all deliberate (spec §8):

1. Rollout scores are averaged over each 2×2 super-patch (the reference averages 1×4 strips of the raster, which
   match none of the super-patches it supervises); one grouping (:mod:`xvlm.patches`) serves selector, targets,
   replacement and maps.
2. The calibration and the epoch are never chosen on test data (the shared evaluation: chosen on validation).
3. Per-class accuracy everywhere (the reference's calibrated S/U are per sample).
4. The training loader shuffles (the reference's does not).
5. One Adam and one ``LambdaLR`` per run (the reference rebuilds Adam every epoch, resetting its moments), so
   resume is exact.
6. During warm-up the backbone gets neither updates nor optimiser state: its gradients are discarded before the
   clipping and the step (the reference lets them accumulate, which shrinks the clipped head gradients). They are
   discarded rather than switched off with ``requires_grad`` so that DDP keeps one set of parameters.
7. One explicit decorrelation weight ``w_dec`` (the reference applies its weight twice: 0.3² = 0.09).
8. No anomaly detection, no hard-coded paths or devices.
9. ``e`` is laid out as one vector per sub-patch (the reference flattens channel-major, scrambling sub-patches).
10. Defaults are the training scripts' (not the reference's argparse defaults); warm-up is counted in epochs:
    ``warmup_epochs=4`` is the reference's ``pre_epochs=3`` (it warms up while ``epoch ≤ pre_epochs``).
11. The default word vectors are the backbone's own text tower on the attribute names (``word_vectors:
    text_tower``); a ``[K, Dw]`` ``.npy``/``.pt`` file (e.g. word2vec sums, the reference's) is the option.
12. The image tower is the open_clip ViT of ``model`` by default (``ViT-B-16`` in the real-data configs), or a timm
    ViT (``image_encoder: timm:vit_base_patch16_224``, the reference's tower, with ``encoder_weights: hub``), both
    through the shared stepper. The text tower of ``model`` is frozen and only encodes the attribute names; the
    pooled class feature and its projection are unused and frozen. Images are CLIP-normalised for every tower
    (the datamodules' one normalisation), where the reference feeds its timm ViT ImageNet statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from datamodules.task import Task
from xvlm.backbones import PatchTokens
from xvlm.explain.explainers import explain_with
from xvlm.methods.base import XVLMModule
from xvlm.metrics import mass_in_mask, uniform_mass_in_mask
from xvlm.ot import float32_region
from xvlm.patches import (
    attention_rollout,
    group_superpatches,
    superpatch_index,
    superpatch_scores,
    ungroup_superpatches,
)

TEXT_TOWER = "text_tower"
"""``word_vectors`` value: encode the attribute names with the backbone's text tower."""


def rollout_targets(attentions: torch.Tensor, grid: tuple[int, int], keep: int, size: int = 2,
                    registers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher: keep set and super-patch relevance from attention rollout.

    Args:
        attentions: ``[L, B, T, T]`` head-averaged attention (class token first, then the ``N`` patches, then
            ``registers`` register tokens).
        grid: the patch grid ``(h, w)``.
        keep: ``M``, the super-patches kept.

    Returns:
        ``kept [B, G]`` bool (the top-``M`` of the class token's rollout averaged per super-patch) and those
        averages ``relevance [B, G]``.
    """
    count = grid[0] * grid[1]
    if attentions.shape[-1] != 1 + count + registers:
        raise ValueError(f"attention over {attentions.shape[-1]} tokens does not hold a class token, {count} "
                         f"patches and {registers} registers")
    with float32_region(attentions) as (attentions,):
        relevance = superpatch_scores(attention_rollout(attentions)[:, 0, 1 : 1 + count], grid, size)
    return top_mask(relevance, keep), relevance


def top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, G]`` bool: True at each row's ``count`` highest scores."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(count, dim=1).indices, True)


def pooled_attributes(scores: torch.Tensor, chosen: torch.Tensor | None, pool: Literal["mean", "max"]) -> torch.Tensor:
    """``â [B, K]``: per-token attribute scores ``[B, G, K]`` pooled over the ``chosen [B, G]`` tokens (all when
    None) by their mean or maximum."""
    if chosen is None:
        return scores.mean(dim=1) if pool == "mean" else scores.amax(dim=1)
    if pool == "mean":
        weights = chosen.to(scores.dtype).unsqueeze(-1)
        return (scores * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return scores.masked_fill(~chosen.unsqueeze(-1), -math.inf).amax(dim=1)


def decorrelation_loss(attributes: torch.Tensor, groups: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """``L_dec = (1/|groups|) Σ_g mean_b ‖â[b, g]‖₂`` of ``attributes [B, K]`` (APN's attribute decorrelation)."""
    return torch.stack([attributes[:, list(group)].norm(dim=1).mean() for group in groups]).mean()


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: Literal["kl", "jsd"],
               temperature: float) -> torch.Tensor:
    """``T² · mean_{b,c} p log(p / q)`` with ``p = softmax(student / T)``, ``q = softmax(teacher / T)`` (``kl``:
    ``KL(p ‖ q)``, the reference's ``KLDivLoss(log q, p)``), or the Jensen–Shannon divergence ``½KL(p ‖ m) +
    ½KL(q ‖ m)``, ``m = (p + q)/2`` (``jsd``), on ``[B, C]`` scores in float32."""
    with float32_region(student, teacher) as (student, teacher):
        log_p, log_q = (student / temperature).log_softmax(dim=1), (teacher / temperature).log_softmax(dim=1)
        if kind == "kl":
            value = (log_p.exp() * (log_p - log_q)).mean()
        else:
            log_m = (0.5 * (log_p.exp() + log_q.exp())).log()
            value = 0.5 * ((log_p.exp() * (log_p - log_m)).mean() + (log_q.exp() * (log_q - log_m)).mean())
        return temperature**2 * value


def load_word_vectors(path: str, count: int) -> torch.Tensor:
    """``[K, Dw]`` float32 word vectors of the attributes from a ``.npy`` or ``.pt`` file (one row per attribute).

    Raises:
        ValueError: naming the file when it is missing, of another format or not ``[count, Dw]``.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"SVIP word_vectors file {path} not found; pass a [K, Dw] .npy/.pt file or "
                         f"word_vectors: {TEXT_TOWER}")
    if file.suffix == ".npy":
        vectors = torch.from_numpy(np.load(file, allow_pickle=False))
    elif file.suffix == ".pt":
        vectors = torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"SVIP word_vectors file {path}: expected a .npy or .pt file holding a [K, Dw] array")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or len(vectors) != count:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"SVIP word_vectors file {path} holds {shape}; expected [{count}, Dw], one row per "
                         f"attribute of the task in its order")
    return vectors.float()


@dataclass
class SVIPPass:
    """What one transformer pass of SVIP yields.

    Attributes:
        attribute_scores: ``[B, G, K]`` P2A scores of every super-patch token.
        tokens: ``[B, G, s²W]`` grouped last-block tokens after the last LayerNorm (``Z``).
        attention: ``[L, B, T, T]`` head-averaged attention of every block, when asked for.
    """

    attribute_scores: torch.Tensor
    tokens: torch.Tensor
    attention: torch.Tensor | None = None


@dataclass
class SVIPInference:
    """The inference pass of a batch.

    Attributes:
        logits: ``[B, C]`` over all task classes.
        attributes: ``[B, K]`` pooled attribute scores ``â``.
        attribute_scores: ``[B, G, K]`` per super-patch.
        unrelated: ``[B, G]`` the selector's ``p̂``.
        kept: ``[B, G]`` bool, the ``M`` super-patches of lowest ``p̂``.
    """

    logits: torch.Tensor
    attributes: torch.Tensor
    attribute_scores: torch.Tensor
    unrelated: torch.Tensor
    kept: torch.Tensor


class SVIP(XVLMModule):
    """SVIP fine-tuning (module docstring: the computation, the schedule and the deviations from the reference).

    Args:
        keep: ``M``, the super-patches kept: a count (CUB 40, AwA2 and SUN 45 of 49) or, below 1, a share of ``G``.
        superpatch: ``s``, the side of a super-patch in patches.
        sigma: ``σ_s``, the scale of the class score.
        lambda_div: ``λ₁``, the weight of the divergence between the passes.
        lambda_patch: ``λ₂``, the weight of the selector's BCE.
        w_dec: weight of the attribute decorrelation ``L_dec``.
        divergence: ``kl`` (the code's) or ``jsd`` (the paper's).
        div_temperature: ``T`` of the divergence.
        pool: pooling of the token attribute scores in training (``mean``, the code's; ``max``, the paper's).
        infer_tokens: tokens pooled at inference: ``all`` (the code's) or ``kept`` (the paper's).
        normalize_pred: score with ``cos(â, a)`` (the paper's) instead of ``⟨â, a/‖a‖⟩`` (the code's).
        soft_targets: train the selector on ``1 − r/max r`` instead of the binary top-``M`` targets.
        word_vectors: ``text_tower`` or a ``[K, Dw]`` ``.npy``/``.pt`` file.
        selector_hidden: hidden width of the selector MLP.
        warmup_epochs: epochs that train only the selector, W2P and P2A.
        warmup_lr: their learning rate then.
        lr_decay: factor of the main learning rate every ``lr_decay_every`` epochs.
        lr_decay_every: epochs between decays.
        betas: Adam's ``(β₁, β₂)``.
        lr: main learning rate (all weights, after warm-up); re-declared for its default.
        weight_decay: Adam weight decay; re-declared for its default.
        **kwargs: the other :class:`XVLMModule` arguments (``model``, ``pretrained``, ``input_size``, ``calibration``,
            ``explainer``, ``init_weights``; ``freeze: image`` or ``all`` also fixes the image tower, the text tower
            is always fixed).
    """

    def __init__(
        self,
        keep: int | float = 0.8,
        superpatch: int = 2,
        sigma: float = 5.0,
        lambda_div: float = 1.0,
        lambda_patch: float = 3.0,
        w_dec: float = 0.09,
        divergence: Literal["kl", "jsd"] = "kl",
        div_temperature: float = 20.0,
        pool: Literal["mean", "max"] = "mean",
        infer_tokens: Literal["all", "kept"] = "all",
        normalize_pred: bool = False,
        soft_targets: bool = False,
        word_vectors: str = TEXT_TOWER,
        selector_hidden: int = 512,
        warmup_epochs: int = 4,
        warmup_lr: float = 5e-5,
        lr_decay: float = 0.8,
        lr_decay_every: int = 5,
        betas: tuple[float, float] = (0.5, 0.999),
        lr: float = 3e-5,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        for name, value, choices in (("divergence", divergence, ("kl", "jsd")), ("pool", pool, ("mean", "max")),
                                     ("infer_tokens", infer_tokens, ("all", "kept"))):
            if value not in choices:
                raise ValueError(f"SVIP {name}={value!r}: choose one of {', '.join(choices)}")
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        backbone = self.backbone
        width = backbone.vit_width  # the stepper's ViT: open_clip or timm (a ValueError naming the tower otherwise)
        backbone.set_freeze("all" if self.hparams.freeze in ("image", "all") else "text")
        backbone.logit_scale.requires_grad_(False)  # unused, like the pooled class feature and its projection:
        projection = getattr(backbone.image_tower, "proj", None)  # trainable, DDP would refuse them
        if isinstance(projection, nn.Parameter):
            projection.requires_grad_(False)
        with torch.no_grad():
            grid = backbone.embed_patches(torch.zeros(1, 3, self.input_side, self.input_side)).grid
        self.grid = tuple(grid)
        groups = (grid[0] // superpatch) * (grid[1] // superpatch)
        superpatch_scores(torch.zeros(1, grid[0] * grid[1]), self.grid, superpatch)  # a size that does not tile fails
        self.keep = int(keep) if keep >= 1 else max(1, round(keep * groups))
        if not 1 <= self.keep < groups:
            raise ValueError(f"SVIP keep={keep}: keeps {self.keep} of the {groups} super-patches of the "
                             f"{grid[0]}x{grid[1]} patch grid; keep between 1 and {groups - 1} (or a share below 1)")
        self.token_width = superpatch * superpatch * width
        self.selector = nn.Sequential(nn.Linear(self.token_width, selector_hidden), nn.ReLU(),
                                      nn.Linear(selector_hidden, 1))
        self.attribute_head: nn.Linear | None = None
        self.word_to_patch: nn.Linear | None = None
        self.attribute_to_subpatch: nn.Linear | None = None
        self.attribute_groups: tuple[tuple[int, ...], ...] = ()
        self.keep_precision = MeanMetric()
        self.keep_precision_random = MeanMetric()
        self.keep_recall = MeanMetric()

    # ----------------------------------------------------------------- task-dependent parts
    def build_task_parts(self, task: Task) -> None:
        """The class attribute vectors, the word vectors, W2P and P2A for ``task``'s ``K`` attributes (once)."""
        attributes = task.require("attributes", "SVIP")
        count = attributes.shape[1]
        if self.attribute_head is not None:
            if self.attribute_head.out_features != count:
                raise ValueError(f"SVIP was built for {self.attribute_head.out_features} attributes; {task.source} "
                                 f"has {count}")
        else:
            words = self._word_vectors(task, count)
            width = self.token_width // self.hparams.superpatch**2
            self.word_to_patch = nn.Linear(words.shape[1], width)
            self.attribute_to_subpatch = nn.Linear(count, self.hparams.superpatch**2)
            self.attribute_head = nn.Linear(self.token_width, count)
            self.register_buffer("word_vectors", words)
            self.to(self.backbone.logit_scale.device)
        device = self.backbone.logit_scale.device
        self.register_buffer("class_attributes", F.normalize(attributes.float(), dim=1).to(device), persistent=False)
        groups = task.extras.get("attribute_groups") or tuple((k,) for k in range(count))
        self.attribute_groups = tuple(tuple(group) for group in groups)

    def _word_vectors(self, task: Task, count: int) -> torch.Tensor:
        """``V [K, Dw]``: the text tower's features of the attribute names, or the ``word_vectors`` file."""
        source = self.hparams.word_vectors
        if source != TEXT_TOWER:
            return load_word_vectors(source, count)
        names = task.require("attribute_names", f"SVIP(word_vectors={TEXT_TOWER!r})")
        with torch.no_grad():
            return self.backbone.encode_texts(list(names)).float().cpu()

    # ----------------------------------------------------------------- the passes
    def context_embedding(self) -> torch.Tensor:
        """``e [s², W]``: one contextualisation vector per sub-patch from the word vectors (W2P)."""
        projected = self.word_to_patch(self.word_vectors.to(self.word_to_patch.weight.dtype))  # [K, W]
        return self.attribute_to_subpatch(projected.T).T

    def contextualise(self, patches: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """``PE + e`` on the patch embeddings ``[B, N, W]`` of the super-patches not ``kept [B, G]``."""
        size = self.hparams.superpatch
        e = self.context_embedding().flatten().to(patches.dtype)  # [s²W], sub-patch-major like a grouped token
        added = (~kept).to(patches.dtype).unsqueeze(-1) * e  # [B, G, s²W]
        return patches + ungroup_superpatches(added, self.grid, size)

    def unrelated_logits(self, patches: torch.Tensor) -> torch.Tensor:
        """The selector's logits ``[B, G]`` (``p̂ = σ(·)``) from the raw patch embeddings ``[B, N, W]``."""
        return self.selector(group_superpatches(patches, self.grid, self.hparams.superpatch)).squeeze(-1)

    def run(self, patches: torch.Tensor, attention: bool = False) -> SVIPPass:
        """One transformer pass on patch embeddings ``[B, N, W]``: grouped ``Z`` and its P2A scores."""
        backbone = self.backbone
        out = backbone.run_blocks(PatchTokens(patches, self.grid), attention=attention,
                                  layers=None if attention else 1)  # the rollout needs every block's attention
        tokens = group_superpatches(backbone.norm_tokens(out.tokens[-1][:, 1:]), self.grid, self.hparams.superpatch)
        return SVIPPass(self.attribute_head(tokens), tokens, torch.stack(out.attention) if attention else None)

    def class_scores(self, attributes: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``σ_s · â · (a_c/‖a_c‖)ᵀ`` ``[B, C']`` for ``â [B, K]`` over ``classes`` (all when None)."""
        prototypes = self.class_attributes if classes is None else self.class_attributes[classes]
        predicted = F.normalize(attributes, dim=1) if self.hparams.normalize_pred else attributes
        return self.hparams.sigma * predicted @ prototypes.to(predicted.dtype).T

    def infer(self, images: torch.Tensor) -> SVIPInference:
        """The inference pass (one transformer pass): the selector keeps the ``M`` super-patches of lowest ``p̂``,
        ``e`` is added to the others, and ``Â`` is pooled over ``infer_tokens``."""
        patches = self.backbone.embed_patches(images).tokens
        unrelated = self.unrelated_logits(patches).sigmoid()
        kept = top_mask(-unrelated.detach(), self.keep)
        out = self.run(self.contextualise(patches, kept))
        chosen = kept if self.hparams.infer_tokens == "kept" else None
        attributes = pooled_attributes(out.attribute_scores, chosen, "mean")
        return SVIPInference(self.class_scores(attributes), attributes, out.attribute_scores, unrelated, kept)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` over all task classes by the inference pass (differentiable in the images)."""
        return self.infer(images).logits

    # ----------------------------------------------------------------- training
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The terms of ``L`` (module docstring), their weighted sum ``loss`` and diagnostics of one batch."""
        hp = self.hparams
        target = self.seen_targets(batch)
        patches = self.backbone.embed_patches(batch["image"]).tokens
        first = self.run(patches, attention=True)
        kept, relevance = rollout_targets(first.attention.detach(), self.grid, self.keep, hp.superpatch,
                                          self.backbone.num_registers)
        second = self.run(self.contextualise(patches, kept))
        aligned = torch.einsum("bgd,bd->bg", second.tokens, second.tokens.mean(dim=1)).detach()
        attributes_a = pooled_attributes(first.attribute_scores, kept, hp.pool)
        attributes_b = pooled_attributes(second.attribute_scores, top_mask(aligned, self.keep), hp.pool)
        logits_a = self.class_scores(attributes_a, self.seen_classes)
        logits_b = self.class_scores(attributes_b, self.seen_classes)
        unrelated = self.unrelated_logits(patches)
        patch_target = (1 - relevance / relevance.amax(dim=1, keepdim=True).clamp_min(1e-12) if hp.soft_targets
                        else (~kept).float())
        with float32_region(unrelated, patch_target) as (unrelated32, patch_target):
            bce = F.binary_cross_entropy_with_logits(unrelated32, patch_target)
        out = {"ce_a": F.cross_entropy(logits_a.float(), target), "ce_b": F.cross_entropy(logits_b.float(), target),
               "div": divergence(logits_b / hp.sigma, logits_a / hp.sigma, hp.divergence, hp.div_temperature),
               "patch": bce}
        loss = out["ce_a"] + out["ce_b"] + hp.lambda_div * out["div"] + hp.lambda_patch * out["patch"]
        if hp.w_dec:
            out["dec"] = decorrelation_loss(attributes_b.float(), self.attribute_groups)
            loss = loss + hp.w_dec * out["dec"]
        out["loss"] = loss
        out["acc"] = (logits_b.argmax(dim=1) == target).float().mean()
        out["selector_agreement"] = (top_mask(-unrelated.detach(), self.keep) == kept).float().mean()
        return out

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Any], metric: Any, prefix: str) -> None:
        """GZSL metrics of the inference pass and, with object masks, the precision of the kept super-patches."""
        out = self.infer(batch["image"])
        metric.update(out.logits, batch["label"])
        if "mask" in batch:
            overlap = keep_precision(out.kept, batch["mask"], self.grid, self.hparams.superpatch)
            for name, values in zip(("keep_precision", "keep_precision_random", "keep_recall"), overlap):
                metric = getattr(self, name)
                metric.update(values)
                self.log(f"{prefix}/{name}", metric, batch_size=len(values))

    def explain(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The shared saliency of the predicted class (contract 4) and SVIP's own evidence (spec §9), per sample:

        - ``patches_maps [B, 3, gh, gw]`` (``patches_names``): the kept super-patches (1) against the contextualised
          ones (0), the selector's ``p̂`` (unrelated), and the rollout teacher's relevance ``r``;
          ``teacher_iou [B]``: the IoU of the selector's and the teacher's top-``M`` sets (a selector stuck at its
          prior keeps the same patches for every image);
        - ``attribute_maps [B, K, gh, gw]``: ``Â[:, k]``, each attribute's score per super-patch;
          ``attribute_contributions [B, K]``: ``σ_s â_k ā_{ŷ,k}``, the terms of the predicted class's logit;
          ``attribute_names``;
        - ``margin_contributions [B, K]`` (``margin_names``): ``σ_s â_k (ā_{ŷ,k} − ā_{r,k})``, the terms of the
          logit margin over the runner-up class ``r``.
        """
        out = explain_with(self, batch, self.explainer_name)
        images = batch["image"].to(self.device)
        inference = self.infer(images)
        patches = self.backbone.embed_patches(images)
        teacher_kept, relevance = rollout_targets(
            torch.stack(self.backbone.run_blocks(patches, attention=True).attention), self.grid, self.keep,
            self.hparams.superpatch, self.backbone.num_registers)
        shape = (len(images), self.grid[0] // self.hparams.superpatch, self.grid[1] // self.hparams.superpatch)
        selection = torch.stack([inference.kept.float(), inference.unrelated.float(), relevance.float()], dim=1)
        prototypes = self.class_attributes.to(inference.attributes.dtype)
        top2 = inference.logits.topk(2, dim=1).indices
        evidence = self.hparams.sigma * inference.attributes
        names = list(self.task.attribute_names or [f"attribute {k}" for k in range(prototypes.shape[1])])
        overlap = (inference.kept & teacher_kept).sum(dim=1).float()
        union = (inference.kept | teacher_kept).sum(dim=1).float()
        return out | {
            "patches_maps": selection.view(len(images), 3, *shape[1:]),
            "patches_names": [["kept", "selector p(unrelated)", "rollout teacher"]] * len(images),
            "teacher_iou": overlap / union,
            "attribute_maps": inference.attribute_scores.float().transpose(1, 2).reshape(len(images), -1, *shape[1:]),
            "attribute_contributions": (evidence * prototypes[top2[:, 0]]).float(),
            "attribute_names": [names] * len(images),
            "margin_contributions": (evidence * (prototypes[top2[:, 0]] - prototypes[top2[:, 1]])).float(),
            "margin_names": [names] * len(images),
        }

    # ----------------------------------------------------------------- optimisation
    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters trained from the first epoch: selector, W2P and P2A."""
        return [p for part in (self.selector, self.word_to_patch, self.attribute_to_subpatch, self.attribute_head)
                for p in part.parameters()]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """One Adam (``betas``, ``weight_decay``) over two groups: the heads, then the trainable backbone weights."""
        hp = self.hparams
        heads = self.head_parameters()
        own = {id(p) for p in heads}
        backbone = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        groups = [{"params": heads}] + ([{"params": backbone}] if backbone else [])
        return torch.optim.Adam(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                                fused=self.fused_kernels(groups))

    def configure_optimizers(self) -> dict[str, Any]:
        """:meth:`build_optimizer` with a per-epoch ``LambdaLR``: heads at ``warmup_lr`` then ``lr · decay``, the
        backbone at 0 then ``lr · decay``."""
        hp = self.hparams
        optimizer = self.build_optimizer()
        groups = optimizer.param_groups
        self.trainer.fit_loop._combined_loader = None  # as the base does: Lightning 2.6's resume (see there)

        def main(epoch: int) -> float:
            return hp.lr_decay ** (epoch // hp.lr_decay_every)

        def head(epoch: int) -> float:
            return hp.warmup_lr / hp.lr if epoch < hp.warmup_epochs else main(epoch)

        def trunk(epoch: int) -> float:
            return 0.0 if epoch < hp.warmup_epochs else main(epoch)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [head, trunk][: len(groups)])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """During warm-up, discard the backbone's gradients before clipping and the step (deviation 6)."""
        if self.current_epoch < self.hparams.warmup_epochs:
            own = {id(p) for p in self.head_parameters()}
            for param in self.parameters():
                if id(param) not in own:
                    param.grad = None


def keep_precision(kept: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int],
                   size: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, how the kept super-patches cover the object.

    Args:
        kept: ``[B, G]`` bool.
        masks: ``[B, H, W]`` object masks.

    Returns:
        ``(precision [B], share [B], recall [B])``: ``Σ mask·kept / Σ kept`` over pixels (the share of the kept
        pixels on the object), ``mean mask`` (the expected precision of a uniformly random selection of
        super-patches of equal size), and ``Σ mask·kept / Σ mask`` (the share of the object kept; a random
        selection's is ``M / G``; 1 for an image without object pixels).
    """
    index = superpatch_index(tuple(masks.shape[-2:]), grid, size).to(kept.device)
    on_kept = kept[:, index].float()  # [B, H, W]; never empty (M ≥ 1 super-patches are kept)
    masks = masks.float()
    recall = mass_in_mask(masks, on_kept).nan_to_num(nan=1.0)  # NaN: an image without object pixels
    return mass_in_mask(on_kept, masks), uniform_mass_in_mask(masks), recall
