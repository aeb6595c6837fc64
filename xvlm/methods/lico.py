"""LICO: language–image consistency for explainable image classifiers (Lei et al., NeurIPS 2023).

A classifier ``logits = W · GAP(F) + b`` on the feature maps ``F [B, N, h, w]`` of an image encoder is trained with

    L = λ_CE · CE(logits, y) + α · L_MM + β · L_OT

where the language side is the learnable class prompts of :class:`~xvlm.prompts.SoftPrompts` passed through the
frozen CLIP text tower: ``M`` prompt variants per class (context rolled by ``k = 0..M−1``), each encoded to its
end-of-text feature ``[M, E]`` and mapped per token by ``h_ψ: E → d'`` (Linear, Dropout, ReLU, Linear), so the
sample's language tokens are ``G_i = h_ψ(G_{y_i}) [M, d']`` with ``d' = h·w``. The ``N`` channels of ``F`` are the
visual tokens ``[N, d']``.

- **Manifold matching** (across the batch): ``L_MM = (1/B) Σ_i KL(A^G_i ‖ A^F_i)`` with
  ``A^X_ij = softmax_{j≠i}(−κ ‖x_i − x_j‖₂)`` over unit-norm flattened features (``mm_features='flattened'``) or pooled
  ones (``'pooled'``: ``GAP(F)`` and the variants' mean text feature), ``κ = exp(s)``, ``s`` learnt and clamped to
  ``[0, log 100]`` (:func:`manifold_matching_loss`).
- **Optimal transport** (within each sample): ``L_OT = mean_i Σ_nm P*_nm C_nm`` with ``C_nm = ‖f̂_n − ĝ_m‖² =
  2 − 2 cos`` between unit-norm visual and language tokens and the entropic plan ``P*`` of uniform marginals,
  computed without gradient (:func:`optimal_transport_loss`).

Inference uses no text: :meth:`LICO.classify` is the classifier; ``explain`` is the shared one of
:class:`~xvlm.methods.base.XVLMModule` with the shared default explainer (integrated gradients of the predicted
class, which localises best on the Shapes benchmark, ``docs/explanations.md``); the paper's Grad-CAM is
``explainer: gradcam`` (deviation 12), and ``explainer`` selects any other of :mod:`xvlm.explain.explainers`.
``F`` is the backbone's :meth:`~xvlm.backbones.VisionLanguageModel.feature_maps`: with the CLIP image tower of
``model`` (``image_encoder='clip'``) its last block's patch tokens projected into the joint space and laid out as
``[B, D, h, w]``, so ``N = D`` and ``d' = h·w``; with a timm model (``image_encoder='timm:<name>'``, a base
argument) ``forward_features``. With the CLIP tower, :meth:`zero_shot_encoder` (the shared one of
:class:`~xvlm.methods.base.XVLMModule`) returns the fine-tuned towers for LaZSL; a timm encoder has no text-aligned
image embedding, so it returns the frozen CLIP of ``model`` and ``pretrained``, and LaZSL's numbers stay constant
across epochs (spec §2.5).
Everything else LICO shares with every method (backbone arguments, evaluation, optimiser groups with ``head_lr``
for LICO's own parts, ``init_weights``) comes from :class:`~xvlm.methods.base.XVLMModule`; the base defaults
(``xvlm-tiny`` Shapes backbone, AdamW) apply unless a config gives the paper's recipe (``configs/lico/``: SGD at
lr 0.1, ViT-B-32 text tower).

Deviations from the reference code (ymLeiFDU/LICO) and from the letter of the paper, all deliberate:

1. The OT plan is detached, the cost is not: the reference computes L_OT under ``no_grad``, so it trains nothing.
2. The CLIP text tower is frozen and outside the optimiser (the reference trains it with SGD at lr 0.1), whatever
   ``freeze`` says (``freeze='image'`` or ``'all'`` also fix the image encoder).
3. Variant ``k`` rolls the context by ``k`` (the reference rolls every variant by 1, so all are identical).
4. ``softmax(−κ·distance)`` with a clamped, exp-parametrised scale (the reference uses ``+distance`` and a raw
   divisor), over the other samples of the batch: the paper's softmax over all ``j`` includes ``j = i``,
   whose distance is 0, so at ``κ = 1/0.07`` each row is almost one-hot on itself and L_MM vanishes.
5. Language tokens are gathered by label once (the reference gathers twice, pairing samples with wrong classes).
6. Class names come from the task in label order; every shape is derived from the encoder and the task.
7. Only the classes present in the batch are encoded (the reference encodes all ``C · M`` prompts every step).
8. Sinkhorn is the shared batched solver in float32, and the costs and affinities of both losses are built in
   float32 with autocast off (a ``bf16-mixed`` run would otherwise build ``2 − 2 cos`` and ``A^F``, ``A^G`` in
   bfloat16). Each sample's problem stops on its own once its relative row-marginal error
   ``max_n |(P 1)_n − 1/N| · N`` is below ``ot_tol`` (``ot_stop_rule='relative'``), which means the same accuracy
   at every ``N``. The default 1e-4 lies between what the reference's rule reaches at CIFAR-10's ``N = 128``
   (about 2e-4 on random features) and CIFAR-100's ``N = 512`` (about 5e-5), and ``ot_max_iter = 1000`` (the
   reference's 100) lets the tolerance, not the cap, end the iterations on hard problems (low-rank features need
   100-250; random ones about 10). The reference stops when ``mean_b Σ_n |Δφ_n| < 1e-3`` for the dual potentials
   ``φ = ε log u``, a threshold that tightens with ``N``; ``ot_stop_rule='reference'`` applies it per sample (the
   reference averages it over the batch, so a sample's plan depends on its batch), with ``ot_max_iter = 100`` for
   the reference's cap. The host reads the stopping flag every ``ot_check_every = 10`` iterations (3-4 reads per
   step at the Shapes defaults, where the problems stop after about 20); the plans do not depend on it
   (:mod:`xvlm.ot`), and ``ot_check_every = 0`` with a fixed ``ot_max_iter`` gives a step that never waits.
9. The classifier is trained on the task's seen classes only (unseen classes are LaZSL's); with no unseen
   classes this is the ordinary classifier.
10. No unused parameters (the reference's ``logit_scale`` and 768→512 layer) and no hidden training noise.
11. Not implemented: the ``per_token`` language-token mode (one prompt per class, per-position outputs); the
    ``variants`` mode the authors describe is the only one.
12. Grad-CAM is the shared ``gradcam`` explainer (captum's ``LayerGradCam`` on the image tower), not a LICO-own
    Grad-CAM on ``F``. With a timm encoder its layer is the encoder's output feature map, which is ``F``, so the
    map is the class activation map ``relu(Σ_k W_ck F_k)`` of the linear head, as in the reference (Grad-CAM on
    the last convolutional stage). With the CLIP tower its layer is the patch tokens entering the last block (the
    layer every method's Grad-CAM uses; a class-token-pooled tower has no gradient on the last block's output),
    not ``F = ln_post(x_L) P``: the map also covers the last block's own attention and MLP.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.task import Task
from xvlm.methods.base import XVLMModule
from xvlm.ot import StopRule, float32_region, sinkhorn
from xvlm.prompts import SoftPrompts
from xvlm.zeroshot.lazsl import evaluating

MM_SCALE_INIT = math.log(1 / 0.07)
MM_SCALE_MAX = math.log(100.0)
REFERENCE_OT_TOL = 1e-3
"""The reference code's threshold on ``Σ_n |Δφ_n|`` (``ot_stop_rule='reference'``)."""


def ot_stopping(stop_rule: str, tol: float) -> tuple[StopRule, float]:
    """The :func:`~xvlm.ot.sinkhorn` rule and threshold of LICO's ``ot_stop_rule`` and ``ot_tol``.

    ``relative``: ``('relative', tol)``; ``reference``: the reference code's ``('potential', 1e-3)``.

    Raises:
        ValueError: naming ``ot_stop_rule`` if it is neither.
    """
    if stop_rule == "relative":
        return "relative", tol
    if stop_rule == "reference":
        return "potential", REFERENCE_OT_TOL
    raise ValueError(f"LICO ot_stop_rule={stop_rule!r}: choose 'relative' or 'reference'")


def log_affinity(features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``log A`` with ``A_ij = softmax_{j≠i}(−κ ‖x_i − x_j‖₂)``: ``[B, B]`` from ``[B, K]``; the diagonal holds 0.

    ``features`` are L2-normalised first, so the distance is ``sqrt(2 − 2 x_i·x_j)``. A sample's distance to
    itself is left out: it is always 0 and would put nearly all of each row's mass on the diagonal at
    ``κ = 1/0.07``, leaving nothing to match.
    """
    x = F.normalize(features.flatten(1), dim=-1)
    distance = (2 - 2 * x @ x.T).clamp_min(1e-12).sqrt()
    self_pair = torch.eye(len(x), dtype=torch.bool, device=x.device)
    log_a = (-scale * distance).masked_fill(self_pair, -math.inf).log_softmax(dim=-1)
    return log_a.masked_fill(self_pair, 0.0)  # a finite placeholder keeps gradients free of 0 * inf


def manifold_matching_loss(image: torch.Tensor, language: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``L_MM = (1/B) Σ_i KL(A^G_i ‖ A^F_i)`` over ``j ≠ i`` (language affinities are the target); 0 when B < 2.

    Affinities and the divergence are computed in float32 (float64 stays) with autocast off; the gradient reaches
    both feature sets and ``log_scale``.

    Args:
        image: ``[B, ...]`` image features ``F_i`` (flattened per sample).
        language: ``[B, ...]`` language features ``G_i`` (flattened per sample).
        log_scale: scalar ``s``; ``κ = exp(clamp(s, 0, log 100))``.
    """
    with float32_region(image, language, log_scale) as (image, language, log_scale):
        if len(image) < 2:
            return image.sum() * 0
        scale = log_scale.clamp(0, MM_SCALE_MAX).exp()
        log_target, log_prediction = log_affinity(language, scale), log_affinity(image, scale)
        off_diagonal = 1 - torch.eye(len(image), dtype=log_target.dtype, device=image.device)
        return (off_diagonal * log_target.exp() * (log_target - log_prediction)).sum() / len(image)


def transport_cost(visual: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
    """``C_nm = ‖f̂_n − ĝ_m‖² = 2 − 2 cos(f_n, g_m)``: ``[B, N, M]`` from ``[B, N, d']`` and ``[B, M, d']``.

    Computed in float32 (float64 stays) with autocast off, differentiably in both inputs.
    """
    with float32_region(visual, language) as (visual, language):
        return 2 - 2 * F.normalize(visual, dim=-1) @ F.normalize(language, dim=-1).transpose(1, 2)


def optimal_transport_loss(
    visual: torch.Tensor,
    language: torch.Tensor,
    eps: float = 0.1,
    max_iter: int = 1000,
    tol: float = 1e-4,
    stop_rule: Literal["relative", "reference"] = "relative",
    check_every: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_OT = mean_i ⟨P*_i, C_i⟩`` with the plan ``P*`` held fixed; returns ``(loss, plans [B, N, M])``.

    ``P*`` is the entropic plan (uniform marginals ``1/N``, ``1/M``, regulariser ``eps``) of the detached cost;
    cost, plan and loss are float32 (float64 stays) under any autocast. The gradient reaches
    ``visual [B, N, d']`` and ``language [B, M, d']`` through ``C`` only, which is the gradient of the entropic OT
    value with respect to ``C`` (envelope theorem).

    Args:
        visual: ``[B, N, d']`` visual tokens.
        language: ``[B, M, d']`` language tokens.
        eps: Sinkhorn regulariser.
        max_iter: most Sinkhorn iterations per sample.
        tol: with ``stop_rule='relative'``, a sample's Sinkhorn stops once ``max_n |(P 1)_n − 1/N| · N < tol``.
        stop_rule: ``relative``, or ``reference``: the reference code's ``Σ_n |Δφ_n| < 1e-3`` on the dual
            potentials (:data:`REFERENCE_OT_TOL`; ``tol`` is not used), per sample.
        check_every: iterations between reads of the stopping flag (:func:`~xvlm.ot.sinkhorn`).
    """
    rule, threshold = ot_stopping(stop_rule, tol)
    cost = transport_cost(visual, language)
    with torch.no_grad():
        plan = sinkhorn(cost.detach(), eps=eps, max_iter=max_iter, tol=threshold, stop_rule=rule,
                        check_every=check_every)
    with float32_region(cost) as (cost,):
        return (plan * cost).sum(dim=(1, 2)).mean(), plan


class LICO(XVLMModule):
    """LICO fine-tuning (see the module docstring for the losses and the deviations from the reference).

    Args:
        lambda_ce: weight of the cross-entropy.
        alpha: weight of ``L_MM`` (0 turns it off).
        beta: weight of ``L_OT`` (0 turns it off; with ``alpha = 0`` too, the text side is never run: the CE
            baseline with the same encoder and head).
        n_ctx: context vectors, which is also the number ``M`` of prompt variants.
        class_specific_ctx: one context per class.
        mapper_hidden: hidden width of ``h_ψ``.
        mapper_dropout: dropout of ``h_ψ``.
        mm_features: ``flattened`` maps or ``pooled`` features for ``L_MM``.
        ot_eps: Sinkhorn regulariser.
        ot_max_iter: most Sinkhorn iterations per sample (the reference caps at 100).
        ot_tol: with ``ot_stop_rule='relative'``, a sample's Sinkhorn stops once its relative row-marginal error
            ``max_n |(P 1)_n − 1/N| · N`` is below ``ot_tol`` (deviation 8).
        ot_stop_rule: ``relative``, or ``reference``: the reference code's rule ``Σ_n |Δφ_n| < 1e-3`` on the dual
            potentials ``φ = ε log u``, applied per sample (``ot_tol`` is then not used; set ``ot_max_iter=100``
            for the reference's cap).
        ot_check_every: Sinkhorn iterations between two reads of the stopping flag (0: never read; every step
            then runs ``ot_max_iter`` iterations and nothing waits for the device).
        **kwargs: :class:`XVLMModule` arguments (``model`` is the open_clip model whose text tower encodes the
            prompts; ``image_encoder``, ``input_size`` — required for a timm encoder, it fixes ``d' = h·w`` —,
            ``head_lr`` for LICO's own parts, optimiser, ``init_weights``, ``explainer`` for :meth:`explain`:
            the shared default, or ``gradcam`` (the paper's), ``gradcam++`` or any other registry name).
    """

    classifies_unseen = False

    def __init__(
        self,
        lambda_ce: float = 1.0,
        alpha: float = 10.0,
        beta: float = 1.0,
        n_ctx: int = 12,
        class_specific_ctx: bool = False,
        mapper_hidden: int = 512,
        mapper_dropout: float = 0.5,
        mm_features: Literal["flattened", "pooled"] = "flattened",
        ot_eps: float = 0.1,
        ot_max_iter: int = 1000,
        ot_tol: float = 1e-4,
        ot_stop_rule: Literal["relative", "reference"] = "relative",
        ot_check_every: int = 10,
        **kwargs: Any,
    ) -> None:
        ot_stopping(ot_stop_rule, ot_tol)  # an unknown rule fails here, before the backbone is built
        super().__init__(**kwargs)
        if not self.backbone.text_aligned_images and self.hparams.input_size is None:
            raise ValueError(f"LICO(image_encoder={self.hparams.image_encoder!r}) needs input_size (the image side it "
                             "is trained at), which fixes the feature-map size d' = h*w")
        self.backbone.set_freeze("all" if self.hparams.freeze in ("image", "all") else "text")
        self.backbone.logit_scale.requires_grad_(False)  # LICO's losses never read it: trainable, DDP would refuse it
        side = self.input_side
        with evaluating(self.backbone):  # eval mode: the probe must not move batch-norm statistics of loaded weights
            channels, height, width = self.feature_maps(torch.zeros(1, 3, side, side)).shape[1:]
        self.num_tokens, self.token_dim = int(channels), int(height * width)
        text_dim = self.backbone.embed_dim
        self.mapper = nn.Sequential(nn.Linear(text_dim, mapper_hidden), nn.Dropout(mapper_dropout), nn.ReLU(),
                                    nn.Linear(mapper_hidden, self.token_dim))
        self.mm_log_scale = nn.Parameter(torch.tensor(MM_SCALE_INIT))
        self.prompts: SoftPrompts | None = None
        self.head: nn.Linear | None = None

    # ----------------------------------------------------------------- task-dependent parts
    def build_task_parts(self, task: Task) -> None:
        """Build the prompts and the classifier head over ``task``'s seen classes (once; checkpoints load after)."""
        if self.head is None:
            self.head = nn.Linear(self.num_tokens, len(task.seen))
            self.prompts = SoftPrompts(self.backbone, task.class_names, self.hparams.n_ctx,
                                       self.hparams.class_specific_ctx)
            self.to(self.backbone.logit_scale.device)
        elif self.head.out_features != len(task.seen):
            raise ValueError(f"LICO was built for {self.head.out_features} seen classes; {task.source} has "
                             f"{len(task.seen)}")

    # ----------------------------------------------------------------- image side
    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The visual tokens as maps ``F [B, N, h, w]`` (the backbone's image tower, see the module docstring)."""
        return self.backbone.feature_maps(images)

    def seen_logits(self, maps: torch.Tensor) -> torch.Tensor:
        """Classifier logits ``[B, C_seen]`` of ``W · GAP(F) + b``."""
        return self.head(maps.mean(dim=(2, 3)))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` over all task classes; unseen classes (never trained) get ``−inf``."""
        return self._all_classes(self.seen_logits(self.feature_maps(images)))

    def _all_classes(self, seen_logits: torch.Tensor) -> torch.Tensor:
        """``[B, C_seen] -> [B, C]`` task-indexed logits, ``−inf`` at unseen classes."""
        logits = seen_logits.new_full((len(seen_logits), self.task.num_classes), -math.inf)
        return logits.index_copy(1, self.seen_classes, seen_logits)

    # ----------------------------------------------------------------- language side
    def language_tokens(self, classes: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G [B, M, d'], text [B, M, E])``: mapped and raw variant features of each sample's class.

        Only the batch's classes ``classes [K]`` (task labels) are encoded; sample ``b`` takes row ``index[b]``.
        """
        text = self.prompts.encode_variants(self.backbone, classes, self.hparams.n_ctx)[index]
        return self.mapper(text), text

    # ----------------------------------------------------------------- training
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``ce``, ``mm``, ``ot`` and their weighted sum ``loss`` of one batch (``mm``/``ot`` only when weighted)."""
        hp = self.hparams
        target = self.seen_targets(batch)
        maps = self.feature_maps(batch["image"])
        logits = self.seen_logits(maps)
        out = {"ce": F.cross_entropy(logits, target)}
        loss = hp.lambda_ce * out["ce"]
        if hp.alpha or hp.beta:
            present, index = self.seen_classes_present(batch)
            language, text = self.language_tokens(self.seen_classes[present], index)
            visual = maps.flatten(2)
            if hp.alpha:
                image_side, text_side = (visual, language) if hp.mm_features == "flattened" else (
                    visual.mean(dim=2), text.mean(dim=1))
                out["mm"] = manifold_matching_loss(image_side, text_side, self.mm_log_scale)
                loss = loss + hp.alpha * out["mm"]
            if hp.beta:
                out["ot"] = optimal_transport_loss(visual, language, hp.ot_eps, hp.ot_max_iter, hp.ot_tol,
                                                   hp.ot_stop_rule, hp.ot_check_every)[0]
                loss = loss + hp.beta * out["ot"]
        out["loss"] = loss
        out["acc"] = (logits.argmax(dim=1) == target).float().mean()
        return out

