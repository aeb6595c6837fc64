"""ECOR: the joint likelihood of category and rationale (Rasekh et al., 2024; spec ``methods/ecor.md``), with DROR
(Mao et al., CVPR 2023) as its ``flat`` factorisation.

An explainable prediction is right about the category ``c`` *and* about why: a rationale ``r`` visible in the image.
On a frozen CLIP with ``B`` images, ``C`` categories, ``R`` rationales (the task's normalised vocabulary), unit image
features ``f [B, D]`` and CLIP's frozen temperature ``τ``:

- **Prompts** (``prompt_mode``): ``visual`` (default, DROR's): ``P`` learnable tokens ``[P, W] ~ N(0, 0.02²)``
  appended to the image token sequence (:meth:`~xvlm.backbones.VisionLanguageModel.add_prompt_tokens`), the text
  fixed; ``text``: CoOp context vectors per prompt family (:class:`~xvlm.prompts.SoftPrompts`), the image fixed.
- **Text** (fixed in ``visual`` mode, so encoded once per vocabulary and cached, chunked, in float16):
  ``g_R [R, D]`` of "a photo of an object because there is {r}", ``g_C [C, D]`` of "This is a photo of a {c}" and
  ``g_CR [C, R, D]`` of DROR's "This is a photo of a {c} because there is {r}" (every pair: the full product).
- **Scores**: ``s_R = τ f g_Rᵀ``, ``s_C = τ f g_Cᵀ``, ``s_CR[b, c, r] = τ ⟨f_b, g_CR[c, r]⟩``.
- **Factorisations** (``factorization``) of ``log P(c, r | I)`` and their teacher-forced losses (``c*, r*``: the
  image's category and ground-truth rationale):

  ==================  ================================================  =============================================
  ``rationale_first``  ``log_softmax_r s_R + log_softmax_c s_CR[:, :, r]``  ``CE(s_R, r*) + CE(s_CR[:, :, r*], c*)`` (ECOR)
  ``category_first``   ``log_softmax_c s_C + log_softmax_r s_CR[:, c, :]``  ``CE(s_C, c*) + CE(s_CR[:, c*, :], r*)``
  ``independent``      ``log_softmax_c s_C + log_softmax_r s_R``            ``CE(s_C, c*) + CE(s_R, r*)``
  ``flat``             ``log_softmax_{(c, r)} s_CR``                        ``CE(s_CR, (c*, r*))`` (DROR)
  ==================  ================================================  =============================================

- **Inference**: the exact top-``k`` pairs of the joint by a pruned search (:func:`pruned_top_k`): the outer factor
  (``P(r|I)``, or ``P(c|I)`` for the category-first and independent models) is visited in descending order, in
  chunks, and the search stops once the ``k``-th best joint is at least every unvisited outer log-probability (the
  inner factor is a log-probability, ``≤ 0``); ``flat`` has no such bound and is scored in chunks without pruning.
  The model's prediction is the top pair's category. Evaluation (:mod:`xvlm.metrics.rationale`) scores the top-``k``
  list with the strict doubly-right scorer (``val/RR``, ``val/RW``, ``val/WR``, ``val/WW``), DROR's scorer on the
  pairs' sentences (``val/compat_RR`` ...) and the top pair's category accuracy (``val/acc``).
- :meth:`classify` is ``log P(c | I)``, the joint summed over rationales (chunked), for the explainers.

Choices where the paper is silent (spec §2 calls them our reconstruction): the rationale prompt's wording; the
trainable part (DROR's visual prompt tokens, or CoOp context vectors); image→text cross-entropy only; the loss is
``−log P(c*, r*|I)`` written as the two factors' cross-entropies; every factorisation scores the full product of
categories and rationales; ``P(r|c, I)`` reuses the pair prompts with the softmax over rationales.

Deviations from DROR's code (spec §8): the strict scorer is the default (DROR's early-stopping substring scorer is
``compat``, logged beside it); model selection on a validation split held out from train (DROR validates on
test); text features cached per vocabulary (on disk with ``text_cache``), not re-encoded every run; DROR's lr 40 is
kept for ``visual`` mode only (``text`` mode's configs use CoOp's 0.002); the prompt tokens enter like register
tokens, after the position embeddings and before ``ln_pre`` (DROR prepends them after the embedding layer; both are
position-free tokens every block attends to).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from datamodules.task import Task
from xvlm.explain.explainers import explain_with
from xvlm.methods.base import XVLMModule
from xvlm.metrics import (
    DoublyRightMetrics,
    compat_verdicts,
    doubly_right_from_topk,
    ranked_sentences,
)
from xvlm.ot import float32_region
from xvlm.prompts import SoftPrompts

Factorization = Literal["rationale_first", "category_first", "independent", "flat"]
FACTORIZATIONS = ("rationale_first", "category_first", "independent", "flat")
FAMILIES = {"rationale_first": ("rationale", "pair"), "category_first": ("category", "pair"),
            "independent": ("category", "rationale"), "flat": ("pair",)}
"""The prompt families each factorisation reads (``text`` mode trains only these: DDP needs every trained weight
used)."""
RATIONALE_TEMPLATE = "a photo of an object because there is {r}"
CATEGORY_TEMPLATE = "This is a photo of a {c}"


@dataclass
class TopPairs:
    """The ``k`` best pairs of each image: ``log_prob [B, k]`` (descending), ``category [B, k]``,
    ``rationale [B, k]``; ``visited``: outer entries the search scored (of ``outer_size``)."""

    log_prob: torch.Tensor
    category: torch.Tensor
    rationale: torch.Tensor
    visited: int = 0
    outer_size: int = 0


def pruned_top_k(outer: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor], k: int, chunk: int,
                 prune: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The exact top-``k`` of ``J[b, m, n] = outer[b, m] + inner(m)[b, n]`` without forming all of ``J``.

    Args:
        outer: ``[B, M]`` log-probabilities of the outer factor.
        inner: ``ids [m] -> [B, m, N]`` the inner factor for those outer entries; with ``prune`` its values must be
            ``≤ 0`` (log-probabilities), so ``J[b, m, ·] ≤ outer[b, m]``.
        k: pairs kept per row (``k ≤ M·N``).
        chunk: outer entries scored per step.
        prune: stop once every row's ``k``-th best is at least the largest unvisited ``outer[b, ·]`` (exact: no
            unvisited entry can exceed it); without it every chunk is scored.

    Returns:
        ``values [B, k]`` (descending), ``outer_index [B, k]``, ``inner_index [B, k]`` and the entries visited.
        Rows visit ``outer`` in the order of its column maxima; equal values may be ordered differently than a
        brute-force ``topk`` orders them.
    """
    rows, size = outer.shape
    order = outer.amax(dim=0).argsort(descending=True)
    remaining = outer[:, order].flip(1).cummax(dim=1).values.flip(1)  # [B, M]: max over order[j:]
    values = outer.new_full((rows, k), -math.inf)
    outer_index = torch.zeros(rows, k, dtype=torch.long, device=outer.device)
    inner_index = torch.zeros_like(outer_index)
    visited = 0
    for start in range(0, size, chunk):
        if prune and start and bool((values[:, -1] >= remaining[:, start]).all()):
            break
        ids = order[start : start + chunk]
        joint = outer[:, ids, None] + inner(ids)  # [B, m, N]
        width = joint.shape[2]
        flat_ids = torch.arange(joint[0].numel(), device=outer.device)
        candidates = torch.cat([values, joint.flatten(1)], dim=1)
        top = candidates.topk(k, dim=1)
        from_chunk = (top.indices - k).clamp_min(0)
        new_outer = ids[flat_ids[from_chunk] // width]
        new_inner = flat_ids[from_chunk] % width
        old = top.indices < k
        outer_index = torch.where(old, outer_index.gather(1, top.indices.clamp_max(k - 1)), new_outer)
        inner_index = torch.where(old, inner_index.gather(1, top.indices.clamp_max(k - 1)), new_inner)
        values = top.values
        visited += len(ids)
    return values, outer_index, inner_index, visited


def joint_log_probs(factorization: Factorization, s_r: torch.Tensor, s_c: torch.Tensor,
                    s_cr: torch.Tensor) -> torch.Tensor:
    """``log P(c, r | I)`` ``[B, C, R]`` of ``factorization`` from ``s_R [B, R]``, ``s_C [B, C]`` and ``s_CR
    [B, C, R]`` (module docstring's table), in float32: the brute-force reference of :func:`pruned_top_k`."""
    with float32_region(s_r, s_c, s_cr) as (s_r, s_c, s_cr):
        if factorization == "rationale_first":
            return s_r.log_softmax(dim=1)[:, None, :] + s_cr.log_softmax(dim=1)
        if factorization == "category_first":
            return s_c.log_softmax(dim=1)[:, :, None] + s_cr.log_softmax(dim=2)
        if factorization == "independent":
            return s_c.log_softmax(dim=1)[:, :, None] + s_r.log_softmax(dim=1)[:, None, :]
        return s_cr.flatten(1).log_softmax(dim=1).view_as(s_cr)


@dataclass
class TextFeatures:
    """Unit text features: ``rationales [R, D]``, ``categories [C, D]``, ``pairs [C, R, D]`` (float16 when cached;
    in ``text`` mode a family the factorisation does not read is None)."""

    rationales: torch.Tensor | None
    categories: torch.Tensor | None
    pairs: torch.Tensor | None


class ECOR(XVLMModule):
    """ECOR / DROR fine-tuning (module docstring: factorisations, losses, the pruned search, the deviations).

    Args:
        factorization: ``rationale_first`` (ECOR), ``category_first``, ``independent`` or ``flat`` (DROR).
        prompt_mode: ``visual`` (learnable image tokens) or ``text`` (CoOp context vectors per prompt family).
        n_prompt_tokens: visual prompt tokens ``P`` (3; DROR's ImageNet runs use 30); 0 trains nothing: the
            towers score as they are (DROR's "CLIP zero-shot" row, or another method's fine-tuned towers).
        prompt_init_std: their initial standard deviation.
        n_ctx: context vectors per prompt family in ``text`` mode.
        top_k: pairs ranked per image for the doubly-right metrics.
        pair_template: DROR's conditional prompt, with ``{c}`` and ``{r}``.
        rationale_template: the rationale prompt, with ``{r}``.
        category_template: the category prompt, with ``{c}``.
        text_chunk: prompts per text-tower call when encoding a vocabulary.
        search_chunk: outer entries (rationales or categories) scored per step of the top-``k`` search.
        text_cache: folder of the float16 text-feature cache (keyed by model, weights, template and vocabulary);
            None keeps it in memory only.
        optimizer / lr / weight_decay / warmup_steps: re-declared for DROR's defaults (SGD, 40, 0, 1000 warm-up
            steps of the cosine schedule; ``momentum`` 0.9 is the base's).
        **kwargs: the other :class:`XVLMModule` arguments (``model``, ``pretrained``, ``input_size``, ``explainer``,
            ``init_weights``); the CLIP towers are frozen but for the prompts.
    """

    stores_frozen_weights = False

    def __init__(
        self,
        factorization: Factorization = "rationale_first",
        prompt_mode: Literal["visual", "text"] = "visual",
        n_prompt_tokens: int = 3,
        prompt_init_std: float = 0.02,
        n_ctx: int = 4,
        top_k: int = 5,
        pair_template: str = "This is a photo of a {c} because there is {r}",
        rationale_template: str = RATIONALE_TEMPLATE,
        category_template: str = CATEGORY_TEMPLATE,
        text_chunk: int = 2048,
        search_chunk: int = 64,
        text_cache: str | None = None,
        optimizer: Literal["adamw", "adam", "sgd"] = "sgd",
        lr: float = 40.0,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        **kwargs: Any,
    ) -> None:
        for name, value, choices in (("factorization", factorization, FACTORIZATIONS),
                                     ("prompt_mode", prompt_mode, ("visual", "text"))):
            if value not in choices:
                raise ValueError(f"ECOR {name}={value!r}: choose one of {', '.join(choices)}")
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)
        self.backbone.set_freeze("all")
        if prompt_mode == "visual" and n_prompt_tokens:
            self.backbone.add_prompt_tokens(n_prompt_tokens, prompt_init_std)
        self.prompts: torch.nn.ModuleDict | None = None
        self.strict_metrics = {split: DoublyRightMetrics() for split in ("val", "test")}
        self.compat_metrics = {split: DoublyRightMetrics() for split in ("val", "test")}
        self.accuracy = {split: MeanMetric() for split in ("val", "test")}
        self.metric_modules = torch.nn.ModuleList([*self.strict_metrics.values(), *self.compat_metrics.values(),
                                                   *self.accuracy.values()])
        self._fixed_text: TextFeatures | None = None

    # ----------------------------------------------------------------- task-dependent parts
    def build_task_parts(self, task: Task) -> None:
        """The vocabulary of ``task`` (categories, rationales, the pairs' sentences); text features are encoded on
        first use. A checkpoint's prompts carry over to any vocabulary (zero-shot transfer)."""
        vocab = task.require("rationale_vocab", "ECOR")
        self.categories = tuple(name.replace("_", " ") for name in task.class_names)
        self.rationale_names = tuple(vocab)
        self._fixed_text = None
        self._class_text = None
        if self.hparams.prompt_mode == "text":
            self._build_text_prompts()

    def _build_text_prompts(self) -> None:
        """CoOp contexts of the three prompt families over this task's names (a contexts' shape is independent of
        the vocabulary, so a checkpoint's carry over)."""
        n_ctx = self.hparams.n_ctx
        names = {"rationale": list(self.rationale_names), "category": list(self.categories),
                 "pair": [f"{c} because there is {r}" for c in self.categories for r in self.rationale_names]}
        families = {family: names[family] for family in FAMILIES[self.hparams.factorization]}
        old = self.prompts
        self.prompts = torch.nn.ModuleDict({name: SoftPrompts(self.backbone, names, n_ctx)
                                            for name, names in families.items()}).to(self.backbone.logit_scale.device)
        if old is not None:
            for name, prompts in self.prompts.items():
                prompts.context = old[name].context

    # ----------------------------------------------------------------- text
    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        chunk = self.hparams.text_chunk
        return torch.cat([self.backbone.encode_texts(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])

    def _cached(self, name: str, texts: Sequence[str]) -> torch.Tensor:
        """Unit features ``[len(texts), D]`` of fixed prompts, float16, from ``text_cache`` when it holds them."""
        folder, hp = self.hparams.text_cache, self.hparams
        path = None
        if folder is not None and hp.pretrained is not None:
            key = hashlib.sha1("\n".join([hp.model, str(hp.pretrained), name, *texts]).encode()).hexdigest()[:16]
            path = Path(folder) / f"ecor-{name}-{key}.pt"
            if path.is_file():
                return torch.load(path, map_location=self.device, weights_only=True)
        with torch.inference_mode(False), torch.no_grad():
            features = self._encode(texts).half()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(features.cpu(), path)
        return features

    def text_features(self) -> TextFeatures:
        """``g_R``, ``g_C``, ``g_CR`` of the task's vocabulary: fixed ones cached once per vocabulary (``visual``
        mode); the prompts' current ones in ``text`` mode (with gradients in training, cached per evaluation)."""
        hp = self.hparams
        if hp.prompt_mode == "visual":
            if self._fixed_text is None:
                pairs = [hp.pair_template.format(c=c, r=r) for c in self.categories for r in self.rationale_names]
                self._fixed_text = TextFeatures(
                    self._cached("rationales", [hp.rationale_template.format(r=r) for r in self.rationale_names]),
                    self._cached("categories", [hp.category_template.format(c=c) for c in self.categories]),
                    self._cached("pairs", pairs).view(len(self.categories), len(self.rationale_names), -1))
            return self._fixed_text
        if not self.training and self._class_text is not None:
            return self._class_text
        with torch.inference_mode(False), torch.set_grad_enabled(self.training):
            features = TextFeatures(*(self._encode_soft(name) if name in self.prompts else None
                                      for name in ("rationale", "category", "pair")))
        if features.pairs is not None:
            features.pairs = features.pairs.view(len(self.categories), len(self.rationale_names), -1)
        if not self.training:
            self._class_text = features
        return features

    def _encode_soft(self, family: str) -> torch.Tensor:
        prompts = self.prompts[family]
        ids = torch.arange(len(prompts.tokens), device=self.device)
        return torch.cat([F.normalize(prompts.encode(self.backbone, part), dim=-1)
                          for part in ids.split(self.hparams.text_chunk)])

    # ----------------------------------------------------------------- scores
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image features ``f [B, D]`` (through the prompt tokens in ``visual`` mode)."""
        return self.backbone.encode_image(images)

    def scores(self, f: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``τ ⟨f, g⟩`` in float32: ``f [B, D]`` against ``text [..., D]`` -> ``[B, ...]``."""
        with float32_region(f, text, self.backbone.logit_scale) as (f, text, log_scale):
            return log_scale.exp() * torch.einsum("bd,...d->b...", f, text)

    def scores_per_image(self, f: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``τ ⟨f_b, g[b, ...]⟩`` ``[B, ...]`` for per-image prompt features ``text [B, ..., D]``."""
        with float32_region(f, text, self.backbone.logit_scale) as (f, text, log_scale):
            return log_scale.exp() * torch.einsum("bd,b...d->b...", f, text)

    def top_pairs(self, f: torch.Tensor, text: TextFeatures, k: int | None = None) -> TopPairs:
        """The exact top-``k`` joint pairs of images with features ``f`` (:func:`pruned_top_k`)."""
        k = k or self.hparams.top_k
        chunk, factorization = self.hparams.search_chunk, self.hparams.factorization
        size = len(self.categories) * len(self.rationale_names)
        if k > size:
            raise ValueError(f"ECOR top_k={k} exceeds the {size} category-rationale pairs of the task")
        if factorization == "rationale_first":
            outer = self.scores(f, text.rationales).log_softmax(dim=1)
            inner = lambda ids: self.scores(f, text.pairs[:, ids]).log_softmax(dim=1).transpose(1, 2)  # noqa: E731
            values, r, c, visited = pruned_top_k(outer, inner, k, chunk)
            return TopPairs(values, c, r, visited, outer.shape[1])
        log_c = self.scores(f, text.categories).log_softmax(dim=1)
        if factorization == "category_first":
            inner = lambda ids: self.scores(f, text.pairs[ids]).log_softmax(dim=2)  # noqa: E731
        elif factorization == "independent":
            log_r = self.scores(f, text.rationales).log_softmax(dim=1)
            inner = lambda ids: log_r[:, None, :].expand(-1, len(ids), -1)  # noqa: E731
        else:  # flat: log_softmax over all pairs, its normaliser from a first pass in chunks
            categories = torch.arange(len(self.categories), device=f.device)
            log_z = torch.stack([self.scores(f, text.pairs[ids]).flatten(1).logsumexp(dim=1)
                                 for ids in categories.split(chunk)], dim=1).logsumexp(dim=1)
            log_c = -log_z[:, None].expand(-1, len(self.categories))
            inner = lambda ids: self.scores(f, text.pairs[ids])  # noqa: E731
        values, c, r, visited = pruned_top_k(log_c, inner, k, chunk, prune=factorization != "flat")
        return TopPairs(values, c, r, visited, log_c.shape[1])

    def joint(self, f: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        """The whole ``log P(c, r | I)`` ``[B, C, R]`` (:func:`joint_log_probs`; for small vocabularies and tests);
        a family the factorisation does not read may be None."""
        shape = (len(f), len(self.categories), len(self.rationale_names))
        s_r = f.new_zeros(shape[0], shape[2]) if text.rationales is None else self.scores(f, text.rationales)
        s_c = f.new_zeros(shape[:2]) if text.categories is None else self.scores(f, text.categories)
        s_cr = f.new_zeros(shape) if text.pairs is None else self.scores(f, text.pairs)
        return joint_log_probs(self.hparams.factorization, s_r, s_c, s_cr)

    def category_log_probs(self, f: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        """``log P(c | I) = logsumexp_r log P(c, r | I)`` ``[B, C]``, in chunks of rationales where the joint is
        not already a product with ``P(c | I)``."""
        factorization = self.hparams.factorization
        if factorization in ("category_first", "independent"):
            return self.scores(f, text.categories).log_softmax(dim=1)
        chunks = torch.arange(len(self.rationale_names), device=f.device).split(self.hparams.search_chunk)
        if factorization == "rationale_first":
            log_r = self.scores(f, text.rationales).log_softmax(dim=1)
            parts = [(log_r[:, None, ids] + self.scores(f, text.pairs[:, ids]).log_softmax(dim=1)).logsumexp(dim=2)
                     for ids in chunks]
            return torch.stack(parts, dim=2).logsumexp(dim=2)
        parts = torch.stack([self.scores(f, text.pairs[:, ids]).logsumexp(dim=2) for ids in chunks], dim=2)
        return parts.logsumexp(dim=2).log_softmax(dim=1)  # flat: the pairs' softmax summed over rationales

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """``log P(c | I)`` ``[B, C]`` (differentiable in the images)."""
        return self.category_log_probs(self.image_features(images), self.text_features())

    # ----------------------------------------------------------------- training
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The factorisation's two cross-entropies (one over all pairs for ``flat``), their sum ``loss`` (``−log
        P(c*, r* | I)``) and the accuracy of the category factor or of the pair."""
        category, rationale = batch["label"], batch["rationale"]
        f = self.image_features(batch["image"])
        text = self.text_features()
        factorization = self.hparams.factorization
        out: dict[str, torch.Tensor] = {}
        if factorization == "flat":
            s_cr = self.scores(f, text.pairs).flatten(1)
            out["pair"] = F.cross_entropy(s_cr, category * len(self.rationale_names) + rationale)
            out["acc"] = (s_cr.argmax(dim=1) // len(self.rationale_names) == category).float().mean()
        else:
            s_c = self.scores(f, text.categories) if factorization != "rationale_first" else None
            s_r = self.scores(f, text.rationales) if factorization != "category_first" else None
            if factorization == "rationale_first":
                s_c = self.scores_per_image(f, text.pairs[:, rationale].transpose(0, 1))  # [B, C] at r*
            if factorization == "category_first":
                s_r = self.scores_per_image(f, text.pairs[category])  # [B, R] at c*
            out["category"] = F.cross_entropy(s_c, category)
            out["rationale"] = F.cross_entropy(s_r, rationale)
            out["acc"] = (s_c.argmax(dim=1) == category).float().mean()
        out["loss"] = sum(v for k, v in out.items() if k != "acc")
        return out

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Any], metric: Any, prefix: str) -> None:
        """The top-``k`` pairs of the batch scored by both doubly-right scorers, and the top pair's accuracy."""
        labels, true = batch["label"], batch["rationales"]
        top = self.top_pairs(self.image_features(batch["image"]), self.text_features())
        self.strict_metrics[prefix].update(doubly_right_from_topk(top.category, top.rationale, labels, true))
        sentences = ranked_sentences(top.category, top.rationale, self.categories, self.rationale_names)
        truth = [[self.rationale_names[r] for r in row.nonzero().flatten().tolist()] for row in true]
        names = [self.categories[c] for c in labels.tolist()]
        codes = compat_verdicts(sentences, names, truth, self.categories, self.hparams.top_k)
        self.compat_metrics[prefix].update(codes.to(labels.device))
        self.accuracy[prefix].update((top.category[:, 0] == labels).float())

    def _log_verdicts(self, prefix: str) -> None:
        strict, compat = self.strict_metrics[prefix], self.compat_metrics[prefix]
        if not strict.update_count:
            return
        values = {f"{prefix}/{k}": v for k, v in strict.compute().items()}
        values |= {f"{prefix}/compat_{k}": v for k, v in compat.compute().items()}
        values[f"{prefix}/acc"] = self.accuracy[prefix].compute()
        self.log_dict({k: v.float() for k, v in values.items()}, prog_bar=prefix == "val")
        for metric in (strict, compat, self.accuracy[prefix]):
            metric.reset()

    def on_train_start(self) -> None:
        for metric in (self.strict_metrics["val"], self.compat_metrics["val"], self.accuracy["val"]):
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_verdicts("val")

    def on_test_epoch_end(self) -> None:
        self._log_verdicts("test")

    # ----------------------------------------------------------------- explanation
    def explain(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The shared saliency of the predicted category (contract 4) and ECOR's rankings (spec §9), per sample:

        - ``rationales_scores [B, 10]`` (``rationales_names``): the top rationales by ``P(r | I)`` (the
          rationale factor; ``P(r | ĉ, I)`` for ``category_first``): what the model claims to see;
        - ``predicted_scores`` / ``true_scores`` ``[B, 5]`` (``*_names``): the rationales with the highest joint
          ``P(c, r | I)`` for the predicted and for the true category (``true_*`` when the batch has labels);
        - ``pairs_scores [B, k]`` (``pairs_names``): the top-``k`` pairs as "This is a photo of a {c} because there
          is {r}" with their joint probability, ``pairs_verdicts``: RR/RW/WR/WW per sample when labels are known;
        - ``conditional [B, 3, 5]`` with ``conditional_rationales`` / ``conditional_categories``: ``P(c | r, I)``
          of the top 5 categories for each of the top-3 rationales.
        """
        out = explain_with(self, batch, self.explainer_name)
        images = batch["image"].to(self.device)
        with torch.no_grad():
            f, text = self.image_features(images), self.text_features()
            joint = self.joint(f, text)  # [B, C, R]
            top = self.top_pairs(f, text)
            predicted = top.category[:, 0]
            rationale_logits = self.scores(f, text.rationales)
            if self.hparams.factorization == "category_first":
                rationale_logits = self.scores_per_image(f, text.pairs[predicted])
            claimed = rationale_logits.softmax(dim=1).topk(min(10, rationale_logits.shape[1]), dim=1)
        names, rationales = self.categories, self.rationale_names
        result = out | {
            "rationales_scores": claimed.values.float(),
            "rationales_names": [[rationales[r] for r in row] for row in claimed.indices.tolist()],
            "pairs_scores": top.log_prob.exp().float(),
            "pairs_names": ranked_sentences(top.category, top.rationale, names, rationales),
        }
        if text.pairs is not None:
            with torch.no_grad():
                given = text.pairs[:, claimed.indices[:, :3]].permute(1, 2, 0, 3)  # [B, 3, C, D]
                conditional = self.scores_per_image(f, given).softmax(dim=2)  # [B, 3, C]: P(c | r, I)
                conditional = conditional.topk(min(5, conditional.shape[2]), dim=2)
            result |= {"conditional": conditional.values.float(),
                       "conditional_rationales": [[rationales[r] for r in row[:3]] for row in claimed.indices.tolist()],
                       "conditional_categories": [[[names[c] for c in row] for row in rows]
                                                  for rows in conditional.indices.tolist()]}
        result |= self._category_rationales("predicted", joint, predicted)
        if "label" in batch:
            labels = batch["label"].to(self.device)
            result |= self._category_rationales("true", joint, labels)
            if "rationales" in batch:
                codes = doubly_right_from_topk(top.category, top.rationale, labels, batch["rationales"].to(self.device))
                result["pairs_verdicts"] = [("RR", "RW", "WR", "WW")[code] for code in codes.tolist()]
        return result

    def _category_rationales(self, key: str, joint: torch.Tensor, categories: torch.Tensor) -> dict[str, Any]:
        """The 5 rationales of highest joint probability for ``categories [B]``, as ``<key>_scores/_names``."""
        rows = joint[torch.arange(len(categories), device=joint.device), categories].exp()  # [B, R]
        best = rows.topk(min(5, rows.shape[1]), dim=1)
        return {f"{key}_scores": best.values.float(),
                f"{key}_names": [[self.rationale_names[r] for r in row] for row in best.indices.tolist()]}
