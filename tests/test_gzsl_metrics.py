import math

import torch

from xvlm.metrics import GZSLMetrics, gzsl_report, harmonic_mean


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
