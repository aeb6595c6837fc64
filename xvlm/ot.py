"""Entropic optimal transport: the one batched Sinkhorn solver that every xvlm method uses.

For each problem in the leading batch dimensions, with cost ``C [N, M]``, marginals ``a [N]``, ``b [M]`` and
regulariser ``ε``, :func:`sinkhorn` returns the plan

    T* = argmin_{T ≥ 0, T 1 = a, Tᵀ 1 = b} <T, C> − ε H(T),    H(T) = −Σ_ij T_ij (log T_ij − 1),

which is ``T = diag(u) K diag(v)`` with the Gibbs kernel ``K = exp(−C / ε)``. The iterations alternate the row
update ``u ← a ⊘ (K v)`` and the column update ``v ← b ⊘ (Kᵀ u)``, starting from ``v = 1``.

- **Two forms, chosen per call.** Subtracting the smallest cost ``c₀`` of the batch leaves every plan unchanged
  (``u`` absorbs the constant), so the kernel is ``K = exp(−(C − c₀) / ε)`` with entries in ``[exp(−R / ε), 1]``,
  ``R`` the cost range of the batch. The scaling form above runs when ``exp(−R / ε) ≥ tiny^(1/4)`` of the dtype
  (``R / ε ≤ 21.8`` in float32, ``≤ 177`` in float64), so that neither ``K`` nor the scalings ``u, v`` leave the
  floating-point range. Otherwise the same iterations run on the log-potentials ``f = log u``, ``g = log v``:
  ``f_i ← log a_i − LSE_j(g_j − C_ij / ε)``, ``g_j ← log b_j − LSE_i(f_i − C_ij / ε)``. There the cost is
  first reduced by its row minima and then its column minima over the unmasked entries (constants again), so the
  entries that carry mass are near 0 and ``f_i + g_j − C_ij / ε`` keeps its precision at small ``ε``. Both forms
  are the same algorithm: the choice changes speed and range, not the result (beyond rounding).
- **Stopping.** Each problem stops on its own as soon as its row-marginal error ``max_i |(T 1)_i − a_i|``,
  measured after a column update, is below ``tol``; the others go on, up to ``max_iter`` column updates. The loop
  always ends with a column update, so ``Tᵀ 1 = b`` holds to rounding; a problem's result does not depend on the
  other problems in its batch (beyond rounding). A ``tol`` below the rounding floor of the dtype (about 2e-6 in
  float32 at ``ε = 1e-3``) is never met, and such problems run ``max_iter`` updates.
- **Masks.** Masked rows and columns (and zero entries of ``a``, ``b``) get exactly zero mass: their scaling is
  0 (their log-potential ``−∞``), never a small number. Their costs are ignored but must be finite.
- **Gradients** flow by autograd through the unrolled iterations; no step produces ``inf − inf`` or ``0 / 0``,
  so gradients stay finite for small ``ε``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sinkhorn"]


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


def _reduced_cost(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``C − r 1ᵀ − 1 sᵀ``, row minima ``r`` then column minima ``s`` over unmasked entries (detached); 0 elsewhere."""
    live = rows.unsqueeze(-1) & cols.unsqueeze(-2)
    detached = cost.detach().masked_fill(~live, math.inf)
    row_min = detached.amin(dim=-1, keepdim=True).masked_fill(~rows.unsqueeze(-1), 0)
    col_min = (detached - row_min).amin(dim=-2, keepdim=True).masked_fill(~cols.unsqueeze(-2), 0)
    return torch.where(live, cost - row_min - col_min, 0)


def _kernel_limit(dtype: torch.dtype) -> float:
    """Largest ``R / ε`` for which ``exp(−R / ε) ≥ tiny^(1/4)``: the scaling form is safe up to here."""
    return -math.log(torch.finfo(dtype).tiny) / 4


def _unless_done(done: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new [..., K]``, except for the problems already ``done [...]``, which keep ``old``."""
    return torch.where(done.unsqueeze(-1), old, new) if bool(done.any()) else new


def _scaling(log_kernel: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Sinkhorn on ``K = exp(log_kernel)``; returns ``diag(u) K diag(v)`` ``[..., N, M]``.

    ``K > 0`` everywhere, so ``K v > 0`` and ``Kᵀ u > 0``: rows with ``a_i = 0`` get ``u_i = 0`` and columns with
    ``b_j = 0`` get ``v_j = 0``, exactly.
    """
    kernel = log_kernel.exp()
    u = torch.zeros_like(a)
    v = (b > 0).to(b.dtype)
    done = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    for step in range(max_iter):
        kv = (v.unsqueeze(-2) @ kernel.mT).squeeze(-2)  # row-vector products run 3-4x faster than K @ v on CPU
        if step:
            with torch.no_grad():
                done = done | (torch.addcmul(a, u, kv, value=-1).abs().amax(dim=-1) < tol)
            if bool(done.all()):
                break
        u = _unless_done(done, u, a / kv)
        v = _unless_done(done, v, b / (u.unsqueeze(-2) @ kernel).squeeze(-2))
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


def _log_domain(log_kernel: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Sinkhorn on the log-potentials ``f, g``; returns ``exp(f_i + log K_ij + g_j)`` ``[..., N, M]``.

    Rows with ``a_i = 0`` and columns with ``b_j = 0`` keep the potential ``−∞`` (zero mass); every log-sum-exp
    runs over at least one finite term, so neither values nor gradients meet ``inf − inf``.
    """
    rows, cols = a > 0, b > 0
    log_a = torch.log(torch.where(rows, a, 1))
    log_b = torch.log(torch.where(cols, b, 1))
    f = torch.zeros_like(a)
    g = torch.where(cols, 0.0, -math.inf).to(b.dtype)
    done = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    for step in range(max_iter):
        row_lse = torch.logsumexp(log_kernel + g.unsqueeze(-2), dim=-1)
        if step:
            with torch.no_grad():
                done = done | ((torch.exp(f + row_lse) - a).abs().amax(dim=-1) < tol)
            if bool(done.all()):
                break
        f = _unless_done(done, f, torch.where(rows, log_a - row_lse, -math.inf))
        col_lse = torch.logsumexp(log_kernel + f.unsqueeze(-1), dim=-2)
        g = _unless_done(done, g, torch.where(cols, log_b - col_lse, -math.inf))
    return torch.exp(f.unsqueeze(-1) + log_kernel + g.unsqueeze(-2))


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    max_iter: int = 100,
    tol: float = 1e-6,
    a_mask: torch.Tensor | None = None,
    b_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropic OT plans of a batch of problems (see the module docstring for the forms and the stopping rule).

    Args:
        cost: ``[..., N, M]`` cost matrices; any leading batch dims, floating dtype, any device.
        a: ``[..., N]`` source marginals (broadcast to the batch); uniform over the unmasked rows if None.
        b: ``[..., M]`` target marginals; uniform over the unmasked columns if None. ``a`` and ``b`` should carry
            the same total mass per problem.
        eps: entropic regulariser ``ε > 0``.
        max_iter: most column updates per problem.
        tol: a problem stops once ``max_i |(T 1)_i − a_i| < tol``.
        a_mask: ``[..., N]`` bool, broadcast to the batch: rows that take part (others get zero mass).
        b_mask: ``[..., M]`` bool, broadcast to the batch: columns that take part.

    Returns:
        ``[..., N, M]`` plans ``T = diag(u) exp(−C / ε) diag(v)`` with ``Tᵀ 1 = b`` and ``T 1 ≈ a``; exactly zero
        on masked rows and columns.

    Raises:
        ValueError: on a non-positive ``eps``, a problem without any unmasked row or column, or a non-finite cost.

    Example:
        >>> plan = sinkhorn(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), eps=0.1)
        >>> [round(x, 4) for x in plan.flatten().tolist()]
        [0.5, 0.0, 0.0, 0.5]
    """
    if cost.ndim < 2:
        raise ValueError(f"sinkhorn needs cost matrices [..., N, M]; got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"sinkhorn needs eps > 0; got {eps}")
    batch, (n, m) = cost.shape[:-2], cost.shape[-2:]
    a = _marginal(a, a_mask, batch + (n,), cost)
    b = _marginal(b, b_mask, batch + (m,), cost)
    if not (bool((a > 0).any(dim=-1).all()) and bool((b > 0).any(dim=-1).all())):
        raise ValueError("sinkhorn: every problem needs at least one unmasked row and column with positive mass")
    low = cost.detach().amin()
    spread = float(cost.detach().amax() - low) / eps
    if not math.isfinite(spread):
        raise ValueError("sinkhorn: the cost has NaN or infinite entries (masked entries must be finite too)")
    if spread <= _kernel_limit(cost.dtype):
        return _scaling(torch.add(low / eps, cost, alpha=-1 / eps), a, b, max_iter, tol)
    return _log_domain(_reduced_cost(cost, a > 0, b > 0) / -eps, a, b, max_iter, tol)
