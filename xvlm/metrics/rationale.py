"""Doubly right object recognition: is the category right, and is it right for a right reason (RR/RW/WR/WW).

**Protocol** (ECOR spec §6, after DROR: Mao et al., CVPR 2023, cvlab-columbia/DoubleRight). Every image ranks the
candidate (category, rationale) pairs and keeps its top ``k`` (5), ``(c_1, r_1) … (c_k, r_k)``::

    ĉ        = majority vote of c_1..c_k; among the most frequent categories, the one that appears first
    right(c) = some kept i with c_i = c and r_i a true rationale of the image
    RR: ĉ = c_gt and right(c_gt)     RW: ĉ = c_gt and not right(c_gt)
    WR: ĉ ≠ c_gt and right(ĉ)        WW: ĉ ≠ c_gt and not right(ĉ)

The four are micro-averaged over images and sum to 1; classification accuracy is RR + RW, the headline is RR.
A verdict is coded per sample as ``0 = RR, 1 = RW, 2 = WR, 3 = WW`` (:data:`VERDICTS`): the code is
``2·[ĉ ≠ c_gt] + [not right(ĉ)]``, because ``right(ĉ) = right(c_gt)`` when ``ĉ = c_gt``.

Two scorers, both logged by the methods:

- **strict** (ours, default; :func:`doubly_right`, :func:`doubly_right_from_topk`): ids, not strings. The pairs are
  ranked by a joint score ``[N, C, R]`` (log-probabilities or any score, higher is better) over the candidate mask
  ``[C, R]`` (default: every pair), ties broken by the lower flat index ``c·R + r``; all ``k`` ranks vote and count
  for ``right``; the true rationales are a multi-hot ``[N, R]`` (or one index per image).
- **compat** (DROR's scorer, :func:`compat_verdicts`, :func:`doubly_right_compat`): on ranked sentences
  ``"This is a photo of a {c} because there is {r}"`` (:func:`pair_sentence`), reproducing
  ``whyprompt/eval_clip_fulldoublyright.py`` of cvlab-columbia/DoubleRight. Per image, with the gt category name
  ``g`` and gt rationale string ``a``:

  1. scan ranks 1..k; each sentence first adds one vote for its category (the text between the template's prefix
     and ``" because there is "``), then, if the *whole sentence* contains both ``g`` and ``a`` as substrings, the
     scan stops there (``found``): the vote uses ranks 1..k* only;
  2. ĉ = the category of the highest count, ties to the category first seen (DROR walks its insertion-ordered
     histogram with a strict ``>``);
  3. ĉ = g: RR when ``found``, else RW. ĉ ≠ g: WR when some sentence among **all** k ranks (not only 1..k*)
     contains both ĉ's name and ``a`` as substrings, else WW.

  So "wings" matches a "two wings" sentence, a gt name "cat" matches a "bobcat" sentence, and a name may even match
  inside the rationale part: all as in DROR.

Deliberate deviations from DROR's scorer (compat keeps all its quirks but these):

- Names and sentences are normalised before any comparison (lowercase, ``_`` → space, outer spaces stripped).
  DROR compares the histogram's name (the JSON class key) with the raw folder name, so a class whose folder name
  differs from its key (underscores) can never be predicted right, and its substring tests are case-sensitive.
- Every sentence's category and every target name must be one of ``categories`` (after normalisation), else
  ``ValueError``; DROR would silently score an unknown name as a wrong category.
- A sentence is split at the *first* ``" because there is "`` (DROR's two-way unpacking fails on a rationale that
  contains it); lists shorter than ``k`` are scored as they are (DROR always has ``k``), longer ones cut to ``k``.
- An image may have several gt rationales (a sequence of strings): ``a`` then means "any of them".
- DROR's text list repeats a pair once per class that lists the rationale (it does not deduplicate rationales, spec
  §8.1), so a shared rationale's pair can fill several ranks with the same sentence. Compat scores the list it is
  given; our vocabulary is deduplicated (spec §5), so such repeats only appear if the caller writes them.
- Strict mode only: ids instead of substrings, no early stop, deterministic tie order (DROR's ``torch.topk`` leaves
  the order of tied scores unspecified), a candidate mask, and multi-hot gt rationales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

VERDICTS = ("RR", "RW", "WR", "WW")
"""The verdict names, indexed by their per-sample code."""

PAIR_TEMPLATE = "This is a photo of a {category} because there is {rationale}"
"""DROR's why-prompt for a (category, rationale) pair."""

_PREFIX, _SEPARATOR = "this is a photo of a ", " because there is "  # the template's parts, normalised


def pair_sentence(category: str, rationale: str) -> str:
    """DROR's sentence for a pair: ``"This is a photo of a {category} because there is {rationale}"``."""
    return PAIR_TEMPLATE.format(category=category, rationale=rationale)


def ranked_sentences(top_categories: torch.Tensor, top_rationales: torch.Tensor, category_names: Sequence[str],
                     rationale_texts: Sequence[str]) -> list[list[str]]:
    """The sentences (:func:`pair_sentence`) of ranked pair ids ``[N, k]`` each, for :func:`compat_verdicts`."""
    return [[pair_sentence(category_names[c], rationale_texts[r]) for c, r in zip(cs, rs)]
            for cs, rs in zip(top_categories.tolist(), top_rationales.tolist())]


# ----------------------------------------------------------------------------------------------------------- strict
def _fractions(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float64 shares (0-dim each) of the verdict counts ``[4]``; zeros when there is no sample."""
    shares = counts.double() / counts.sum().clamp_min(1)
    return dict(zip(VERDICTS, shares.unbind()))


def _verdict_counts(codes: torch.Tensor) -> torch.Tensor:
    """The number ``[4]`` (long) of samples per verdict code in ``codes [N]``; refuses codes outside 0..3."""
    if codes.ndim != 1 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"verdict codes must be an integer tensor [N], got {codes.dtype} {list(codes.shape)}")
    counts = torch.bincount(codes.long(), minlength=len(VERDICTS))  # negative codes raise here
    if counts.numel() != len(VERDICTS):
        raise ValueError(f"verdict codes must lie in 0..{len(VERDICTS) - 1}")
    return counts


def verdict_fractions(codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The shares ``RR, RW, WR, WW`` (0-dim float64, summing to 1; zeros without samples) of ``codes [N]``."""
    return _fractions(_verdict_counts(codes))


def _majority(top_categories: torch.Tensor) -> torch.Tensor:
    """Each row's most frequent category in ``top_categories [N, k]`` (``[N]``), ties to the earliest first rank.

    Every rank of a category carries that category's count, so the first rank with the highest count is the first
    appearance of the earliest of the most frequent categories (``argmax`` returns the first maximum).
    """
    counts = (top_categories[:, :, None] == top_categories[:, None, :]).sum(dim=2)  # [N, k]
    return top_categories.gather(1, counts.argmax(dim=1, keepdim=True)).squeeze(1)


def _rationale_hits(top_rationales: torch.Tensor, true_rationales: torch.Tensor) -> torch.Tensor:
    """Whether each kept rationale ``[N, k]`` is one of the image's true ones: ``true_rationales`` is a multi-hot
    ``[N, R]`` (bool) or one rationale index per image ``[N]``."""
    dtype = true_rationales.dtype
    if dtype == torch.bool and true_rationales.ndim == 2:
        return true_rationales.gather(1, top_rationales)
    if true_rationales.ndim == 1 and not (dtype.is_floating_point or dtype == torch.bool):
        return top_rationales == true_rationales[:, None]
    raise ValueError("true_rationales must be a bool multi-hot [N, R] or an index tensor [N], got "
                     f"{true_rationales.dtype} {list(true_rationales.shape)}")


def doubly_right_from_topk(top_categories: torch.Tensor, top_rationales: torch.Tensor, target: torch.Tensor,
                           true_rationales: torch.Tensor) -> torch.Tensor:
    """The strict verdict codes ``[N]`` (long; 0 = RR, 1 = RW, 2 = WR, 3 = WW) of ranked pairs.

    Args:
        top_categories: ``[N, k]`` category ids of each image's pairs, best first.
        top_rationales: ``[N, k]`` rationale ids of the same pairs.
        target: ``[N]`` gt category ids.
        true_rationales: ``[N, R]`` bool multi-hot of each image's true rationales, or ``[N]`` one index each.

    The rule (module docstring): ``ĉ`` the majority of the k categories (ties to the earliest), ``right(ĉ)`` some
    kept pair of category ``ĉ`` with a true rationale, code ``2·[ĉ ≠ target] + [not right(ĉ)]``.
    """
    if top_categories.ndim != 2 or top_categories.shape != top_rationales.shape or top_categories.shape[1] == 0:
        raise ValueError(f"expected ranked pairs [N, k >= 1] twice, got {list(top_categories.shape)} and "
                         f"{list(top_rationales.shape)}")
    predicted = _majority(top_categories)
    hits = _rationale_hits(top_rationales, true_rationales)
    right = ((top_categories == predicted[:, None]) & hits).any(dim=1)
    return 2 * (predicted != target).long() + (~right).long()


def _topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The column indices ``[N, k]`` of each row's ``k`` highest ``scores [N, M]``, best first, equal scores in
    ascending column order (``torch.topk`` leaves their order, and which of them make the cut, unspecified).

    All entries above the k-th highest value are kept; of those equal to it, the lowest columns fill the rest.
    Scores must not be NaN.
    """
    kth = scores.topk(k, dim=1).values[:, -1:]
    above, tied = scores > kth, scores == kth
    room = k - above.sum(dim=1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row
    kept = keep.nonzero()[:, 1].view(scores.shape[0], k)  # ascending columns within each row
    order = scores.gather(1, kept).sort(dim=1, descending=True, stable=True).indices
    return kept.gather(1, order)


def top_pairs(joint: torch.Tensor, candidates: torch.Tensor | None = None,
              k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The category and rationale ids ``[N, k]`` each of the ``k`` best candidate pairs of ``joint [N, C, R]``.

    Pairs outside ``candidates [C, R]`` (bool; default every pair) are never ranked; equal scores go to the lower
    flat index ``c·R + r``. Needs ``1 <= k <=`` the number of candidates.
    """
    if joint.ndim != 3:
        raise ValueError(f"joint must be [N, C, R], got {list(joint.shape)}")
    num_rationales = joint.shape[2]
    flat = joint.flatten(1)
    if candidates is None:
        columns = None
    else:
        if candidates.shape != joint.shape[1:]:
            raise ValueError(f"candidates must be [C, R] = {list(joint.shape[1:])}, got {list(candidates.shape)}")
        columns = candidates.to(joint.device).flatten().nonzero().squeeze(1)  # ascending flat indices
        flat = flat[:, columns]
    if not 1 <= k <= flat.shape[1]:
        raise ValueError(f"k = {k} needs 1 <= k <= the number of candidate pairs ({flat.shape[1]})")
    best = _topk_lowest_index(flat, k)
    if columns is not None:
        best = columns[best]
    return best // num_rationales, best % num_rationales


def doubly_right(joint: torch.Tensor, target: torch.Tensor, true_rationales: torch.Tensor,
                 candidates: torch.Tensor | None = None, k: int = 5) -> dict[str, torch.Tensor]:
    """The strict doubly-right shares ``RR, RW, WR, WW`` (0-dim float64, summing to 1) of ``joint [N, C, R]``.

    Args:
        joint: ``[N, C, R]`` pair scores (e.g. ``log P(c, r | I)``), higher is better, no NaN.
        target: ``[N]`` gt category ids.
        true_rationales: ``[N, R]`` bool multi-hot of each image's true rationales, or ``[N]`` one index each.
        candidates: ``[C, R]`` bool mask of the ranked pairs; default every pair.
        k: the number of kept pairs per image.

    :func:`top_pairs`, then :func:`doubly_right_from_topk` and :func:`verdict_fractions`.
    """
    top_categories, top_rationales = top_pairs(joint, candidates, k)
    return verdict_fractions(doubly_right_from_topk(top_categories, top_rationales, target, true_rationales))


# ----------------------------------------------------------------------------------------------------------- compat
def _normalise(text: str) -> str:
    """Lowercase, ``_`` → space, outer spaces stripped: how names and sentences are compared in compat mode."""
    return text.replace("_", " ").lower().strip()


def _sentence_category(sentence: str, vocabulary: set[str]) -> str:
    """The normalised category name of a normalised pair sentence: between the template's prefix and the first
    ``" because there is "``; it must be in ``vocabulary``."""
    head, separator, _ = sentence.partition(_SEPARATOR)
    if not head.startswith(_PREFIX) or not separator:
        raise ValueError(f"not a pair sentence ({PAIR_TEMPLATE!r}): {sentence!r}")
    name = head[len(_PREFIX):].strip()
    if name not in vocabulary:
        raise ValueError(f"sentence of an unknown category {name!r}: {sentence!r}")
    return name


def _contains(sentence: str, name: str, rationales: Sequence[str]) -> bool:
    """DROR's test: the sentence contains ``name`` and one of ``rationales`` as substrings."""
    return name in sentence and any(rationale in sentence for rationale in rationales)


def _compat_verdict(sentences: Sequence[str], target: str, rationales: Sequence[str], vocabulary: set[str]) -> int:
    """The compat verdict code of one image's normalised ranked sentences (module docstring, steps 1-3)."""
    names = [_sentence_category(sentence, vocabulary) for sentence in sentences]
    votes: dict[str, int] = {}  # insertion-ordered: the first appearance decides ties
    found = False
    for sentence, name in zip(sentences, names):
        votes[name] = votes.get(name, 0) + 1
        if _contains(sentence, target, rationales):
            found = True
            break
    predicted = max(votes, key=votes.__getitem__) if votes else None  # max keeps the first of equal counts
    if predicted == target:
        return 0 if found else 1
    wrong_but_right = predicted is not None and any(_contains(s, predicted, rationales) for s in sentences)
    return 2 if wrong_but_right else 3


def compat_verdicts(ranked_texts: Sequence[Sequence[str]], target_names: Sequence[str],
                    true_rationale_texts: Sequence[str | Sequence[str]], categories: Sequence[str],
                    k: int = 5) -> torch.Tensor:
    """DROR's verdict codes ``[N]`` (long; 0 = RR, 1 = RW, 2 = WR, 3 = WW) of ranked pair sentences.

    Args:
        ranked_texts: per image, its pair sentences (:func:`pair_sentence`) best first; only the first ``k`` count.
        target_names: per image, its gt category name (``_`` and spaces, any case).
        true_rationale_texts: per image, its gt rationale string (or several, any of which counts).
        categories: the category names; every sentence's and target's category must be one of them.
        k: the number of ranks scored.

    The rule: module docstring, compat steps 1-3, on normalised strings.
    """
    if not len(ranked_texts) == len(target_names) == len(true_rationale_texts):
        raise ValueError("ranked_texts, target_names and true_rationale_texts need one entry per image")
    vocabulary = {_normalise(name) for name in categories}
    codes = []
    for sentences, target, rationales in zip(ranked_texts, target_names, true_rationale_texts):
        target = _normalise(target)
        if target not in vocabulary:
            raise ValueError(f"unknown target category {target!r}")
        rationales = [rationales] if isinstance(rationales, str) else list(rationales)
        codes.append(_compat_verdict([_normalise(s) for s in list(sentences)[:k]], target,
                                     [_normalise(r) for r in rationales], vocabulary))
    return torch.tensor(codes, dtype=torch.long)


def doubly_right_compat(ranked_texts: Sequence[Sequence[str]], target_names: Sequence[str],
                        true_rationale_texts: Sequence[str | Sequence[str]], categories: Sequence[str],
                        k: int = 5) -> dict[str, torch.Tensor]:
    """DROR's shares ``RR, RW, WR, WW`` (0-dim float64, summing to 1) of ranked pair sentences:
    :func:`verdict_fractions` of :func:`compat_verdicts` (same arguments)."""
    return verdict_fractions(compat_verdicts(ranked_texts, target_names, true_rationale_texts, categories, k))


# ----------------------------------------------------------------------------------------------------------- metric
class DoublyRightMetrics(Metric):
    """Accumulates doubly-right verdicts and reports the shares ``RR, RW, WR, WW`` over every sample seen.

    The state is one count per verdict (``[4]`` long, summed across processes), so the DDP reduction is exact
    and needs no padding or gathering. Feed it strict codes (:meth:`update_topk`, or :meth:`update` with
    :func:`doubly_right_from_topk`) or compat codes (:meth:`update` with :func:`compat_verdicts`); keep one
    instance per scorer. ``compute()`` (collective under DDP) returns 0-dim float64 shares summing to 1, or
    zeros when no sample was seen. Under DDP the distributed sampler's padding duplicates count twice (PITFALLS).

    Example:
        >>> m = DoublyRightMetrics()
        >>> m.update(torch.tensor([0, 0, 1, 3]))
        >>> {k: float(v) for k, v in m.compute().items()}
        {'RR': 0.5, 'RW': 0.25, 'WR': 0.0, 'WW': 0.25}
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None  # RR is, WW is not

    def __init__(self) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(len(VERDICTS), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor) -> None:
        """Add the verdict codes ``[B]`` of a batch (0 = RR, 1 = RW, 2 = WR, 3 = WW)."""
        self.counts += _verdict_counts(codes.to(self.counts.device))

    def update_topk(self, top_categories: torch.Tensor, top_rationales: torch.Tensor, target: torch.Tensor,
                    true_rationales: torch.Tensor) -> None:
        """Add the strict verdicts of ranked pairs ``[B, k]`` (:func:`doubly_right_from_topk`'s arguments)."""
        self.update(doubly_right_from_topk(top_categories, top_rationales, target, true_rationales))

    def compute(self) -> dict[str, torch.Tensor]:
        return _fractions(self.counts)
