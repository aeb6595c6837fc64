"""Entropic optimal transport: the one batched Sinkhorn solver that every xvlm method uses.

For each problem in the leading batch dimensions, with cost ``C [N, M]``, marginals ``a [N]``, ``b [M]`` and
regulariser ``ε``, :func:`sinkhorn` returns the plan

    T* = argmin_{T ≥ 0, T 1 = a, Tᵀ 1 = b} <T, C> − ε H(T),    H(T) = −Σ_ij T_ij (log T_ij − 1),

which is ``T = diag(u) K diag(v)`` with the Gibbs kernel ``K = exp(−C / ε)``. The iterations alternate the row
update ``u ← a ⊘ (K v)`` and the column update ``v ← b ⊘ (Kᵀ u)``, starting from ``v = 1``.

- **Precision.** The solver works in float32 at least (float64 stays float64; bfloat16 and float16 costs are
  upcast, with gradients flowing back through the cast) and with autocast disabled, so a ``bf16-mixed`` run
  transports in float32. The plan has the working dtype. :func:`float32_region` gives callers the same block for
  building their costs (an autocast region would otherwise run ``x @ yᵀ`` in bfloat16 even on float32 inputs).
- **Two forms, chosen per call.** Subtracting the smallest cost ``c₀`` of the batch leaves every plan unchanged
  (``u`` absorbs the constant), so the kernel is ``K = exp(−(C − c₀) / ε)`` with entries in ``[exp(−R / ε), 1]``,
  ``R`` the cost range of the batch. The scaling form above runs when ``exp(−R / ε) ≥ tiny^(1/4)`` of the dtype
  (``R / ε ≤ 21.8`` in float32, ``≤ 177`` in float64), so that neither ``K`` nor the scalings ``u, v`` leave the
  floating-point range. Otherwise the same iterations run on the log-potentials ``f = log u``, ``g = log v``:
  ``f_i ← log a_i − LSE_j(g_j − C_ij / ε)``, ``g_j ← log b_j − LSE_i(f_i − C_ij / ε)``. There the cost is
  first reduced by its row minima and then its column minima over the unmasked entries (constants again), so the
  entries that carry mass are near 0 and ``f_i + g_j − C_ij / ε`` keeps its precision at small ``ε``. Both forms
  start from ``v = 1`` of the cost as given and are the same algorithm: the choice changes speed and range, not
  the result (beyond rounding).
- **Stopping** (``stop_rule``). Each problem stops on its own; the others go on, up to ``max_iter`` column
  updates. The loop always ends with a column update, so ``Tᵀ 1 = b`` holds to rounding, and a problem's result
  does not depend on the other problems in its batch (beyond rounding).

  - ``relative`` (default): the relative row-marginal error ``max_i |(T 1)_i − a_i| / a_i`` over the unmasked
    rows, measured after a column update, is below ``tol``. Being relative to each row's mass, one ``tol`` means
    the same accuracy at ``N = 16`` and ``N = 2048`` rows. A ``tol`` below the rounding floor of the dtype (in
    float32 about 2e-7 at ``ε ≥ 0.1``, 1e-6 at ``ε = 0.01``, 2e-5 at ``ε = 1e-3`` on costs in ``[0, 1]``) is
    never met, and such problems run ``max_iter`` updates.
  - ``scaling`` (the rule of LaZSL's reference code): ``mean_i |u_i − u_i'| < tol`` over all ``N`` rows, where
    ``u`` and the previous ``u'`` are the row scalings of the kernel ``exp(−C / ε)`` of the cost as given (not
    shifted), starting from ``u' = 1``; masked rows count with ``u = 0``. The threshold depends on the cost's
    offset and on ``N``; the rule needs ``exp(−C / ε)`` itself to be representable, as the reference code does.
  - ``potential`` (the rule of LICO's reference code): ``Σ_i |φ_i − φ_i'| < tol`` over the unmasked rows, with
    the dual potentials ``φ = ε log u`` (starting from ``φ' = 0``, i.e. ``u' = 1``). It grows with ``N``.

- **Host reads** (``check_every``). Stopping is a decision of the host: every ``check_every`` iterations it reads
  back whether every problem has stopped, and once before the loop it reads the cost range (to choose the form)
  and the checks below. Problems that stopped are frozen on the device in every iteration, so the plans are the
  same for any ``check_every``; a larger one saves reads (each makes the host wait for the device) for at most
  ``check_every − 1`` extra iterations. ``check_every=0`` reads nothing back at all, for steps that must not wait
  (CUDA graphs, ``torch.compile`` without graph breaks): it always runs ``max_iter`` iterations, always in the
  log-domain form (safe for any cost range), and skips the value checks (a non-finite cost gives a NaN plan).
- **Masks.** Masked rows and columns (and zero entries of ``a``, ``b``) get exactly zero mass: their scaling is
  0 (their log-potential ``−∞``), never a small number. Their costs are ignored but must be finite.
- **Gradients** flow by autograd through the unrolled iterations; no step produces ``inf − inf`` or ``0 / 0``,
  so gradients stay finite for small ``ε``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

__all__ = ["STOP_RULES", "StopRule", "float32_region", "sinkhorn"]

StopRule = Literal["relative", "scaling", "potential"]
STOP_RULES: tuple[StopRule, ...] = ("relative", "scaling", "potential")


@contextmanager
def float32_region(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Run a block with autocast disabled on the tensors' device; yields the tensors in float32 or wider.

    Half-precision tensors are upcast to float32 (float64 stays float64), differentiably, so gradients still reach
    the originals::

        with float32_region(x, y) as (x, y):
            cost = 2 - 2 * x @ y.mT  # float32 even inside a bf16 autocast region
    """
    if not tensors:
        raise ValueError("float32_region needs at least one tensor")
    with torch.autocast(tensors[0].device.type, enabled=False):
        yield tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def _marginal(
    weights: torch.Tensor | None, mask: torch.Tensor | None, shape: torch.Size, like: torch.Tensor
) -> torch.Tensor:
    """Marginal of ``shape`` (batch + ``[K]``), zero where masked; uniform over the mask when ``weights`` is None."""
    keep = torch.ones((), dtype=torch.bool, device=like.device) if mask is None else mask.to(like.device, torch.bool)
    keep = keep.broadcast_to(shape)
    if weights is None:
        uniform = keep.to(like.dtype)
        return uniform / uniform.sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.where(keep, weights.to(like.device, like.dtype).broadcast_to(shape), 0)


def _reduced_cost(
    cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C − r 1ᵀ − 1 sᵀ, r, s)``: row minima ``r [..., N, 1]`` then column minima ``s [..., 1, M]`` over the
    unmasked entries (detached, 0 on masked rows and columns); the reduced cost is 0 on masked entries."""
    live = rows.unsqueeze(-1) & cols.unsqueeze(-2)
    detached = cost.detach().masked_fill(~live, math.inf)
    row_min = detached.amin(dim=-1, keepdim=True).masked_fill(~rows.unsqueeze(-1), 0)
    col_min = (detached - row_min).amin(dim=-2, keepdim=True).masked_fill(~cols.unsqueeze(-2), 0)
    return torch.where(live, cost - row_min - col_min, 0), row_min, col_min


def _kernel_limit(dtype: torch.dtype) -> float:
    """Largest ``R / ε`` for which ``exp(−R / ε) ≥ tiny^(1/4)``: the scaling form is safe up to here."""
    return -math.log(torch.finfo(dtype).tiny) / 4


def _unless_done(done: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new [..., K]``, except for the problems already ``done [...]``, which keep ``old``."""
    return torch.where(done.unsqueeze(-1), old, new)


def _all_done(done: torch.Tensor, step: int, check_every: int) -> bool:
    """Whether every problem is ``done``, read back from the device only every ``check_every``-th step (never
    with 0): the one place the iterations make the host wait."""
    return check_every > 0 and step % check_every == 0 and bool(done.all())


class _Stop:
    """The stopping rule of one :func:`sinkhorn` call (see the module docstring), shared by both forms.

    ``relative`` is checked on the row sums before a row update; ``scaling`` and ``potential`` compare the row
    update with the previous one, ``log ũ`` being the log row scaling of the unshifted kernel ``exp(−C / ε)``.
    """

    def __init__(self, rule: StopRule, tol: float, eps: float, a: torch.Tensor) -> None:
        self.rule, self.tol, self.eps = rule, tol, eps
        self.rows = a > 0
        self.previous = torch.zeros_like(a)  # log ũ' = 0: the reference codes start from u = 1

    def relative_met(self, row_error: torch.Tensor) -> torch.Tensor:
        """``[...]`` bool: ``max_i |(T 1)_i / a_i − 1| < tol`` from ``row_error = (T 1)_i / a_i − 1`` ``[..., N]``."""
        return torch.where(self.rows, row_error.abs(), 0).amax(dim=-1) < self.tol

    def change_met(self, log_scaling: torch.Tensor) -> torch.Tensor:
        """``[...]`` bool: the change from the previous row update to ``log ũ [..., N]`` is below ``tol``."""
        if self.rule == "scaling":
            change = (log_scaling.exp() - self.previous.exp()).abs().mean(dim=-1)
        else:
            change = self.eps * torch.where(self.rows, (log_scaling - self.previous).abs(), 0).sum(dim=-1)
        self.previous = log_scaling
        return change < self.tol


def _scaling(
    log_kernel: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_iter: int, stop: _Stop, lift: float = 0.0,
    check_every: int = 1,
) -> torch.Tensor:
    """Sinkhorn on ``K = exp(log_kernel)``; returns ``diag(u) K diag(v)`` ``[..., N, M]``.

    ``K > 0`` everywhere, so ``K v > 0`` and ``Kᵀ u > 0``: rows with ``a_i = 0`` get ``u_i = 0`` and columns with
    ``b_j = 0`` get ``v_j = 0``, exactly. ``log_kernel`` is ``−(C − c₀) / ε`` and ``lift = c₀ / ε``, so that
    ``log u + lift`` is the log row scaling of ``exp(−C / ε)`` (for the change rules).
    """
    kernel = log_kernel.exp()
    inverse_a = torch.where(stop.rows, 1 / a, 0)
    u = torch.zeros_like(a)
    v = (b > 0).to(b.dtype)
    done = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    for step in range(max_iter):
        kv = (v.unsqueeze(-2) @ kernel.mT).squeeze(-2)  # row-vector products run 3-4x faster than K @ v on CPU
        if step and stop.rule == "relative":
            with torch.no_grad():
                done = done | stop.relative_met(u * kv * inverse_a - 1)
            if _all_done(done, step, check_every):
                break
        u = _unless_done(done, u, a / kv)
        v = _unless_done(done, v, b / (u.unsqueeze(-2) @ kernel).squeeze(-2))
        if stop.rule != "relative":
            with torch.no_grad():
                done = done | stop.change_met(u.log() + lift)
            if _all_done(done, step + 1, check_every):
                break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


def _log_domain(
    log_kernel: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    max_iter: int,
    stop: _Stop,
    row_lift: torch.Tensor | float = 0.0,
    col_lift: torch.Tensor | float = 0.0,
    check_every: int = 1,
) -> torch.Tensor:
    """Sinkhorn on the log-potentials ``f, g``; returns ``exp(f_i + log K_ij + g_j)`` ``[..., N, M]``.

    ``log_kernel`` is ``−(C − r_i − s_j) / ε`` and ``row_lift = r / ε [..., N]``, ``col_lift = s / ε [..., M]``:
    the start ``g = −s / ε`` is ``v = 1`` of the kernel ``exp(−C / ε)``, and ``f + r / ε`` its log row scaling.
    Rows with ``a_i = 0`` and columns with ``b_j = 0`` keep the potential ``−∞`` (zero mass); every log-sum-exp
    runs over at least one finite term, so neither values nor gradients meet ``inf − inf``.
    """
    rows, cols = stop.rows, b > 0
    log_a = torch.log(torch.where(rows, a, 1))
    log_b = torch.log(torch.where(cols, b, 1))
    f = torch.zeros_like(a)
    g = torch.where(cols, -torch.as_tensor(col_lift, dtype=b.dtype, device=b.device), -math.inf)
    done = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    for step in range(max_iter):
        row_lse = torch.logsumexp(log_kernel + g.unsqueeze(-2), dim=-1)
        if step and stop.rule == "relative":
            with torch.no_grad():
                done = done | stop.relative_met(torch.expm1(f + row_lse - log_a))
            if _all_done(done, step, check_every):
                break
        f = _unless_done(done, f, torch.where(rows, log_a - row_lse, -math.inf))
        col_lse = torch.logsumexp(log_kernel + f.unsqueeze(-1), dim=-2)
        g = _unless_done(done, g, torch.where(cols, log_b - col_lse, -math.inf))
        if stop.rule != "relative":
            with torch.no_grad():
                done = done | stop.change_met(f + row_lift)
            if _all_done(done, step + 1, check_every):
                break
    return torch.exp(f.unsqueeze(-1) + log_kernel + g.unsqueeze(-2))


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-5,
    stop_rule: StopRule = "relative",
    a_mask: torch.Tensor | None = None,
    b_mask: torch.Tensor | None = None,
    check_every: int = 1,
) -> torch.Tensor:
    """Entropic OT plans of a batch of problems (see the module docstring for the forms and the stopping rules).

    Runs in float32 at least, with autocast disabled, whatever the cost's dtype and the surrounding autocast.

    Args:
        cost: ``[..., N, M]`` cost matrices; any leading batch dims, floating dtype, any device.
        a: ``[..., N]`` source marginals (broadcast to the batch); uniform over the unmasked rows if None.
        b: ``[..., M]`` target marginals; uniform over the unmasked columns if None. ``a`` and ``b`` should carry
            the same total mass per problem.
        eps: entropic regulariser ``ε > 0``.
        max_iter: most column updates per problem.
        tol: threshold of ``stop_rule``; for ``relative``, a problem stops once the relative row-marginal error
            ``max_i |(T 1)_i − a_i| / a_i`` over its unmasked rows is below ``tol``.
        stop_rule: ``relative``, or one of the reference codes' rules ``scaling`` (LaZSL) and ``potential``
            (LICO), see the module docstring.
        a_mask: ``[..., N]`` bool, broadcast to the batch: rows that take part (others get zero mass).
        b_mask: ``[..., M]`` bool, broadcast to the batch: columns that take part.
        check_every: read "every problem stopped" back from the device every ``check_every`` iterations (the
            module docstring's host reads); 0 never reads anything back (see the module docstring). The plans do
            not depend on it.

    Returns:
        ``[..., N, M]`` plans ``T = diag(u) exp(−C / ε) diag(v)`` with ``Tᵀ 1 = b`` and ``T 1 ≈ a``; exactly zero
        on masked rows and columns. Float32, or float64 for a float64 cost.

    Raises:
        ValueError: on a non-positive ``eps``, an unknown ``stop_rule``, a problem without any unmasked row or
            column, or a non-finite cost.

    Example:
        >>> plan = sinkhorn(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), eps=0.1)
        >>> [round(x, 4) for x in plan.flatten().tolist()]
        [0.5, 0.0, 0.0, 0.5]
    """
    if cost.ndim < 2:
        raise ValueError(f"sinkhorn needs cost matrices [..., N, M]; got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"sinkhorn needs eps > 0; got {eps}")
    if stop_rule not in STOP_RULES:
        raise ValueError(f"sinkhorn stop_rule={stop_rule!r}: choose one of {', '.join(STOP_RULES)}")
    with float32_region(cost) as (cost,):
        batch, (n, m) = cost.shape[:-2], cost.shape[-2:]
        a = _marginal(a, a_mask, batch + (n,), cost)
        b = _marginal(b, b_mask, batch + (m,), cost)
        stop = _Stop(stop_rule, tol, eps, a)
        if check_every > 0:  # one read back: the checks and the choice of the form
            has_mass = (a > 0).any(dim=-1).all() & (b > 0).any(dim=-1).all()
            low = cost.detach().amin()
            readout = torch.stack([has_mass.to(cost.dtype), low, cost.detach().amax() - low]).tolist()
            if not readout[0]:
                raise ValueError("sinkhorn: every problem needs at least one unmasked row and column with positive "
                                 "mass")
            spread = readout[2] / eps
            if not math.isfinite(spread):
                raise ValueError("sinkhorn: the cost has NaN or infinite entries (masked entries must be finite too)")
            if spread <= _kernel_limit(cost.dtype):
                return _scaling(torch.add(low / eps, cost, alpha=-1 / eps), a, b, max_iter, stop, readout[1] / eps,
                                check_every)
        reduced, row_min, col_min = _reduced_cost(cost, a > 0, b > 0)
        return _log_domain(reduced / -eps, a, b, max_iter, stop, row_min.squeeze(-1) / eps,
                           col_min.squeeze(-2) / eps, check_every)
