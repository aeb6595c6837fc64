"""Generalized zero-shot classification: per-class accuracy on seen (S) and unseen (U) classes and their H.

Protocol (Xian et al., "Zero-Shot Learning — The Good, the Bad and the Ugly"): accuracy is averaged per class,
so frequent classes do not dominate. ``S`` is the mean per-class accuracy over seen classes and ``U`` over unseen
classes, both with the argmax taken over **all** classes; ``H = 2SU / (S + U)``. The ZSL number (``zsl``) takes
the argmax over unseen classes only. Classes with no sample are left out of their split's mean (torchmetrics'
macro average would count them as 0, see PITFALLS).

**Calibrated stacking** (Chao et al. 2016, "An Empirical Study and Analysis of Generalized Zero-Shot Learning for
Object Recognition in the Wild"): the GZSL prediction is ``argmax_c (s_c − γ·[c ∈ seen])``, a calibration ``γ``
subtracted from every seen class's score before the argmax over all classes (``zsl`` and ``seen_top1`` are
unaffected). A sample is then predicted as its best seen class when its margin ``m = max_seen s − max_unseen s``
exceeds ``γ`` and as its best unseen class otherwise, so S, U and H are step functions of ``γ`` that change only at
the samples' margins: :func:`choose_calibration` evaluates every step exactly (one sort, ``O(B log B)``) and returns
the ``γ`` of the highest H. Choose it on validation data and apply it to test data, never the reverse.

Deviation from the SVIP reference, deliberate: it adds ``γ`` to the unseen classes' softmax *probabilities* and
searches a fixed grid ``{−1, −0.99, …, 0.99}``; we subtract it from the seen classes' scores (Chao et al.'s
definition, independent of the softmax temperature) and search every step of H, so no grid resolution limits it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

SCORE_STATES = ("kept_target", "kept_seen_choice", "kept_unseen_choice", "kept_margin")
"""The per-sample states of ``GZSLMetrics(keep_scores=True)``."""


def harmonic_mean(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``H = 2 s u / (s + u)``, and 0 where ``s + u == 0``."""
    total = s + u
    return torch.where(total > 0, 2 * s * u / total.clamp_min(1e-12), torch.zeros_like(total))


def _mean_over(per_class: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    values = per_class[classes]
    values = values[~values.isnan()]
    return values.mean() if values.numel() else torch.tensor(float("nan"), device=per_class.device)


def gzsl_report(
    logits: torch.Tensor, target: torch.Tensor, seen: Sequence[int], unseen: Sequence[int], calibration: float = 0.0
) -> dict[str, torch.Tensor]:
    """Functional form of :class:`GZSLMetrics` on one set of ``logits [B, C]`` and ``target [B]``; ``calibration``
    is subtracted from the seen classes' scores before the GZSL argmax (module docstring)."""
    metric = GZSLMetrics(logits.shape[1], seen, unseen, calibration=calibration).to(logits.device)
    metric.update(logits, target)
    return metric.compute()


def choose_calibration(
    logits: torch.Tensor, target: torch.Tensor, seen: Sequence[int], unseen: Sequence[int],
    grid: Sequence[float] | None = None,
) -> float:
    """The calibration ``γ`` with the highest H on ``logits [B, C]`` and ``target [B]`` (module docstring).

    Args:
        grid: candidate values; None searches every step of H exactly (between consecutive distinct margins, and
            0 for the step that holds it). Among equally good candidates the one nearest to 0 wins.
    """
    metric = GZSLMetrics(logits.shape[1], seen, unseen, keep_scores=True).to(logits.device)
    metric.update(logits, target)
    return metric.choose_calibration(grid)


@dataclass
class StackingSweep:
    """S, U and H of calibrated stacking at each candidate calibration ``γ [G]`` (``[G]`` each)."""

    calibration: torch.Tensor
    S: torch.Tensor
    U: torch.Tensor
    H: torch.Tensor


def stacking_sweep(target: torch.Tensor, seen_choice: torch.Tensor, unseen_choice: torch.Tensor,
                   margin: torch.Tensor, seen: torch.Tensor, unseen: torch.Tensor,
                   grid: torch.Tensor | None = None) -> StackingSweep:
    """Per-class S, U and H of calibrated stacking at every candidate ``γ``.

    Sample ``i`` (``target [B]``, best seen class ``seen_choice [B]``, best unseen class ``unseen_choice [B]``,
    ``margin [B] = max_seen − max_unseen``) is predicted ``seen_choice`` when ``margin > γ`` and ``unseen_choice``
    otherwise. With samples sorted by margin and ``k(γ) = #{m_i ≤ γ}``, a split's accuracy is
    ``(1/|Y|) Σ_i w_i (b_i [rank_i ≤ k] + a_i [rank_i > k])`` with ``w_i = 1/n_{y_i}``, ``a_i``/``b_i`` whether the
    seen/unseen choice is right: two cumulative sums give every ``γ`` at once.

    Args:
        seen / unseen: class indices of the two splits.
        grid: candidates ``[G]``; None: one per step of H (midpoints of consecutive distinct finite margins, below
            and above all of them, and 0 in place of the midpoint of the step that contains 0).
    """
    num_classes = int(max(seen.max(), unseen.max())) + 1
    counts = torch.bincount(target, minlength=num_classes).double()
    in_seen = torch.zeros(num_classes, dtype=torch.bool, device=target.device)
    in_seen[seen] = True
    order = margin.argsort()
    sorted_margin, y = margin[order], target[order]
    weight = 1.0 / counts[y]
    right_seen, right_unseen = (seen_choice[order] == y).double(), (unseen_choice[order] == y).double()
    if grid is None:
        grid = _step_representatives(sorted_margin)
    grid = grid.to(margin)
    below = torch.searchsorted(sorted_margin.contiguous(), grid.contiguous(), right=True)  # k(γ): margins ≤ γ

    def accuracy(member: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        present = int((counts[classes] > 0).sum())
        if present == 0:
            return torch.full_like(grid, float("nan"), dtype=torch.double)
        zero = weight.new_zeros(1)
        cum_seen = torch.cat([zero, (weight * right_seen * member).cumsum(0)])
        cum_unseen = torch.cat([zero, (weight * right_unseen * member).cumsum(0)])
        return (cum_unseen[below] + cum_seen[-1] - cum_seen[below]) / present

    s, u = accuracy(in_seen[y].double(), seen), accuracy((~in_seen[y]).double(), unseen)
    return StackingSweep(grid, s.float(), u.float(), harmonic_mean(s, u).float())


def _step_representatives(sorted_margin: torch.Tensor) -> torch.Tensor:
    """One ``γ`` per step of H: midpoints between consecutive distinct finite margins, one below and one above
    them all, and 0 instead of the midpoint of the step containing 0 (the calibration closest to none)."""
    finite = sorted_margin[sorted_margin.isfinite()].unique()
    if finite.numel() == 0:
        return sorted_margin.new_zeros(1)
    spread = float(finite[-1] - finite[0]) + 1.0
    edges = torch.cat([finite[:1] - spread, finite, finite[-1:] + spread])
    candidates = 0.5 * (edges[:-1] + edges[1:])
    holds_zero = (edges[:-1] <= 0) & (edges[1:] > 0)
    return torch.where(holds_zero, torch.zeros_like(candidates), candidates)


class GZSLMetrics(Metric):
    """Accumulates per-class hits for GZSL (argmax over all classes) and ZSL (argmax over unseen classes).

    ``compute()`` returns ``S``, ``U``, ``H``, ``zsl`` (unseen per-class top-1 among unseen classes) and
    ``seen_top1`` (seen per-class top-1 among seen classes; the supervised number), and with ``micro=True``
    ``zsl_micro``: the share of all unseen-class samples whose argmax among the unseen classes is right (micro
    top-1, from the same summed states, so DDP reduces it like the rest). Keys whose split is empty are omitted.

    ``calibration`` ``γ`` is subtracted from the seen classes' scores before the GZSL argmax (S, U, H; module
    docstring). With ``keep_scores=True`` the metric also keeps each sample's target, best seen and best unseen class
    and margin (gathered across processes like any ``cat`` state), so that after the epoch
    :meth:`choose_calibration` finds the best ``γ`` and :meth:`report_at` gives S, U, H at any ``γ``.

    Example:
        >>> m = GZSLMetrics(3, seen=[0, 1], unseen=[2])
        >>> m.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 2]))
        >>> {k: round(float(v), 2) for k, v in m.compute().items()}
        {'S': 1.0, 'seen_top1': 1.0, 'U': 1.0, 'zsl': 1.0, 'H': 1.0}
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, seen: Sequence[int], unseen: Sequence[int], micro: bool = False,
                 calibration: float = 0.0, keep_scores: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.micro = micro
        self.calibration = float(calibration)
        self.register_buffer("seen_idx", torch.as_tensor(list(seen), dtype=torch.long), persistent=False)
        self.register_buffer("unseen_idx", torch.as_tensor(list(unseen), dtype=torch.long), persistent=False)
        shift = torch.zeros(num_classes)
        shift[self.seen_idx] = 1.0
        self.register_buffer("seen_shift", shift, persistent=False)
        for name in ("total", "gzsl_hits", "split_hits"):
            self.add_state(name, default=torch.zeros(num_classes), dist_reduce_fx="sum")
        self.keep_scores = keep_scores
        if keep_scores:
            for name in SCORE_STATES:
                self.add_state(name, default=[], dist_reduce_fx="cat")

    def _split_argmax(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return classes[logits[:, classes].argmax(dim=1)]

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits [B, C]`` over the full label space, ``target [B]`` class indices."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"GZSLMetrics expects logits over {self.num_classes} classes, got {logits.shape[1]}")
        ones = torch.ones_like(target, dtype=self.total.dtype)
        self.total.index_add_(0, target, ones)
        stacked = logits - self.calibration * self.seen_shift.to(logits.dtype) if self.calibration else logits
        self.gzsl_hits.index_add_(0, target, (stacked.argmax(dim=1) == target).to(ones))
        if self.keep_scores:
            self._keep(logits.detach().float(), target)
        in_split = torch.zeros_like(target, dtype=torch.bool)
        split_pred = torch.full_like(target, -1)
        for classes in (self.seen_idx, self.unseen_idx):
            if classes.numel() == 0:
                continue
            member = torch.isin(target, classes)
            split_pred = torch.where(member, self._split_argmax(logits, classes), split_pred)
            in_split |= member
        self.split_hits.index_add_(0, target, ((split_pred == target) & in_split).to(ones))

    def _keep(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Keep each sample's target, best seen and best unseen class and margin ``max_seen − max_unseen``."""
        if self.seen_idx.numel() == 0 or self.unseen_idx.numel() == 0:
            raise ValueError("GZSLMetrics(keep_scores=True) needs seen and unseen classes: calibrated stacking "
                             "trades one against the other")
        best_seen, seen_at = logits[:, self.seen_idx].max(dim=1)
        best_unseen, unseen_at = logits[:, self.unseen_idx].max(dim=1)
        for name, value in zip(SCORE_STATES, (target, self.seen_idx[seen_at], self.unseen_idx[unseen_at],
                                              best_seen - best_unseen)):
            getattr(self, name).append(value)

    def _sweep(self, grid: torch.Tensor | None) -> StackingSweep:
        if not self.keep_scores:
            raise ValueError("calibrated stacking needs the per-sample scores: build GZSLMetrics(keep_scores=True)")
        with self.sync_context():  # every process's samples (a no-op in one process)
            kept = [dim_zero_cat(getattr(self, name)) if getattr(self, name) != [] else None for name in SCORE_STATES]
        if kept[0] is None:
            raise ValueError("calibrated stacking needs scored samples; update() was never called this epoch")
        return stacking_sweep(*kept, self.seen_idx, self.unseen_idx, grid)

    def choose_calibration(self, grid: Sequence[float] | None = None) -> float:
        """The calibration ``γ`` of the highest H over the samples seen so far (all processes); ties go to the
        candidate nearest to 0 (:func:`choose_calibration`)."""
        sweep = self._sweep(None if grid is None else torch.as_tensor(list(grid), dtype=torch.float32))
        best = sweep.H == sweep.H.max()
        nearest = sweep.calibration.abs().masked_fill(~best, float("inf")).argmin()
        return float(sweep.calibration[nearest])

    def report_at(self, calibration: float) -> dict[str, torch.Tensor]:
        """``S``, ``U``, ``H`` of calibrated stacking at ``calibration`` over the samples seen so far."""
        sweep = self._sweep(torch.tensor([float(calibration)]))
        return {"S": sweep.S[0], "U": sweep.U[0], "H": sweep.H[0]}

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total
        gzsl = torch.where(total > 0, self.gzsl_hits / total.clamp_min(1), torch.full_like(total, float("nan")))
        split = torch.where(total > 0, self.split_hits / total.clamp_min(1), torch.full_like(total, float("nan")))
        out: dict[str, torch.Tensor] = {}
        if self.seen_idx.numel():
            out["S"] = _mean_over(gzsl, self.seen_idx)
            out["seen_top1"] = _mean_over(split, self.seen_idx)
        if self.unseen_idx.numel():
            out["U"] = _mean_over(gzsl, self.unseen_idx)
            out["zsl"] = _mean_over(split, self.unseen_idx)
            if self.micro:
                out["zsl_micro"] = self.split_hits[self.unseen_idx].sum() / total[self.unseen_idx].sum()
        if "S" in out and "U" in out:
            out["H"] = harmonic_mean(out["S"], out["U"])
        return out
