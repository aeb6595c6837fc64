import math

import pytest
import torch

from xvlm.metrics import GZSLMetrics, choose_calibration, gzsl_report, harmonic_mean


def _reference(logits, target, seen, unseen):
    """Per-class accuracy written as plain loops."""
    def per_class_mean(classes, candidates):
        accs = []
        for c in classes:
            rows = [i for i in range(len(target)) if target[i] == c]
            if not rows:
                continue
            hits = 0
            for i in rows:
                best = max(candidates, key=lambda k: logits[i][k])
                hits += best == c
            accs.append(hits / len(rows))
        return sum(accs) / len(accs)

    everything = list(range(len(logits[0])))
    s, u = per_class_mean(seen, everything), per_class_mean(unseen, everything)
    return {"S": s, "U": u, "H": 2 * s * u / (s + u) if s + u else 0.0,
            "zsl": per_class_mean(unseen, unseen), "seen_top1": per_class_mean(seen, seen)}


def test_matches_a_direct_loop_with_unbalanced_classes_and_batches():
    g = torch.Generator().manual_seed(0)
    num_classes, seen, unseen = 7, [0, 2, 3, 5], [1, 4, 6]
    target = torch.cat([torch.randint(0, num_classes, (50,), generator=g), torch.zeros(30, dtype=torch.long)])
    logits = torch.randn(len(target), num_classes, generator=g)
    logits[torch.arange(len(target)), target] += 1.0
    metric = GZSLMetrics(num_classes, seen, unseen)
    for chunk in torch.arange(len(target)).split(17):
        metric.update(logits[chunk], target[chunk])
    got = metric.compute()
    expected = _reference(logits.tolist(), target.tolist(), seen, unseen)
    for key, value in expected.items():
        assert math.isclose(float(got[key]), value, abs_tol=1e-6), key


def test_classes_without_samples_are_left_out_not_counted_as_zero():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    report = gzsl_report(logits, torch.tensor([0, 2]), seen=[0, 1], unseen=[2, 3])
    assert float(report["S"]) == 1.0 and float(report["U"]) == 1.0


def test_harmonic_mean_is_zero_when_both_are_zero():
    assert float(harmonic_mean(torch.tensor(0.0), torch.tensor(0.0))) == 0.0
    assert math.isclose(float(harmonic_mean(torch.tensor(0.5), torch.tensor(1.0))), 2 / 3, rel_tol=1e-6)


def _scored(seed=0, n=240, num_classes=8, seen_bias=0.8):
    """Random scores where the seen classes (0-4) are inflated, as a seen-class-trained model's are."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (n,), generator=g)
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), target] += 1.5
    logits[:, :5] += seen_bias
    return logits, target, [0, 1, 2, 3, 4], [5, 6, 7]


def _shifted(logits, seen, gamma):
    shifted = logits.clone()
    shifted[:, seen] -= gamma
    return shifted


def test_calibration_subtracts_from_seen_scores_as_a_direct_loop_does():
    logits, target, seen, unseen = _scored()
    for gamma in (-0.7, 0.0, 0.4, 1.3):
        got = gzsl_report(logits, target, seen, unseen, calibration=gamma)
        expected = _reference(_shifted(logits, seen, gamma).tolist(), target.tolist(), seen, unseen)
        for key in ("S", "U", "H"):
            assert math.isclose(float(got[key]), expected[key], abs_tol=1e-6), (gamma, key)
        uncalibrated = _reference(logits.tolist(), target.tolist(), seen, unseen)
        for key in ("zsl", "seen_top1"):  # the within-split argmaxes ignore the calibration
            assert math.isclose(float(got[key]), uncalibrated[key], abs_tol=1e-6), (gamma, key)


def test_raising_the_calibration_never_lowers_u_nor_raises_s():
    logits, target, seen, unseen = _scored(seed=1)
    reports = [gzsl_report(logits, target, seen, unseen, calibration=g) for g in torch.linspace(-3, 3, 61).tolist()]
    s = torch.stack([r["S"] for r in reports])
    u = torch.stack([r["U"] for r in reports])
    assert bool((s[1:] <= s[:-1] + 1e-7).all()) and bool((u[1:] >= u[:-1] - 1e-7).all())
    assert float(s[0]) > float(s[-1]) and float(u[-1]) > float(u[0])  # the range spans real trade-offs


def test_report_at_any_calibration_equals_the_metric_built_with_it():
    logits, target, seen, unseen = _scored(seed=2)
    metric = GZSLMetrics(8, seen, unseen, keep_scores=True)
    for chunk in torch.arange(len(target)).split(50):
        metric.update(logits[chunk], target[chunk])
    for gamma in (-1.1, 0.0, 0.35, 0.9):
        at = metric.report_at(gamma)
        direct = gzsl_report(logits, target, seen, unseen, calibration=gamma)
        for key in ("S", "U", "H"):
            assert math.isclose(float(at[key]), float(direct[key]), abs_tol=1e-6), (gamma, key)


def test_the_chosen_calibration_is_the_best_of_a_fine_direct_search():
    logits, target, seen, unseen = _scored(seed=3)
    chosen = choose_calibration(logits, target, seen, unseen)
    best = float(gzsl_report(logits, target, seen, unseen, calibration=chosen)["H"])
    # H only changes where γ crosses a sample's margin: trying the midpoint between every pair of neighbouring
    # margins (computed here from the raw scores) visits every value H takes
    margins = (logits[:, seen].max(dim=1).values - logits[:, unseen].max(dim=1).values).sort().values
    candidates = torch.cat([margins[:1] - 1, 0.5 * (margins[1:] + margins[:-1]), margins[-1:] + 1])
    direct = max(float(gzsl_report(logits, target, seen, unseen, calibration=float(g))["H"]) for g in candidates)
    assert math.isclose(best, direct, abs_tol=1e-6)
    assert best > float(gzsl_report(logits, target, seen, unseen)["H"]) + 0.02  # seen-biased scores gain from it
    assert chosen > 0  # the seen classes are inflated, so the calibration takes from them


def test_calibration_search_on_an_explicit_grid_and_its_tie_break():
    logits, target, seen, unseen = _scored(seed=4, seen_bias=0.0)
    grid = [-0.5, -0.25, 0.0, 0.25, 0.5]
    chosen = choose_calibration(logits, target, seen, unseen, grid=grid)
    h = [float(gzsl_report(logits, target, seen, unseen, calibration=g)["H"]) for g in grid]
    assert chosen in grid and math.isclose(h[grid.index(chosen)], max(h), abs_tol=1e-6)
    # scores that put every sample right whatever γ is within ±1: the calibration nearest to none wins
    clear = torch.full((len(target), 8), -5.0)
    clear[torch.arange(len(target)), target] = 5.0
    assert choose_calibration(clear, target, seen, unseen, grid=[-1.0, 0.5, 0.0, 1.0]) == 0.0
    assert choose_calibration(clear, target, seen, unseen) == 0.0


def test_keeping_scores_needs_both_splits():
    metric = GZSLMetrics(3, seen=[0, 1, 2], unseen=[], keep_scores=True)
    with pytest.raises(ValueError, match="needs seen and unseen classes"):
        metric.update(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="keep_scores=True"):
        GZSLMetrics(3, seen=[0, 1], unseen=[2]).choose_calibration()
