"""Generalized zero-shot classification: per-class accuracy on seen (S) and unseen (U) classes and their H.

Protocol (Xian et al., "Zero-Shot Learning — The Good, the Bad and the Ugly"): accuracy is averaged per class,
so frequent classes do not dominate. ``S`` is the mean per-class accuracy over seen classes and ``U`` over unseen
classes, both with the argmax taken over **all** classes; ``H = 2SU / (S + U)``. The ZSL number (``zsl``) takes
the argmax over unseen classes only. Classes with no sample are left out of their split's mean (torchmetrics'
macro average would count them as 0, see PITFALLS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def harmonic_mean(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``H = 2 s u / (s + u)``, and 0 where ``s + u == 0``."""
    total = s + u
    return torch.where(total > 0, 2 * s * u / total.clamp_min(1e-12), torch.zeros_like(total))


def _mean_over(per_class: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    values = per_class[classes]
    values = values[~values.isnan()]
    return values.mean() if values.numel() else torch.tensor(float("nan"), device=per_class.device)


def gzsl_report(
    logits: torch.Tensor, target: torch.Tensor, seen: Sequence[int], unseen: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Functional form of :class:`GZSLMetrics` on one set of ``logits [B, C]`` and ``target [B]``."""
    metric = GZSLMetrics(logits.shape[1], seen, unseen).to(logits.device)
    metric.update(logits, target)
    return metric.compute()


class GZSLMetrics(Metric):
    """Accumulates per-class hits for GZSL (argmax over all classes) and ZSL (argmax over unseen classes).

    ``compute()`` returns ``S``, ``U``, ``H``, ``zsl`` (unseen per-class top-1 among unseen classes) and
    ``seen_top1`` (seen per-class top-1 among seen classes; the supervised number), and with ``micro=True``
    ``zsl_micro``: the share of all unseen-class samples whose argmax among the unseen classes is right (micro
    top-1, from the same summed states, so DDP reduces it like the rest). Keys whose split is empty are omitted.

    Example:
        >>> m = GZSLMetrics(3, seen=[0, 1], unseen=[2])
        >>> m.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 2]))
        >>> {k: round(float(v), 2) for k, v in m.compute().items()}
        {'S': 1.0, 'seen_top1': 1.0, 'U': 1.0, 'zsl': 1.0, 'H': 1.0}
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, seen: Sequence[int], unseen: Sequence[int], micro: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.micro = micro
        self.register_buffer("seen_idx", torch.as_tensor(list(seen), dtype=torch.long), persistent=False)
        self.register_buffer("unseen_idx", torch.as_tensor(list(unseen), dtype=torch.long), persistent=False)
        for name in ("total", "gzsl_hits", "split_hits"):
            self.add_state(name, default=torch.zeros(num_classes), dist_reduce_fx="sum")

    def _split_argmax(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return classes[logits[:, classes].argmax(dim=1)]

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits [B, C]`` over the full label space, ``target [B]`` class indices."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"GZSLMetrics expects logits over {self.num_classes} classes, got {logits.shape[1]}")
        ones = torch.ones_like(target, dtype=self.total.dtype)
        self.total.index_add_(0, target, ones)
        self.gzsl_hits.index_add_(0, target, (logits.argmax(dim=1) == target).to(ones))
        in_split = torch.zeros_like(target, dtype=torch.bool)
        split_pred = torch.full_like(target, -1)
        for classes in (self.seen_idx, self.unseen_idx):
            if classes.numel() == 0:
                continue
            member = torch.isin(target, classes)
            split_pred = torch.where(member, self._split_argmax(logits, classes), split_pred)
            in_split |= member
        self.split_hits.index_add_(0, target, ((split_pred == target) & in_split).to(ones))

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
