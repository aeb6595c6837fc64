"""Compositional zero-shot learning (CZSL): the bias sweep of ExplainableML/czsl, from per-sample summaries.

**Protocol** (MSCI spec §6, as the ExplainableML/czsl evaluator computes it). Pair scores ``S [N, P]``, the seen
(training) pairs ``seen_pairs [P]``, the label space ``in_space [P]`` (closed world: train ∪ split pairs; open world:
every pair but the infeasible ones) and the target pairs ``y [N]``; a sample is *seen* when its target is a seen
pair. With a bias ``b`` added to every unseen pair's score::

    pred(b)  = argmax_{p in space} (S[:, p] + b·[p unseen])       (the lowest index wins ties, as torch.argmax)
    ref      = pred(1e3);   S_at = acc(ref | seen samples);   U_max = acc(ref | unseen samples)
    d_i      = max_{p seen} S[i, p] − S[i, y_i]                for the unseen samples with ref_i = y_i
    biases   = sort(d − 1e-4)[:: max(1, |d| // 20)]
    points   = [(acc_seen(pred(b)), acc_unseen(pred(b))) for b in biases] + [(S_at, U_max)]

``AUC`` is the trapezoid of the seen accuracies over the unseen ones (x = unseen) through the points in that order,
``HM`` the highest ``2su / (s + u)`` of a point, ``best_seen`` / ``best_unseen`` the highest ``s`` / ``u``.
Accuracies are micro (per sample) fractions, 0 for an empty group. State and object accuracy compare the
primitives of the unbiased in-space prediction ``pred(0)`` with the target's.

**Sufficient statistics.** Adding ``b`` to every unseen pair keeps the order among the unseen pairs, so ``pred(b)``
is either the best in-space seen pair (score ``s``, index ``i_s``) or the best in-space unseen pair (score
``u + b``, index ``i_u``): the unseen one when ``u + b > s``, or ``u + b = s`` and ``i_u < i_s``. Each sample is
thus summarised exactly by six numbers (:data:`SUMMARY_COLUMNS`, :func:`czsl_summary`), and the sweep, ``d`` and
the primitive accuracies all follow from ``[N, 6]`` (:func:`report_from_summary`): memory is independent of ``P``,
which matters in the open world (278k pairs on C-GQA). :func:`feasible_summaries` gives the open-world summaries
for every feasibility threshold at once.

Deliberate deviations from the reference evaluator:

- ``torch.trapezoid`` replaces the removed ``np.trapz`` (same rule); ``HM`` is 0 explicitly when an accuracy is 0.
- Infeasible pairs are masked out of the space (as ``−inf``) rather than having their scores multiplied by 0, which
  relied on scores being positive. Pairs outside the space are ignored (the reference's ``−1e10`` is the same
  unless in-space scores fall below it).
- Exact per-sample summaries instead of the kept ``[N, P]`` score matrix; the sweep runs in float64, so it equals
  the full-matrix computation in float64 (rounding of ``u + b`` could only merge unseen scores closer than
  ``|b|·2⁻⁵²``, which the full matrix would then tie on the lower index).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from xvlm.metrics.gzsl import harmonic_mean

SUMMARY_COLUMNS = ("seen_score", "seen_pair", "unseen_score", "unseen_pair", "target_score", "target")
"""The columns of a per-sample summary (:func:`czsl_summary`): the best in-space seen pair's score and index, the
best in-space unseen pair's score and index (``−inf`` and ``−1`` when the space holds no unseen pair), the target's
score and the target pair index; float64, so indices stay exact."""

REFERENCE_BIAS = 1e3
"""The bias of the reference prediction ``ref``, which all but forces an unseen pair."""

BIAS_BINS = 20
"""The sweep visits every ``|d| // BIAS_BINS``-th sorted score gap (the reference's ``magic_binsize``)."""

GAP_MARGIN = 1e-4
"""Subtracted from each score gap ``d_i`` so that the bias just falls short of turning sample ``i`` right."""


def _check_seen(seen_pairs: torch.Tensor, in_space: torch.Tensor | None = None) -> None:
    """Refuse an empty set of seen pairs, and a label space ``in_space [P]`` that leaves one of them out."""
    if not bool(seen_pairs.any()):
        raise ValueError("CZSL needs at least one seen (training) pair")
    if in_space is not None and bool((seen_pairs & ~in_space).any()):
        raise ValueError("the label space must hold every seen pair (closed and open world both do)")


def _candidates(scores: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores ``[B, M + 1]`` of ``pairs [M]`` and their indices ``[M + 1]``, after a sentinel column ``(−inf, −1)``
    that stands for "no pair" and wins any tie with it."""
    sentinel = scores.new_full((scores.shape[0], 1), float("-inf"))
    return torch.cat([sentinel, scores[:, pairs]], dim=1), torch.cat([pairs.new_full((1,), -1), pairs])


def _best(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's highest score among the pairs of ``mask [P]`` and its lowest index (``[B]`` each; ``−inf, −1``
    where ``mask`` is empty)."""
    values, index = _candidates(scores, mask.nonzero().squeeze(1))
    best, at = values.max(dim=1)  # the first maximum, and the candidates are in ascending index order
    return best, index[at]


def _running_best(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prefix maxima of ``values [B, L]`` and, among the prefix's entries equal to the maximum, the lowest
    of their ``index [L]`` (``[B, L]`` each).

    A prefix's entries equal to its maximum all lie in the current *run*, the stretch where the running maximum has
    kept its value, and the run's first entry is one of them. Numbering the runs ``r`` and packing
    ``key = r·(top + 2) + [value = max]·(top − index)`` (``top`` above every index, ``index ≥ −1``) makes the
    running maximum of ``key`` pick the latest run, then the lowest index at the maximum: one ``cummax``.
    """
    best = values.cummax(dim=1).values
    raised = torch.ones_like(best, dtype=torch.bool)
    raised[:, 1:] = best[:, 1:] > best[:, :-1]
    top = int(index.max()) + 1
    offset = torch.where(values == best, top - index, torch.zeros_like(index))
    key = raised.long().cumsum(dim=1) * (top + 2) + offset
    return best, top - key.cummax(dim=1).values % (top + 2)


def _summary(scores: torch.Tensor, target: torch.Tensor, seen_pairs: torch.Tensor, unseen_score: torch.Tensor,
             unseen_pair: torch.Tensor) -> torch.Tensor:
    """The float64 summaries ``[..., B, 6]`` (:data:`SUMMARY_COLUMNS`) of ``scores [B, P]`` and ``target [B]``, given
    the best in-space unseen pairs' scores and indices ``[..., B]``."""
    seen_score, seen_pair = _best(scores, seen_pairs)
    target_score = scores.gather(1, target[:, None]).squeeze(1)
    columns = (seen_score, seen_pair, unseen_score, unseen_pair, target_score, target)
    return torch.stack([column.double() for column in torch.broadcast_tensors(*columns)], dim=-1)


def czsl_summary(scores: torch.Tensor, target: torch.Tensor, seen_pairs: torch.Tensor,
                 in_space: torch.Tensor) -> torch.Tensor:
    """The per-sample summaries ``[B, 6]`` (:data:`SUMMARY_COLUMNS`) of ``scores [B, P]`` and ``target [B]`` in the
    label space ``in_space [P]`` (bool, holding every seen pair of ``seen_pairs [P]``); scores outside the space are
    ignored."""
    _check_seen(seen_pairs, in_space)
    return _summary(scores, target, seen_pairs, *_best(scores, in_space & ~seen_pairs))


def feasible_summaries(scores: torch.Tensor, target: torch.Tensor, seen_pairs: torch.Tensor,
                       feasibility: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Open-world summaries ``[T, B, 6]`` of ``scores [B, P]`` and ``target [B]`` for every feasibility threshold.

    Threshold ``t`` has the label space ``seen_pairs | (feasibility >= thresholds[t])`` (``feasibility [P]``,
    ``thresholds [T]``, compared in float64): all pairs are candidates and the unseen pairs less feasible than the
    threshold are masked out. Equal to :func:`czsl_summary` with that space for each ``t``, in one pass: the unseen
    pairs sorted by descending feasibility make every threshold's unseen space a prefix (of length
    ``cut_t = #{unseen p: feasibility_p >= thresholds[t]}``), so a running maximum along them gives all of them.
    Working memory is a few ``[B, P]`` tensors: chunk the batch when ``P`` is large.
    """
    _check_seen(seen_pairs)
    unseen = (~seen_pairs).nonzero().squeeze(1)
    feasible, order = feasibility[unseen].double().sort(descending=True)
    cut = len(order) - torch.searchsorted(feasible.flip(0), thresholds.to(feasible).contiguous())  # [T]
    unseen_score, unseen_pair = _running_best(*_candidates(scores, unseen[order]))  # [B, U + 1], column 0: none
    return _summary(scores, target, seen_pairs, unseen_score[:, cut].T, unseen_pair[:, cut].T)


def _predict(summary: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``pred(b)`` ``[N, K]`` (float64 pair indices) of the summaries ``[N, 6]`` at each bias of ``bias [K]``."""
    seen_score, seen_pair, unseen_score, unseen_pair = (column[:, None] for column in summary[:, :4].unbind(1))
    shifted = unseen_score + bias
    unseen_wins = (shifted > seen_score) | ((shifted == seen_score) & (unseen_pair < seen_pair))
    return torch.where(unseen_wins, unseen_pair, seen_pair)


def _accuracy(hit: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The share ``[K]`` of the samples in ``member [N]`` with a ``hit [N, K]``; 0 when there are none."""
    return (hit & member[:, None]).sum(dim=0).double() / member.sum().clamp_min(1)


def _biases(summary: torch.Tensor, unseen_right: torch.Tensor) -> torch.Tensor:
    """The swept biases: every ``max(1, |d| // 20)``-th of the sorted ``d − 1e-4``, ``d = s − S[i, y_i]`` over the
    samples of ``unseen_right [N]`` (unseen samples that ``ref`` gets right)."""
    gaps = (summary[unseen_right, 0] - summary[unseen_right, 4] - GAP_MARGIN).sort().values
    return gaps[:: max(1, len(gaps) // BIAS_BINS)]


def _primitive_accuracy(table: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The share of samples whose predicted pair ``pred [N]`` has the target pair's ``target [N]`` primitive under
    ``table [P]`` (pair → state or object index); 0 without samples."""
    return (table[pred] == table[target]).double().sum() / max(len(target), 1)


def report_from_summary(summary: torch.Tensor, seen_pairs: torch.Tensor, pair_states: torch.Tensor | None = None,
                        pair_objects: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The CZSL report of the summaries ``[N, 6]`` (module docstring): 0-dim float64 fractions ``auc``, ``hm``,
    ``best_seen``, ``best_unseen``, and ``state_acc`` / ``object_acc`` when the pair → primitive tables ``[P]`` are
    given. No sample gives zeros."""
    target = summary[:, 5].long()
    seen_sample = seen_pairs[target]
    target_column = summary[:, 5:6]
    ref = _predict(summary, summary.new_tensor([REFERENCE_BIAS])) == target_column  # [N, 1]
    swept = _predict(summary, _biases(summary, ref[:, 0] & ~seen_sample)) == target_column
    hit = torch.cat([swept, ref], dim=1)  # [N, |biases| + 1]: the points in sweep order, ref last
    seen, unseen = _accuracy(hit, seen_sample), _accuracy(hit, ~seen_sample)
    report = {"auc": torch.trapezoid(seen, unseen), "hm": harmonic_mean(seen, unseen).max(),
              "best_seen": seen.max(), "best_unseen": unseen.max()}
    unbiased = _predict(summary, summary.new_zeros(1))[:, 0].long()
    for key, table in (("state_acc", pair_states), ("object_acc", pair_objects)):
        if table is not None:
            report[key] = _primitive_accuracy(table, unbiased, target)
    return report


def czsl_report(scores: torch.Tensor, target: torch.Tensor, seen_pairs: torch.Tensor, closed: torch.Tensor,
                pair_states: torch.Tensor | None = None,
                pair_objects: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Functional form of :class:`CZSLMetrics` on ``scores [N, P]`` and ``target [N]`` in the label space
    ``closed [P]`` (bool; any space that holds the seen pairs): :func:`report_from_summary` of :func:`czsl_summary`.
    """
    return report_from_summary(czsl_summary(scores, target, seen_pairs, closed), seen_pairs, pair_states,
                               pair_objects)


class CZSLMetrics(Metric):
    """Accumulates per-sample CZSL summaries for ``candidates`` settings at once (e.g. inference weights ×
    feasibility thresholds, chosen among by validation AUC) and reports each (module docstring).

    The state is the float64 summaries ``[N, K, 6]`` (``cat``, so DDP gathers every process's samples unchanged:
    torchmetrics' gather keeps the dtype, and each process starts from an empty ``[0, K, 6]`` entry so that one
    without samples gathers a tensor of the same rank and dtype). ``compute()`` (collective under DDP) returns
    :func:`report_from_summary`'s keys with one value per candidate (``[K]``; 0-dim when ``K == 1``, as
    torchmetrics squeezes one-element results); with no sample at all the values are 0.

    Example:
        >>> seen = torch.tensor([True, True, False])
        >>> m = CZSLMetrics(seen)
        >>> scores, target = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 2])
        >>> m.update_scores(scores, target, in_space=torch.ones(3, dtype=torch.bool))
        >>> {k: float(v) for k, v in m.compute().items()}
        {'auc': 0.5, 'hm': 0.0, 'best_seen': 1.0, 'best_unseen': 1.0}
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, seen_pairs: torch.Tensor, pair_states: torch.Tensor | None = None,
                 pair_objects: torch.Tensor | None = None, candidates: int = 1) -> None:
        super().__init__()
        _check_seen(seen_pairs)
        self.candidates = candidates
        self.register_buffer("seen_pairs", seen_pairs.bool(), persistent=False)
        self.register_buffer("pair_states", pair_states, persistent=False)
        self.register_buffer("pair_objects", pair_objects, persistent=False)
        self.add_state("summaries", default=[], dist_reduce_fx="cat")
        self.reset()

    def reset(self) -> None:
        """Empty the state down to one ``[0, K, 6]`` float64 entry (class docstring)."""
        super().reset()
        self.summaries.append(torch.empty(0, self.candidates, len(SUMMARY_COLUMNS), dtype=torch.float64,
                                          device=self.seen_pairs.device))

    def update(self, summary: torch.Tensor) -> None:
        """Add the summaries ``[K, B, 6]`` of a batch (:func:`czsl_summary` or :func:`feasible_summaries`), one per
        candidate; ``[B, 6]`` when ``K == 1``."""
        if summary.ndim == 2:
            summary = summary[None]
        if summary.shape[0] != self.candidates or summary.shape[-1] != len(SUMMARY_COLUMNS):
            raise ValueError(f"CZSLMetrics expects summaries [{self.candidates}, B, {len(SUMMARY_COLUMNS)}], "
                             f"got {list(summary.shape)}")
        self.summaries.append(summary.detach().double().transpose(0, 1))

    def update_scores(self, scores: torch.Tensor, target: torch.Tensor, in_space: torch.Tensor) -> None:
        """Add ``scores [B, P]`` and ``target [B]`` in the label space ``in_space [P]`` (one candidate)."""
        self.update(czsl_summary(scores, target, self.seen_pairs, in_space))

    def compute(self) -> dict[str, torch.Tensor]:
        summaries = dim_zero_cat(self.summaries)
        reports = [report_from_summary(summaries[:, k], self.seen_pairs, self.pair_states, self.pair_objects)
                   for k in range(self.candidates)]
        return {key: torch.stack([report[key] for report in reports]) for key in reports[0]}

    def best(self, key: str = "auc") -> tuple[int, dict[str, torch.Tensor]]:
        """The candidate with the highest ``key`` (the lowest index among equals) and its report (0-dim values);
        calls :meth:`compute`, so every process must call it under DDP."""
        reports = {name: value.reshape(self.candidates) for name, value in self.compute().items()}
        index = int(reports[key].argmax())
        return index, {name: value[index] for name, value in reports.items()}
