"""Sinkhorn's stopping rules: a relative tolerance that means the same at every N, defaults where it binds, and the
reference codes' own rules (LaZSL's and LICO's) reproduced by direct loops."""

import inspect
import re

import ot
import pytest
import torch
import torch.nn.functional as F

from xvlm.methods.lico import LICO, optimal_transport_loss, transport_cost
from xvlm.ot import sinkhorn
from xvlm.zeroshot import LaZSL, LaZSLSettings, lazsl_scores


def _problem(n: int, seed: int, dtype: torch.dtype = torch.float64, batch: int = 2, m: int = 12):
    """Costs in [0, 1] and random positive marginals; rows 0 and 5 are masked (zero mass)."""
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
    a[:, [0, 5]] = 0
    b = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    return cost.to(dtype), a.to(dtype), b.to(dtype)


def _relative_row_error(plan: torch.Tensor, a: torch.Tensor) -> float:
    """``max_i |(T 1)_i − a_i| / a_i`` over the rows with ``a_i > 0``, in float64."""
    rows = a > 0
    error = (plan.double().sum(-1) - a.double()).abs() / torch.where(rows, a.double(), 1)
    assert (plan[~rows] == 0).all()
    return float(error[rows].max())


DEFAULT_TOL = inspect.signature(sinkhorn).parameters["tol"].default


@pytest.mark.parametrize("n", [16, 512, 2048])
@pytest.mark.parametrize("dtype, tol, rounding", [(torch.float32, None, 1e-6), (torch.float64, 1e-9, 1e-12)])
def test_relative_row_error_is_below_tol_at_every_size(n, dtype, tol, rounding):
    cost, a, b = _problem(n, seed=n, dtype=dtype)
    plan = sinkhorn(cost, a, b, eps=0.05, **({} if tol is None else {"tol": tol}))
    tol = DEFAULT_TOL if tol is None else tol
    assert _relative_row_error(plan, a) < tol + rounding  # the check runs before the plan is formed: rounding
    torch.testing.assert_close(plan.sum(-2), b, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    # the same relative accuracy at every N: an absolute tol would allow a row error of tol / a_i ≈ tol · N here


@pytest.mark.parametrize("n", [16, 512])
def test_plans_agree_with_pot_at_tol_1e_6(n):
    cost, a, b = _problem(n, seed=10 + n, batch=1)
    ours = sinkhorn(cost, a, b, eps=0.05, tol=1e-6)[0]
    rows = a[0] > 0
    pot = ot.sinkhorn(a[0][rows], b[0], cost[0][rows], 0.05, numItermax=100_000, stopThr=1e-14)
    torch.testing.assert_close(ours[rows], pot, rtol=1e-5, atol=1e-12)


def test_the_default_tolerance_binds_on_typical_problems():
    cost, a, b = _problem(512, seed=20, dtype=torch.float32, batch=4)
    default = sinkhorn(cost, a, b, eps=0.1)
    assert torch.equal(default, sinkhorn(cost, a, b, eps=0.1, max_iter=100))  # stops well inside max_iter
    assert not torch.equal(default, sinkhorn(cost, a, b, eps=0.1, max_iter=3))


def _clip_like(b: int = 3, c: int = 6, n: int = 16, m: int = 5, d: int = 64, seed: int = 0):
    """Crop, global and descriptor features around one direction: cosines in a CLIP-like band (spread ~0.3)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    spread = 0.6 * common.norm() / d**0.5

    def around(*shape):
        return F.normalize(common + spread * torch.randn(*shape, d, generator=g), dim=-1)

    mask = torch.ones(c, m, dtype=torch.bool)
    mask[1, 3:] = False
    return around(b, n), around(b), around(c, m), mask


@pytest.mark.parametrize("stop_rule", ["relative", "reference"])
def test_lazsl_defaults_stop_on_the_tolerance_not_on_max_iter(stop_rule):
    crops, glob, desc, mask = _clip_like()
    settings = LaZSLSettings(stop_rule=stop_rule)
    default = lazsl_scores(crops, glob, desc, mask, settings).plans
    capped = LaZSLSettings(stop_rule=stop_rule, max_iter=10)
    assert torch.equal(default, lazsl_scores(crops, glob, desc, mask, capped).plans)  # done within 10 iterations
    one = lazsl_scores(crops, glob, desc, mask, LaZSLSettings(stop_rule=stop_rule, max_iter=1)).plans
    assert not torch.equal(default, one)


@pytest.mark.parametrize("n", [64, 512])
def test_lico_defaults_stop_on_the_tolerance_not_on_max_iter(n):
    g = torch.Generator().manual_seed(n)
    visual, language = torch.randn(4, n, 64, generator=g), torch.randn(4, 12, 64, generator=g)
    _, default = optimal_transport_loss(visual, language)
    _, capped = optimal_transport_loss(visual, language, max_iter=100)  # the reference's cap
    assert torch.equal(default, capped)
    assert _relative_row_error(default, torch.full((4, n), 1 / n)) < 1e-4  # the default ot_tol
    assert not torch.equal(default, optimal_transport_loss(visual, language, max_iter=2)[1])


def reference_loop(cost, a, b, eps, rule, tol, max_iter=5000):
    """One problem by the reference codes' iteration, in float64: kernel ``exp(−C / ε)`` of the cost as given,
    ``u = 1`` and ``v = 1`` (on real columns) at the start, row then column update, and a stop after the column
    update whose row update changed ``u`` little: ``mean_i |Δu_i| < tol`` (LaZSL's ``scaling``) or
    ``ε Σ_i |Δ log u_i| < tol`` over rows with mass (LICO's ``potential``). Returns ``(plan, iterations)``."""
    kernel = torch.exp(-cost.double() / eps)
    a, b = a.double(), b.double()
    u, v = torch.ones_like(a), (b > 0).double()
    rows = a > 0
    for iteration in range(1, max_iter + 1):
        previous = u
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
        if rule == "scaling":
            change = (u - previous).abs().mean()
        else:
            change = eps * (u[rows].log() - previous[rows].log()).abs().sum()
        if change < tol:
            break
    return u[:, None] * kernel * v[None, :], iteration


@pytest.mark.parametrize("rule, tol", [("scaling", 1e-2), ("potential", 1e-3)])
@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1.0), (torch.float32, 2.5)])  # scaling form, log domain
def test_reference_rules_stop_where_the_reference_iteration_stops(rule, tol, dtype, scale):
    g = torch.Generator().manual_seed(int(10 * scale))
    cost = 0.5 + scale * torch.rand(3, 10, 6, generator=g, dtype=torch.float64)  # an offset the rules must see
    a = torch.rand(3, 10, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(3, 6, generator=g, dtype=torch.float64) + 0.2
    a[:, 3], b[:, -1] = 0, 0  # a dropped row and a padded column
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    ours = sinkhorn(cost.to(dtype), a.to(dtype), b.to(dtype), eps=0.1, tol=tol, stop_rule=rule, max_iter=5000)
    for p in range(3):
        expected, iterations = reference_loop(cost[p], a[p], b[p], 0.1, rule, tol)
        assert 2 < iterations < 5000  # the rule, not the cap, ended it
        torch.testing.assert_close(ours[p].double(), expected, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)


def test_lazsl_reference_rule_is_the_reference_iteration_on_one_minus_h():
    crops, glob, desc, mask = _clip_like(b=2, c=3)
    out = lazsl_scores(crops, glob, desc, mask, LaZSLSettings(stop_rule="reference"))
    hybrid = 0.8 * torch.einsum("bnd,cmd->bcnm", crops, desc) + 0.2 * torch.einsum("bd,cmd->bcm", glob, desc)[:, :, None]
    for i in range(2):
        a = out.crop_keep[i].double() / out.crop_keep[i].sum()
        for k in range(3):
            b = mask[k].double() / mask[k].sum()
            expected, _ = reference_loop(1 - hybrid[i, k], a, b, 0.1, "scaling", 1e-2)
            torch.testing.assert_close(out.plans[i, k].double(), expected, atol=1e-7, rtol=0)


def test_lico_reference_rule_is_the_reference_iteration_on_two_minus_two_cosine():
    g = torch.Generator().manual_seed(3)
    visual, language = torch.randn(2, 64, 16, generator=g), torch.randn(2, 12, 16, generator=g)
    _, plans = optimal_transport_loss(visual, language, stop_rule="reference", max_iter=100)
    cost = transport_cost(visual, language)
    for i in range(2):
        expected, _ = reference_loop(cost[i], torch.full((64,), 1 / 64), torch.full((12,), 1 / 12), 0.1, "potential",
                                     1e-3, max_iter=100)
        torch.testing.assert_close(plans[i].double(), expected, atol=1e-7, rtol=0)


def test_stop_rules_are_checked_and_named():
    named = re.escape("stop_rule='converged' (must be 'relative' or 'reference')")
    with pytest.raises(ValueError, match=named):
        LaZSLSettings(stop_rule="converged")
    with pytest.raises(ValueError, match=named):
        LaZSL(stop_rule="converged")
    with pytest.raises(ValueError, match=re.escape("LICO ot_stop_rule='scaling': choose 'relative' or 'reference'")):
        LICO(ot_stop_rule="scaling", model="xvlm-tiny", pretrained=None)
    with pytest.raises(ValueError, match="ot_stop_rule='potential'"):
        optimal_transport_loss(torch.randn(1, 3, 4), torch.randn(1, 2, 4), stop_rule="potential")
