"""WCA and AWT scores (``xvlm.zeroshot.scorers``) against per-image, per-class loops written from the formulas."""

import math

import ot
import pytest
import torch
import torch.nn.functional as F

import xvlm.zeroshot.scorers as scorers
from xvlm.zeroshot.scorers import awt_scores, awt_weights, wca_scores, wca_weights


def _features(b=3, c=4, n=5, m=3, d=8, seed=0, dtype=torch.float64):
    """Random features (not normalised); padded descriptor rows hold garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    crops = torch.randn(b, n, d, generator=g, dtype=dtype)
    glob = torch.randn(b, d, generator=g, dtype=dtype)
    desc = torch.randn(c, m, d, generator=g, dtype=dtype)
    mask = torch.arange(m) < torch.randint(1, m + 1, (c,), generator=g)[:, None]
    mask[0] = True
    names = torch.randn(c, d, generator=g, dtype=dtype)
    return crops, glob, desc, mask, names


def _unit(x):
    return x / x.norm()


def _softmax(values):
    return torch.softmax(torch.stack(values), dim=0)


def _entropy(logits):
    log_p = torch.log_softmax(torch.stack(list(logits)), dim=0)
    return -(log_p.exp() * log_p).sum()


# --------------------------------------------------------------------------------------------- loops
def _wca_loop(crops, glob, desc, mask, names, tv, tt):
    """ψ_bk = Σ_n Σ_j w_n v_kj <p_n, q_kj> / (‖Σ_n w_n p_n‖ ‖Σ_j v_kj q_kj‖), w = softmax(<p_n, p_g> / τ_v),
    v = softmax over real j of <q, n_k> / τ_t."""
    b, n, _ = crops.shape
    c, m, _ = desc.shape
    out = torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        p_g = _unit(glob[i])
        ps = [_unit(crops[i, k]) for k in range(n)]
        w = _softmax([p @ p_g / tv for p in ps])
        for k in range(c):
            qs = [_unit(desc[k, j]) for j in range(m) if mask[k, j]]
            v = _softmax([q @ _unit(names[k]) / tt for q in qs])
            norms = sum(w[a] * ps[a] for a in range(n)).norm() * sum(v[j] * qs[j] for j in range(len(qs))).norm()
            out[i, k] = sum(w[a] * v[j] * (ps[a] @ qs[j]) for a in range(n) for j in range(len(qs))) / norms
    return out


def _awt_loop(crops, glob, desc, mask, names, scale, tv, tt, eps=None):
    """AWT weights (and, given ``eps``, scores with POT's Sinkhorn) per image and per class, from the formulas."""
    b, n, _ = crops.shape
    c, m, _ = desc.shape
    texts = [[_unit(names[k])] + [_unit(desc[k, j]) for j in range(m) if mask[k, j]] for k in range(c)]
    protos = [torch.stack(t).mean(dim=0) for t in texts]  # the mean of the logits over the text views
    view_weights, text_weights, scores = [], [], torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        xs = [_unit(glob[i])] + [_unit(crops[i, k]) for k in range(n)]
        a = _softmax([-_entropy(scale * x @ t for t in protos) / tv for x in xs])
        x_0 = xs[0]  # the global view
        z = [scale * x_0 @ t for t in protos]
        bs = []
        for k in range(c):
            entropies = [_entropy(z[:k] + [scale * x_0 @ t] + z[k + 1:]) for t in texts[k]]
            bk = _softmax([-h / tt for h in entropies])
            bs.append(bk)
            if eps is not None:
                sim = torch.stack([torch.stack([x @ t for t in texts[k]]) for x in xs])
                plan = ot.sinkhorn(a, bk, 1 - sim, reg=eps, numItermax=100000, stopThr=1e-13)
                scores[i, k] = (plan * sim).sum()
        view_weights.append(a)
        text_weights.append(bs)
    return view_weights, text_weights, scores


# --------------------------------------------------------------------------------------------- WCA
@pytest.mark.parametrize(("tv", "tt"), [(None, None), (1.0, 1.0), (0.05, 0.1)])
def test_wca_matches_the_loop(tv, tt):
    """``None``: the defaults, which are the authors' code's log-scales 4 (crops) and 2 (descriptions)."""
    feats = _features()
    options = {} if tv is None else {"crop_temperature": tv, "text_temperature": tt}
    scores = wca_scores(*feats, **options)
    tv, tt = (math.exp(-4), math.exp(-2)) if tv is None else (tv, tt)
    assert scores.dtype == torch.float64 and scores.shape == (3, 4)
    torch.testing.assert_close(scores, _wca_loop(*feats, tv, tt), rtol=0, atol=1e-12)


def test_wca_weights_sum_to_one_and_skip_padded_descriptors():
    crops, glob, desc, mask, names = _features()
    w, v = wca_weights(crops, glob, desc, mask, names)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(v.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert bool((v[~mask] == 0).all()) and bool((v[mask] > 0).all())


def test_wca_with_flat_weights_is_the_cosine_of_the_mean_crop_and_the_mean_description():
    crops, glob, desc, mask, names = _features()
    scores = wca_scores(crops, glob, desc, mask, names, crop_temperature=1e12, text_temperature=1e12)
    mean_crop = F.normalize(crops, dim=-1).mean(dim=1)
    mean_desc = (F.normalize(desc, dim=-1) * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    expected = F.cosine_similarity(mean_crop[:, None], mean_desc[None], dim=-1)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------- AWT
@pytest.mark.parametrize("scale", [1.0, 100.0, 1000.0])
def test_awt_weights_match_the_loop(scale):
    """Includes a scale where the top class takes nearly all the mass (the leave-one-out entropy's hard case)."""
    feats = _features(c=6, m=4, seed=1)
    a, b = awt_weights(*feats, logit_scale=scale, view_temperature=0.3, text_temperature=0.7)
    loop_a, loop_b, _ = _awt_loop(*feats, scale, 0.3, 0.7)
    mask = feats[3]
    assert a.shape == (3, 6) and b.shape == (3, 6, 5)
    torch.testing.assert_close(a, torch.stack(loop_a), rtol=0, atol=1e-10)
    for i in range(3):
        for k in range(6):
            real = torch.cat([torch.tensor([True]), mask[k]])
            torch.testing.assert_close(b[i, k, real], loop_b[i][k], rtol=0, atol=1e-10)
            assert bool((b[i, k, ~real] == 0).all())


@pytest.mark.parametrize(("scale", "eps"), [(100.0, 0.1), (10.0, 0.05)])
def test_awt_matches_the_loop_with_pot(scale, eps):
    feats = _features(seed=2)
    scores = awt_scores(*feats, eps=eps, logit_scale=scale, view_temperature=0.5, text_temperature=0.5,
                        max_iter=100000, tol=1e-11)
    _, _, expected = _awt_loop(*feats, scale, 0.5, 0.5, eps=eps)
    assert scores.dtype == torch.float64 and scores.shape == (3, 4)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-9)


def test_awt_scores_a_class_without_descriptors_by_its_name_and_a_single_class():
    crops, glob, desc, mask, names = _features()
    mask[2] = False
    scores = awt_scores(crops, glob, desc, mask, names, max_iter=100000, tol=1e-11)
    _, _, expected = _awt_loop(crops, glob, desc, mask, names, 100.0, 0.5, 0.5, eps=0.1)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-9)
    single = awt_scores(crops, glob, desc[:1], mask[:1], names[:1])
    assert single.shape == (3, 1) and bool(torch.isfinite(single).all())
    a, b = awt_weights(crops, glob, desc[:1], mask[:1], names[:1])
    real = int(mask[0].sum()) + 1
    torch.testing.assert_close(b[:, 0, :real], torch.full((3, real), 1 / real, dtype=torch.float64))


# --------------------------------------------------------------------------------------------- both
SCORERS = {"wca": wca_scores, "awt": awt_scores}


@pytest.mark.parametrize("name", SCORERS)
def test_padded_descriptors_have_no_effect(name):
    crops, glob, desc, mask, names = _features()
    scores = SCORERS[name](crops, glob, desc, mask, names)
    g = torch.Generator().manual_seed(5)
    wider = torch.cat([desc, torch.zeros(4, 1, 8, dtype=torch.float64), torch.randn(4, 2, 8, generator=g,
                                                                                 dtype=torch.float64)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    garbage = desc.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 8, generator=g, dtype=torch.float64) * 100
    torch.testing.assert_close(SCORERS[name](crops, glob, wider, wider_mask, names), scores, rtol=0, atol=1e-12)
    torch.testing.assert_close(SCORERS[name](crops, glob, garbage, mask, names), scores, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SCORERS)
def test_bf16_inputs_give_the_float32_scores_of_the_upcast_inputs(name):
    feats = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in _features(dtype=torch.float32)]
    upcast = [t.float() if t.is_floating_point() else t for t in feats]
    scores = SCORERS[name](*feats)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, SCORERS[name](*upcast), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(SCORERS[name](*feats), scores, rtol=0, atol=0)


@pytest.mark.parametrize("name", SCORERS)
def test_the_class_whose_descriptors_match_the_crops_wins(name):
    """Crops are noisy copies of class 2's descriptors; every other class's descriptors point elsewhere."""
    g = torch.Generator().manual_seed(3)
    c, m, d = 5, 4, 32
    desc = torch.randn(c, m, d, generator=g)
    names = desc.mean(dim=1) + 0.5 * torch.randn(c, d, generator=g)
    crops = desc[2][torch.randint(0, m, (2, 12), generator=g)] + 0.7 * torch.randn(2, 12, d, generator=g)
    glob = desc[2].mean(dim=0, keepdim=True).expand(2, d) + 0.7 * torch.randn(2, d, generator=g)
    scores = SCORERS[name](crops, glob, desc, torch.ones(c, m, dtype=torch.bool), names)
    assert scores.argmax(dim=1).tolist() == [2, 2]


@pytest.mark.parametrize("name", SCORERS)
def test_an_image_scores_the_same_alone_and_in_a_batch(name):
    feats = _features(b=4, dtype=torch.float32)
    crops, glob, desc, mask, names = feats
    together = SCORERS[name](*feats)
    for i in range(4):
        alone = SCORERS[name](crops[i:i + 1], glob[i:i + 1], desc, mask, names)
        torch.testing.assert_close(alone, together[i:i + 1], rtol=0, atol=1e-6)


def test_awt_chunks_over_classes_without_changing_the_scores(monkeypatch):
    feats = _features(c=7)
    whole = awt_scores(*feats)
    monkeypatch.setattr(scorers, "_PLAN_ELEMENTS", 1)  # one class per Sinkhorn call
    torch.testing.assert_close(awt_scores(*feats), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), [("wca", {}), ("wca", {"crop_temperature": 1e-3}),
                                               ("awt", {}), ("awt", {"logit_scale": 1000.0, "eps": 0.01})])
def test_gradients_reach_the_features_and_stay_finite(name, options):
    feats = [t.float().requires_grad_() if t.is_floating_point() else t for t in _features(dtype=torch.float32)]
    mask = feats[3].clone()
    mask[1, 1:] = False
    feats[3] = mask
    SCORERS[name](*feats, **options).sum().backward()
    for t in feats:
        if t.is_floating_point():
            assert t.grad is not None and bool(torch.isfinite(t.grad).all())


@pytest.mark.parametrize("name", SCORERS)
def test_bad_inputs_are_refused(name):
    crops, glob, desc, mask, names = _features()
    with pytest.raises(ValueError, match="name_feats"):
        SCORERS[name](crops, glob, desc, mask, names[:2])
    with pytest.raises(ValueError, match="desc_mask"):
        SCORERS[name](crops, glob, desc, mask[:, :2], names)
    with pytest.raises(ValueError, match="global_feats"):
        SCORERS[name](crops, glob[:2], desc, mask, names)
    option = "crop_temperature" if name == "wca" else "eps"
    with pytest.raises(ValueError, match=option):
        SCORERS[name](crops, glob, desc, mask, names, **{option: 0.0})


def test_wca_refuses_a_class_without_descriptors():
    crops, glob, desc, mask, names = _features()
    mask[1] = False
    with pytest.raises(ValueError, match="at least one descriptor"):
        wca_scores(crops, glob, desc, mask, names)


def test_the_docstring_example():
    q = torch.eye(3)[:, None]
    scores = wca_scores(torch.eye(3)[None, 1:2], torch.ones(1, 3), q, torch.ones(3, 1, dtype=torch.bool),
                        torch.eye(3))
    assert scores.argmax(dim=1).tolist() == [1]
    assert math.isclose(float(scores[0, 1]), 1.0, rel_tol=1e-6)
