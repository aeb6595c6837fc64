import math

import ot
import pytest
import torch

from xvlm.ot import _log_domain, _reduced_cost, _scaling, _Stop, sinkhorn


def _problem(shape, seed, dtype=torch.float64):
    """Random costs in [0, 1) and random positive marginals of a batch of problems."""
    g = torch.Generator().manual_seed(seed)
    *batch, n, m = shape
    cost = torch.rand(shape, generator=g, dtype=dtype)
    a = torch.rand(*batch, n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(*batch, m, generator=g, dtype=dtype) + 0.1
    return cost, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def _pot_plan(cost, a, b, eps):
    """POT's plan of one problem, solved far past our tolerance (log domain for small eps)."""
    solve = ot.bregman.sinkhorn_log if eps < 0.05 else ot.sinkhorn
    return solve(a, b, cost, eps, numItermax=200_000, stopThr=1e-14, warn=False)


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 7), (2, 3, 8, 4)])
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
def test_plans_match_pot(shape, eps):
    cost, a, b = _problem(shape, seed=len(shape) + int(100 * eps))
    plan = sinkhorn(cost, a, b, eps=eps, tol=1e-12, max_iter=50_000)
    flat = zip(cost.reshape(-1, *shape[-2:]), a.reshape(-1, shape[-2]), b.reshape(-1, shape[-1]))
    expected = torch.stack([_pot_plan(c, x, y, eps) for c, x, y in flat]).reshape(shape)
    torch.testing.assert_close(plan, expected, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.5, 0.05, 0.01])
def test_masked_problems_match_pot_on_their_unmasked_part(eps):
    cost, _, _ = _problem((5, 6, 7), seed=3)
    g = torch.Generator().manual_seed(4)
    a_mask = torch.rand(5, 6, generator=g) < 0.6
    b_mask = torch.rand(5, 7, generator=g) < 0.6
    a_mask[:, 0] = b_mask[:, -1] = True
    plan = sinkhorn(cost, eps=eps, tol=1e-12, max_iter=100_000, a_mask=a_mask, b_mask=b_mask)
    for p in range(5):
        rows, cols = a_mask[p], b_mask[p]
        uniform_a = torch.full((int(rows.sum()),), 1 / int(rows.sum()), dtype=cost.dtype)
        uniform_b = torch.full((int(cols.sum()),), 1 / int(cols.sum()), dtype=cost.dtype)
        expected = _pot_plan(cost[p][rows][:, cols], uniform_a, uniform_b, eps)
        torch.testing.assert_close(plan[p][rows][:, cols], expected, atol=1e-9, rtol=1e-6)
        assert (plan[p][~rows] == 0).all() and (plan[p][:, ~cols] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.02])
def test_marginals_hold_in_every_dtype(dtype, eps):
    cost, a, b = _problem((16, 9, 12), seed=5)
    working = torch.float64 if dtype == torch.float64 else torch.float32  # never below float32
    a, b = a.to(working), b.to(working)
    plan = sinkhorn(cost.to(dtype), a, b, eps=eps, max_iter=2000)
    assert plan.dtype == working
    torch.testing.assert_close(plan.sum(-2), b, atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(-1), a, atol=0, rtol=2e-5)  # the default tol 1e-5 (relative), rounded


def test_small_eps_takes_the_log_domain_without_underflow():
    cost, a, b = _problem((4, 6, 5), seed=6, dtype=torch.float32)
    assert torch.exp(-cost.amax() / 1e-3) == 0  # the plain kernel underflows here
    plan = sinkhorn(cost, a, b, eps=1e-3, max_iter=2000, tol=3e-5)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-2), b, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(-1), a, atol=1e-5, rtol=0)


def test_row_and_column_offsets_keep_float32_precision():
    cost, a, b = _problem((3, 6, 5), seed=12)
    offset = (cost + 30 * torch.arange(6.0)[:, None] + 20 * torch.arange(5.0)).float()
    plan = sinkhorn(offset, a.float(), b.float(), eps=1e-2, max_iter=3000)
    exact = sinkhorn(offset.double(), a, b, eps=1e-2, tol=1e-12, max_iter=10_000)
    torch.testing.assert_close(plan.double(), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule, tol", [("relative", 0.0), ("relative", 1e-3), ("scaling", 1e-3), ("potential", 1e-3)])
def test_scaling_and_log_forms_agree(rule, tol):
    cost, a, b = _problem((3, 7, 4), seed=7)
    a[0, 2] = 0  # a masked row
    a = a / a.sum(-1, keepdim=True)
    eps, low = 0.2, float(cost.min())
    scaled = _scaling(-(cost - low) / eps, a, b, 300, _Stop(rule, tol, eps, a), lift=low / eps)
    reduced, row_min, col_min = _reduced_cost(cost, a > 0, b > 0)
    logged = _log_domain(reduced / -eps, a, b, 300, _Stop(rule, tol, eps, a), row_min.squeeze(-1) / eps,
                         col_min.squeeze(-2) / eps)
    # both start from v = 1 of exp(−C / ε) and read the stopping rules in its frame, so they stop together
    torch.testing.assert_close(scaled, logged)
    if tol:  # ... and early: the tolerance binds
        assert not torch.allclose(scaled, _scaling(-(cost - low) / eps, a, b, 300, _Stop(rule, 0.0, eps, a)))


@pytest.mark.parametrize("eps", [1e-3, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_with_masks(eps, dtype):
    cost, _, _ = _problem((3, 6, 5), seed=8, dtype=dtype)
    cost.requires_grad_(True)
    a_mask = torch.tensor([True, True, False, True, False, True])
    b_mask = torch.tensor([[True, False, True, True, False]] * 3)
    plan = sinkhorn(cost, eps=eps, a_mask=a_mask, b_mask=b_mask)
    (plan * cost).sum().backward()
    assert torch.isfinite(cost.grad).all()
    assert (cost.grad[:, ~a_mask] == 0).all() and (cost.grad[~b_mask[:, None, :].expand(3, 6, 5)] == 0).all()


@pytest.mark.parametrize("eps", [0.5, 0.005])
def test_gradients_match_finite_differences(eps):
    cost, a, b = _problem((2, 4, 3), seed=9)
    cost.requires_grad_(True)
    b_mask = torch.tensor([True, True, False])

    def transport_cost(c):
        return (sinkhorn(c, a, None, eps=eps, max_iter=40, tol=0.0, b_mask=b_mask) * c).sum()

    assert torch.autograd.gradcheck(transport_cost, (cost,))


@pytest.mark.parametrize("rule", ["relative", "scaling", "potential"])
def test_each_problem_stops_on_its_own(rule):
    cost, a, b = _problem((2, 6, 6), seed=10)
    cost[0] *= 0.01  # nearly constant: converges at once; the second problem needs many iterations

    def solve(c, x, y):
        return sinkhorn(c, x, y, eps=0.05, tol=1e-2, stop_rule=rule)

    together = solve(cost, a, b)
    alone = torch.cat([solve(cost[p : p + 1], a[p : p + 1], b[p : p + 1]) for p in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-12, rtol=1e-9)


def test_masks_broadcast_over_the_batch():
    cost, _, _ = _problem((3, 4, 5, 6), seed=11)
    a_mask = torch.rand(3, 1, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    a_mask[..., 0] = True
    b_mask = torch.tensor([True] * 4 + [False] * 2)
    broadcast = sinkhorn(cost, eps=0.1, max_iter=1000, a_mask=a_mask, b_mask=b_mask)
    explicit = sinkhorn(cost, eps=0.1, max_iter=1000, a_mask=a_mask.expand(3, 4, 5), b_mask=b_mask.expand(3, 4, 6))
    torch.testing.assert_close(broadcast, explicit, atol=0, rtol=0)
    expected_rows = a_mask.expand(3, 4, 5) / a_mask.expand(3, 4, 5).sum(-1, keepdim=True)
    torch.testing.assert_close(broadcast.sum(-1), expected_rows.double(), atol=0, rtol=1e-5)
    torch.testing.assert_close(broadcast.sum(-2)[..., :4], torch.full((3, 4, 4), 0.25, dtype=torch.float64))


def test_invalid_inputs_are_refused():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="eps > 0"):
        sinkhorn(cost, eps=0.0)
    with pytest.raises(ValueError, match="at least one unmasked row"):
        sinkhorn(cost, eps=0.1, a_mask=torch.tensor([[True, True, True], [False, False, False]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        sinkhorn(cost.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(2)), torch.tensor(math.nan)), eps=0.1)
    with pytest.raises(ValueError, match=r"\[\.\.\., N, M\]"):
        sinkhorn(torch.rand(3), eps=0.1)
    with pytest.raises(ValueError, match="stop_rule='change': choose one of relative, scaling, potential"):
        sinkhorn(cost, eps=0.1, stop_rule="change")
