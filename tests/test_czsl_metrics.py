"""The CZSL evaluator: per-sample summaries against the full-matrix protocol (MSCI spec §6), and its DDP reduction."""

import math

import pytest
import torch
from two_processes import on_two_processes

from xvlm.metrics import CZSLMetrics, czsl_report, czsl_summary, feasible_summaries, report_from_summary

KEYS = ("auc", "hm", "best_seen", "best_unseen", "state_acc", "object_acc")


def _reference(scores, target, seen_pairs, in_space, pair_states, pair_objects):
    """The protocol written literally on the full score matrix, one biased argmax per bias."""
    scores = scores.double()
    seen_sample = seen_pairs[target]

    def predict(bias):
        biased = scores + bias * (~seen_pairs).double()
        biased[:, ~in_space] = -1e10
        return biased.argmax(dim=1)

    def accuracies(pred):
        right = pred == target
        return tuple(right[group].double().mean().item() if group.any() else 0.0
                     for group in (seen_sample, ~seen_sample))

    ref = predict(1e3)
    gaps = scores[:, seen_pairs].max(dim=1).values - scores[torch.arange(len(target)), target]
    gaps = sorted((gaps[~seen_sample & (ref == target)] - 1e-4).tolist())
    points = [accuracies(predict(bias)) for bias in gaps[:: max(1, len(gaps) // 20)]] + [accuracies(ref)]
    seen, unseen = zip(*points)
    unbiased = predict(0.0)
    return {
        "auc": sum((unseen[k + 1] - unseen[k]) * (seen[k] + seen[k + 1]) / 2 for k in range(len(points) - 1)),
        "hm": max(2 * s * u / (s + u) if s > 0 and u > 0 else 0.0 for s, u in points),
        "best_seen": max(seen),
        "best_unseen": max(unseen),
        "state_acc": (pair_states[unbiased] == pair_states[target]).double().mean().item(),
        "object_acc": (pair_objects[unbiased] == pair_objects[target]).double().mean().item(),
    }


def _problem(seed, n=120, num_pairs=12, integer=False, outside_targets=False):
    """Random scores ``[n, P]`` inflated on the seen pairs (as a seen-trained model's are) and on the target, a
    closed space that leaves some unseen pairs out, and primitive tables; integer scores make ties."""
    g = torch.Generator().manual_seed(seed)
    seen_pairs = torch.rand(num_pairs, generator=g) < 0.5
    seen_pairs[0], seen_pairs[-1] = True, False
    in_space = seen_pairs | (torch.rand(num_pairs, generator=g) < 0.7)
    in_space[-1] = True
    choices = torch.arange(num_pairs) if outside_targets else in_space.nonzero().squeeze(1)
    target = choices[torch.randint(len(choices), (n,), generator=g)]
    if integer:
        scores = torch.randint(0, 4, (n, num_pairs), generator=g).float()
        scores[torch.arange(n), target] += 1
        scores[:, seen_pairs] += 1
    else:
        scores = torch.randn(n, num_pairs, generator=g)
        scores[torch.arange(n), target] += 1.5
        scores[:, seen_pairs] += 0.8
    tables = torch.randint(0, 3, (2, num_pairs), generator=g)
    return scores, target, seen_pairs, in_space, tables[0], tables[1]


@pytest.mark.parametrize("seed, n, num_pairs, integer, outside_targets", [
    (0, 120, 12, False, False), (1, 300, 40, False, True), (2, 25, 5, False, False),
    (3, 150, 9, True, False), (4, 400, 30, True, True), (5, 60, 6, True, False),
])
def test_matches_the_full_matrix_protocol(seed, n, num_pairs, integer, outside_targets):
    scores, target, seen_pairs, in_space, states, objects = _problem(seed, n, num_pairs, integer, outside_targets)
    got = czsl_report(scores, target, seen_pairs, in_space, pair_states=states, pair_objects=objects)
    expected = _reference(scores, target, seen_pairs, in_space, states, objects)
    assert set(got) == set(KEYS)
    for key in KEYS:
        assert got[key].ndim == 0
        assert math.isclose(float(got[key]), expected[key], abs_tol=1e-9), key
    assert 0 < float(got["auc"]) < float(got["best_seen"]) * float(got["best_unseen"])  # a real trade-off curve


def test_a_hand_computed_sweep():
    # pairs (state, object): 0 = (0, 0) and 1 = (1, 0) seen, 2 = (1, 1) unseen; all in the space
    scores = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.5], [1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])
    target = torch.tensor([0, 1, 2, 2])
    seen_pairs = torch.tensor([True, True, False])
    report = czsl_report(scores, target, seen_pairs, torch.ones(3, dtype=torch.bool),
                         pair_states=torch.tensor([0, 1, 1]), pair_objects=torch.tensor([0, 0, 1]))
    # ref predicts pair 2 everywhere: (s, u) = (0, 1). Gaps d = (0.5, 1.0) of the unseen samples give biases
    # 0.4999 -> (1, 0) and 0.9999 -> (0.5, 0.5): the curve (u, s) = (0, 1), (0.5, 0.5), (1, 0)
    expected = {"auc": 0.5, "hm": 0.5, "best_seen": 1.0, "best_unseen": 1.0,
                "state_acc": 0.75, "object_acc": 0.5}  # unbiased predictions 0, 1, 0, 1
    assert {key: float(value) for key, value in report.items()} == pytest.approx(expected, abs=1e-12)


def test_a_zero_accuracy_gives_a_zero_harmonic_mean():
    seen_pairs = torch.tensor([True, True, False])
    everything = torch.ones(3, dtype=torch.bool)
    # the one bias turns the unseen sample wrong while it turns the seen one right: points (1, 0) and (0, 1)
    scores, target = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 2])
    report = czsl_report(scores, target, seen_pairs, everything)
    assert float(report["hm"]) == 0.0 and float(report["auc"]) == 0.5
    assert float(report["best_seen"]) == 1.0 and float(report["best_unseen"]) == 1.0
    # ref predicts the unseen pairs 2 and 3 and gets no sample right: no bias to sweep, the one point (0, 0)
    scores = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 3.0, 1.0, 2.0]])
    seen_pairs = torch.tensor([True, True, False, False])
    report = czsl_report(scores, target, seen_pairs, torch.ones(4, dtype=torch.bool))
    assert all(float(value) == 0.0 for value in report.values())


def test_ties_go_to_the_lower_pair_index_seen_or_unseen():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    seen_pairs = torch.tensor([False, True, False])
    summary = czsl_summary(scores, torch.tensor([1, 1]), seen_pairs, torch.ones(3, dtype=torch.bool))
    assert summary[:, 3].tolist() == [0.0, 2.0]  # the best unseen pairs
    # unbiased: the unseen pair 0 beats the seen pair 1 on the first sample, the seen pair 1 the unseen 2 on the next
    report = report_from_summary(summary, seen_pairs, pair_states=torch.tensor([0, 1, 2]))
    assert float(report["state_acc"]) == 0.5


def test_a_space_without_unseen_pairs_and_bad_spaces():
    scores, target = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([1])
    seen_pairs = torch.tensor([True, True, False])
    summary = czsl_summary(scores, target, seen_pairs, seen_pairs)
    assert summary[0].tolist() == [2.0, 1.0, float("-inf"), -1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="every seen pair"):
        czsl_summary(scores, target, seen_pairs, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="at least one seen"):
        CZSLMetrics(torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("integer", [False, True])
def test_feasible_summaries_equal_one_summary_per_threshold(integer):
    scores, target, seen_pairs, _, _, _ = _problem(7, n=50, num_pairs=30, integer=integer, outside_targets=True)
    feasibility = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(8)).float() / 5  # ties
    thresholds = torch.tensor([-1.0, 0.0, 0.2, 0.5, 0.6, 1.0, 2.0])  # everything, some, exact values, nothing
    summaries = feasible_summaries(scores, target, seen_pairs, feasibility, thresholds)
    assert summaries.shape == (len(thresholds), 50, 6) and summaries.dtype == torch.float64
    for threshold, summary in zip(thresholds, summaries):
        expected = czsl_summary(scores, target, seen_pairs, seen_pairs | (feasibility >= threshold))
        assert torch.equal(summary, expected), float(threshold)
    everything_seen = torch.ones(30, dtype=torch.bool)
    assert torch.equal(feasible_summaries(scores, target, everything_seen, feasibility, thresholds)[0],
                       czsl_summary(scores, target, everything_seen, everything_seen))


def test_the_metric_over_unequal_batches_equals_the_functional_report():
    scores, target, seen_pairs, in_space, states, objects = _problem(9, n=130, num_pairs=20)
    metric = CZSLMetrics(seen_pairs, pair_states=states, pair_objects=objects)
    for rows in torch.arange(130).split([7, 50, 1, 72]):
        metric.update_scores(scores[rows], target[rows], in_space)
    got = metric.compute()
    expected = czsl_report(scores, target, seen_pairs, in_space, pair_states=states, pair_objects=objects)
    assert {key: float(value) for key, value in got.items()} == {key: float(v) for key, v in expected.items()}


def test_candidates_report_each_and_the_best_is_the_highest_auc():
    scores, target, seen_pairs, _, _, _ = _problem(10, n=200, num_pairs=24)
    feasibility = torch.rand(24, generator=torch.Generator().manual_seed(11))
    thresholds = torch.tensor([0.0, 0.3, 0.6, 0.9])
    metric = CZSLMetrics(seen_pairs, candidates=len(thresholds))
    for rows in torch.arange(200).split([64, 64, 72]):
        metric.update(feasible_summaries(scores[rows], target[rows], seen_pairs, feasibility, thresholds))
    got = metric.compute()
    expected = [czsl_report(scores, target, seen_pairs, seen_pairs | (feasibility >= th)) for th in thresholds]
    for key in ("auc", "hm", "best_seen", "best_unseen"):
        assert got[key].tolist() == [float(report[key]) for report in expected], key
    aucs = [float(report["auc"]) for report in expected]
    assert len(set(aucs)) > 1  # the candidates differ, so the choice means something
    index, best = metric.best()
    assert index == aucs.index(max(aucs)) and float(best["auc"]) == max(aucs) and best["hm"].ndim == 0
    with pytest.raises(ValueError, match="expects summaries"):
        metric.update(feasible_summaries(scores, target, seen_pairs, feasibility, thresholds[:2]))


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_no_samples_report_zeros_and_reset_empties_the_metric():
    scores, target, seen_pairs, in_space, _, _ = _problem(12, n=40)
    metric = CZSLMetrics(seen_pairs)
    assert all(float(value) == 0.0 for value in metric.compute().values())
    metric.update_scores(scores, target, in_space)
    assert float(metric.compute()["best_seen"]) > 0
    metric.reset()
    assert all(float(value) == 0.0 for value in metric.compute().values())


def _ddp_worker(rank, problem, expected):
    """Rank 0 scores the first 53 samples, rank 1 the other 77; a second metric is updated on rank 0 only."""
    scores, target, seen_pairs, in_space, states, objects = problem
    shared, lone = CZSLMetrics(seen_pairs, states, objects), CZSLMetrics(seen_pairs, states, objects)
    rows = torch.arange(130)[:53] if rank == 0 else torch.arange(130)[53:]
    for chunk in rows.split(20):
        shared.update_scores(scores[chunk], target[chunk], in_space)
        if rank == 0:
            lone.update_scores(scores[chunk], target[chunk], in_space)
    assert {key: float(value) for key, value in shared.compute().items()} == expected["all"], rank
    assert {key: float(value) for key, value in lone.compute().items()} == expected["first"], rank


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_processes_report_what_one_process_reports_on_all_samples():
    problem = _problem(13, n=130, num_pairs=16)
    scores, target, seen_pairs, in_space, states, objects = problem
    first = torch.arange(53)
    expected = {
        "all": czsl_report(scores, target, seen_pairs, in_space, states, objects),
        "first": czsl_report(scores[first], target[first], seen_pairs, in_space, states, objects),
    }
    expected = {name: {key: float(value) for key, value in report.items()} for name, report in expected.items()}
    on_two_processes(_ddp_worker, problem, expected)
