"""Doubly-right metrics (ECOR spec §6): the strict scorer against a literal reading of the protocol, DROR's compat
scorer on its quirks, and the Metric's reduction over batches and processes."""


import pytest
import torch
from two_processes import on_two_processes

from xvlm.metrics import (
    DoublyRightMetrics,
    compat_verdicts,
    doubly_right,
    doubly_right_compat,
    doubly_right_from_topk,
    pair_sentence,
    ranked_sentences,
    top_pairs,
    verdict_fractions,
)

KEYS = ("RR", "RW", "WR", "WW")


def _reference_verdict(scores, target, true_rationales, candidates, k):
    """Spec §6 read literally for one image: sort every candidate pair by (score desc, flat index), keep k, vote."""
    num_categories, num_rationales = len(scores), len(scores[0])
    pairs = [(c, r) for c in range(num_categories) for r in range(num_rationales) if candidates[c][r]]
    kept = sorted(pairs, key=lambda pair: (-scores[pair[0]][pair[1]], pair[0] * num_rationales + pair[1]))[:k]
    voted = [c for c, _ in kept]
    predicted = min(set(voted), key=lambda c: (-voted.count(c), voted.index(c)))

    def right(category):
        return any(c == category and true_rationales[r] for c, r in kept)

    if predicted == target:
        return "RR" if right(target) else "RW"
    return "WR" if right(predicted) else "WW"


def _reference(joint, target, true_rationales, candidates, k):
    verdicts = [_reference_verdict(joint[i].tolist(), int(target[i]), true_rationales[i].tolist(),
                                   candidates.tolist(), k) for i in range(len(target))]
    return {key: verdicts.count(key) / len(verdicts) for key in KEYS}


def _problem(seed, n, num_categories, num_rationales, k, integer):
    """Random joints ``[n, C, R]`` lifted on the target category and the true rationales (so that every verdict
    occurs), a candidate mask with at least k pairs and multi-hot true rationales; integer joints make ties."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(num_categories, (n,), generator=g)
    true_rationales = torch.rand(n, num_rationales, generator=g) < 0.25
    candidates = torch.rand(num_categories, num_rationales, generator=g) < 0.7
    candidates.view(-1)[:k] = True
    if integer:
        joint = torch.randint(0, 3, (n, num_categories, num_rationales), generator=g).float()
    else:
        joint = torch.randn(n, num_categories, num_rationales, generator=g)
    joint[torch.arange(n), target] += torch.randint(0, 2, (n, 1), generator=g).float()
    joint += true_rationales[:, None, :].float() * torch.randint(0, 2, (n, 1, 1), generator=g)
    return joint, target, true_rationales, candidates


@pytest.mark.parametrize("seed, n, num_categories, num_rationales, k, integer", [
    (0, 60, 4, 5, 5, False), (1, 80, 3, 6, 5, True), (2, 50, 6, 3, 1, True), (3, 40, 2, 2, 4, True),
    (4, 70, 5, 7, 8, False), (5, 90, 7, 4, 3, True), (6, 30, 1, 6, 2, True),
])
def test_strict_scorer_matches_the_protocol_read_literally(seed, n, num_categories, num_rationales, k, integer):
    joint, target, true_rationales, candidates = _problem(seed, n, num_categories, num_rationales, k, integer)
    got = doubly_right(joint, target, true_rationales, candidates, k=k)
    assert list(got) == list(KEYS) and all(value.ndim == 0 for value in got.values())
    assert {key: float(value) for key, value in got.items()} == _reference(joint, target, true_rationales,
                                                                           candidates, k)
    assert float(sum(got.values())) == pytest.approx(1.0, abs=1e-12)
    full = torch.ones_like(candidates)
    assert {key: float(value) for key, value in doubly_right(joint, target, true_rationales, k=k).items()} == \
        _reference(joint, target, true_rationales, full, k)


def test_every_verdict_occurs_in_the_random_problems():
    seen = set()
    for seed in range(4):
        joint, target, true_rationales, candidates = _problem(seed, 80, 4, 5, 5, integer=True)
        got = doubly_right(joint, target, true_rationales, candidates)
        seen |= {key for key, value in got.items() if float(value) > 0}
    assert seen == set(KEYS)


def test_one_rationale_index_per_image_equals_its_one_hot():
    joint, target, _, candidates = _problem(7, 60, 4, 6, 5, integer=True)
    index = torch.randint(6, (60,), generator=torch.Generator().manual_seed(8))
    one_hot = torch.nn.functional.one_hot(index, 6).bool()
    got = doubly_right(joint, target, index, candidates)
    assert {key: float(v) for key, v in got.items()} == \
        {key: float(v) for key, v in doubly_right(joint, target, one_hot, candidates).items()}


def _joint_from_ranking(ranking, num_categories=3, num_rationales=4):
    """A joint ``[1, C, R]`` that ranks ``ranking``'s pairs first, in order, and every other pair below them."""
    joint = torch.full((1, num_categories, num_rationales), -100.0)
    for rank, (c, r) in enumerate(ranking):
        joint[0, c, r] = -float(rank)
    return joint


@pytest.mark.parametrize("ranking, target, true_rationales, k, verdict", [
    ([(0, 1), (0, 2), (1, 1)], 0, [1], 3, "RR"),
    ([(0, 2), (0, 3), (1, 1)], 0, [1], 3, "RW"),  # the true rationale is kept, but with another category
    ([(1, 1), (1, 2), (0, 1)], 0, [1], 3, "WR"),
    ([(1, 2), (1, 3), (0, 1)], 0, [1], 3, "WW"),  # right(target) does not rescue a wrong vote
    ([(2, 0), (1, 1), (1, 2), (2, 3)], 2, [3], 4, "RR"),  # 2 : 2 vote, category 2 appears first
    ([(1, 0), (2, 1), (0, 2)], 1, [0], 3, "RR"),  # all different: the top rank wins
    ([(1, 0), (2, 1), (0, 2)], 2, [1], 3, "WW"),
])
def test_hand_built_verdicts(ranking, target, true_rationales, k, verdict):
    joint = _joint_from_ranking(ranking)
    truth = torch.zeros(1, 4, dtype=torch.bool)
    truth[0, true_rationales] = True
    got = doubly_right(joint, torch.tensor([target]), truth, k=k)
    assert {key: float(value) for key, value in got.items()} == {key: float(key == verdict) for key in KEYS}
    ids = torch.tensor([ranking])
    code = doubly_right_from_topk(ids[..., 0], ids[..., 1], torch.tensor([target]), truth)
    assert code.tolist() == [KEYS.index(verdict)]


def test_equal_scores_go_to_the_lower_flat_index_and_candidates_are_respected():
    joint = torch.zeros(2, 3, 4)
    joint[1, 2, 3] = 1.0
    categories, rationales = top_pairs(joint, k=3)
    assert categories.tolist() == [[0, 0, 0], [2, 0, 0]] and rationales.tolist() == [[0, 1, 2], [3, 0, 1]]
    candidates = torch.ones(3, 4, dtype=torch.bool)
    candidates[0] = False
    candidates[1, 1] = False
    categories, rationales = top_pairs(joint, candidates, k=3)
    assert categories.tolist() == [[1, 1, 1], [2, 1, 1]] and rationales.tolist() == [[0, 2, 3], [3, 0, 2]]
    with pytest.raises(ValueError, match="number of candidate pairs"):
        top_pairs(joint, candidates, k=11)
    with pytest.raises(ValueError, match="candidates must be"):
        top_pairs(joint, candidates.T, k=2)


def test_fractions_sum_to_one_and_bad_codes_are_refused():
    codes = torch.tensor([0, 3, 3, 2, 1, 0, 0])
    got = verdict_fractions(codes)
    assert [float(got[key]) for key in KEYS] == [3 / 7, 1 / 7, 1 / 7, 2 / 7]
    assert float(sum(got.values())) == pytest.approx(1.0)
    assert all(float(value) == 0.0 for value in verdict_fractions(torch.zeros(0, dtype=torch.long)).values())
    for bad in (torch.tensor([0, 4]), torch.tensor([-1]), torch.tensor([0.0])):
        with pytest.raises((ValueError, RuntimeError)):
            verdict_fractions(bad)


# ------------------------------------------------------------------------------------------------------- compat
CATS = ["cat", "dog", "aquarium_fish", "bobcat"]
RATIONALES = ["whiskers", "fur", "tail", "four legs", "fins", "wings", "two wings"]


def _both_scorers(ranking, target, true_rationale):
    """Strict and compat verdicts of one image's ranked ``(category, rationale)`` id pairs."""
    ids = torch.tensor([ranking])
    strict = doubly_right_from_topk(ids[..., 0], ids[..., 1], torch.tensor([target]),
                                    torch.tensor([true_rationale])).item()
    texts = ranked_sentences(ids[..., 0], ids[..., 1], CATS, RATIONALES)
    compat = compat_verdicts(texts, [CATS[target]], [RATIONALES[true_rationale]], CATS, k=len(ranking)).item()
    return KEYS[strict], KEYS[compat]


def test_the_early_stop_changes_the_vote():
    # cat/whiskers at rank 1 stops DROR's scan: the vote is cat alone; all five ranks vote dog
    ranking = [(0, 0), (1, 1), (1, 2), (1, 3), (0, 1)]
    assert _both_scorers(ranking, target=0, true_rationale=0) == ("WW", "RR")


def test_substring_matching_makes_a_pair_right():
    # "wings" is in "... because there is two wings": a different rationale id, a match for DROR
    ranking = [(3, 6), (3, 1), (1, 5)]
    assert _both_scorers(ranking, target=3, true_rationale=5) == ("RW", "RR")
    # the gt name "cat" inside "bobcat": the bobcat sentence stops the scan, and cat wins the 1 : 1 vote
    ranking = [(0, 1), (3, 0), (0, 2), (0, 3)]
    assert _both_scorers(ranking, target=0, true_rationale=0) == ("RW", "RR")


def test_compat_looks_for_a_wrong_but_right_pair_past_the_early_stop():
    # the scan stops at rank 3 (dog 2 : cat 1), but dog/whiskers at rank 4 still makes it WR, as in DROR
    ranking = [(1, 1), (1, 2), (0, 0), (1, 0), (0, 1)]
    assert _both_scorers(ranking, target=0, true_rationale=0)[1] == "WR"
    ranking = [(1, 1), (1, 2), (0, 0), (3, 0), (0, 1)]
    assert _both_scorers(ranking, target=0, true_rationale=0) == ("WW", "WW")


def test_compat_normalises_names_and_refuses_unknown_ones():
    texts = [[pair_sentence("Aquarium fish", "fins"), pair_sentence("dog", "fur")], []]
    assert texts[0][0] == "This is a photo of a Aquarium fish because there is fins"
    got = doubly_right_compat(texts, ["aquarium_fish", "dog"], ["fins", "fur"], CATS)
    assert {key: float(value) for key, value in got.items()} == {"RR": 0.5, "RW": 0.0, "WR": 0.0, "WW": 0.5}
    # only the first k sentences count, several gt rationales may be given
    texts = [[pair_sentence("cat", "tail"), pair_sentence("dog", "fur"), pair_sentence("cat", "whiskers")]]
    assert compat_verdicts(texts, ["cat"], [("whiskers", "tail")], CATS, k=2).tolist() == [0]
    assert compat_verdicts(texts, ["cat"], ["whiskers"], CATS, k=2).tolist() == [1]
    assert compat_verdicts(texts, ["cat"], ["whiskers"], CATS, k=3).tolist() == [0]
    with pytest.raises(ValueError, match="unknown category"):
        compat_verdicts([[pair_sentence("horse", "mane")]], ["cat"], ["fur"], CATS)
    with pytest.raises(ValueError, match="unknown target"):
        compat_verdicts([[pair_sentence("cat", "fur")]], ["horse"], ["fur"], CATS)
    with pytest.raises(ValueError, match="not a pair sentence"):
        compat_verdicts([["a cat with fur"]], ["cat"], ["fur"], CATS)


# ------------------------------------------------------------------------------------------------------- metric
def _floats(report):
    return {key: float(value) for key, value in report.items()}


def _compat_inputs(top_c, top_r, target, true_rationales):
    """The sentences, target names and gt rationale strings (several per image) of ranked ids."""
    texts = ranked_sentences(top_c, top_r, CATS, RATIONALES)
    gt_texts = [[RATIONALES[r] for r in row.nonzero().flatten()] for row in true_rationales]
    return texts, [CATS[t] for t in target], gt_texts


def test_the_metric_over_unequal_batches_equals_the_functional_result():
    joint, target, true_rationales, candidates = _problem(9, 130, 4, 7, 5, integer=True)
    strict, compat = DoublyRightMetrics(), DoublyRightMetrics()
    for rows in torch.arange(130).split([7, 50, 1, 72]):
        top_c, top_r = top_pairs(joint[rows], candidates)
        strict.update_topk(top_c, top_r, target[rows], true_rationales[rows])
        compat.update(compat_verdicts(*_compat_inputs(top_c, top_r, target[rows], true_rationales[rows]), CATS))
    assert _floats(strict.compute()) == _floats(doubly_right(joint, target, true_rationales, candidates))
    top_c, top_r = top_pairs(joint, candidates)
    expected = doubly_right_compat(*_compat_inputs(top_c, top_r, target, true_rationales), CATS)
    assert _floats(compat.compute()) == _floats(expected)
    assert _floats(compat.compute()) != _floats(strict.compute())  # substrings: "wings" in "two wings"


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_no_samples_give_zeros_and_reset_empties_the_metric():
    metric = DoublyRightMetrics()
    assert all(float(value) == 0.0 for value in metric.compute().values())
    metric.update(torch.tensor([0, 2]))
    assert float(metric.compute()["RR"]) == 0.5
    metric.reset()
    assert all(float(value) == 0.0 for value in metric.compute().values())
    with pytest.raises(ValueError, match="0..3"):
        metric.update(torch.tensor([5]))


def _ddp_worker(rank, problem, expected):
    """Rank 0 scores the first 53 samples, rank 1 the other 77; a second metric is updated on rank 0 only."""
    joint, target, true_rationales, candidates = problem
    shared, lone = DoublyRightMetrics(), DoublyRightMetrics()
    rows = torch.arange(130)[:53] if rank == 0 else torch.arange(130)[53:]
    for chunk in rows.split(20):
        top_c, top_r = top_pairs(joint[chunk], candidates)
        shared.update_topk(top_c, top_r, target[chunk], true_rationales[chunk])
        if rank == 0:
            lone.update_topk(top_c, top_r, target[chunk], true_rationales[chunk])
    assert {key: float(value) for key, value in shared.compute().items()} == expected["all"], rank
    assert {key: float(value) for key, value in lone.compute().items()} == expected["first"], rank


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_processes_report_what_one_process_reports_on_all_samples():
    problem = _problem(13, 130, 5, 6, 5, integer=True)
    joint, target, true_rationales, candidates = problem
    first = torch.arange(53)
    expected = {
        "all": doubly_right(joint, target, true_rationales, candidates),
        "first": doubly_right(joint[first], target[first], true_rationales[first], candidates),
    }
    expected = {name: {key: float(value) for key, value in report.items()} for name, report in expected.items()}
    assert expected["all"] != expected["first"]  # the reduction has something to do
    on_two_processes(_ddp_worker, problem, expected)
