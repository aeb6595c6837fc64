"""Training-free zero-shot competitors of LaZSL as pure scoring functions: WCA and AWT.

Both take what :func:`xvlm.zeroshot.lazsl.lazsl_scores` takes (crop features ``P [B, N, D]``, global-view features
``p_g [B, D]``, descriptor features ``Q [C, M, D]`` with the mask ``m [C, M]`` of real descriptors) plus the class-name
prompt features ``n [C, D]`` ("a photo of a {class}." through the same text tower), and return ``[B, C]`` scores. All
features are L2-normalised here; padded descriptor rows are ignored whatever they hold. Everything runs in float32
(float64 features stay float64) with autocast off (:func:`xvlm.ot.float32_region`), so half-precision features give
float32 scores equal to those of the same features upcast; gradients flow to the inputs. DCLIP on the same
descriptors is ``lazsl_scores(...).dclip_scores`` and is not repeated here.

**WCA** (Li, Li, Erfani, Feng, Bailey, Liu, "Visual-Text Cross Alignment: Refining the Similarity Score in
Vision-Language Models", ICML 2024): crops weighted by their cosine to the global view, descriptions by their cosine
to the class-name prompt, score = the cosine between the weighted crop and the weighted description features::

    w_n = softmax_n(<p_n, p_g> / τ_v),   v_kj = softmax_{j: m_kj}(<q_kj, n_k> / τ_t),
    ψ_k = cos(Σ_n w_n p_n, Σ_j v_kj q_kj) = Σ_n Σ_j w_n v_kj <p_n, q_kj> / (‖Σ_n w_n p_n‖ ‖Σ_j v_kj q_kj‖).

The left-hand form is what runs: one ``[B, D] × [D, C]`` product, no ``B × C × N × M`` tensor.

**AWT** (Zhu, Ji, Zhao, Wu, Wang, "AWT: Transferring Vision-Language Models via Augmentation, Weighting, and
Transportation", NeurIPS 2024), zero-shot form. Image views are ``x_0 = p_g`` and the crops, ``V = 1 + N``; text
views of class ``k`` are ``t_k0 = n_k`` and its real descriptors, ``J = 1 + M``. With ``s`` the logit scale::

    t̄_k = mean_j t_kj  (not renormalised: s <x, t̄_k> is the mean logit)  class prototype
    π_i = softmax_k(s <x_i, t̄_k>),   a_i = softmax_i(−H(π_i) / τ_v)      view weights        [B, V]
    z_k = s <x_0, t̄_k>,   z'_kj = s <x_0, t_kj>                            the global view's logits
    π^{kj} = softmax over classes of (z_1, …, z_{k−1}, z'_kj, z_{k+1}, …)  class k's prototype replaced by t_kj
    b_kj = softmax_{j: real}(−H(π^{kj}) / τ_t)                         text weights        [B, C, J]
    T_k = Sinkhorn(1 − X t_kᵀ; a, b_k, ε),   ψ_k = <T_k, X t_kᵀ> = 1 − OT cost

with ``H`` the Shannon entropy (nats). ``H(π^{kj})`` is computed in closed form, without a ``C × C`` tensor: with
``R_k = log Σ_{l≠k} e^{z_l}``, ``h_k`` the entropy of the softmax over the other classes, and
``σ = sigmoid(z'_kj − R_k)``, ``H(π^{kj}) = h₂(σ) + (1 − σ) h_k`` (``h₂`` the binary entropy). The transport runs
as one :func:`xvlm.ot.sinkhorn` over ``B × C`` problems, chunked over classes so that at most ``_PLAN_ELEMENTS``
plan entries exist at once. ``Σ T = 1``, so ``ψ`` is a weighted mean of cosines, on the scale of DCLIP's.

Our readings of details the papers leave open (WCA's checked against its authors' code, AWT's against its official
zero-shot evaluation):

1. WCA's weights and score as its authors' code computes them (the ``wca`` method of their follow-up, BiFTA,
   github.com/tmlr-group/BiFTA, ``wca.py`` / ``helper.py``; the WCA repository itself was not available to us):
   temperatures given as log-scales, ``τ_v = e^{−4}`` (``image_scale: 4.0``) and ``τ_t = e^{−2}``
   (``text_scale: 2.0``) on every dataset, and both weighted sums renormalised before their product, so the score
   is a cosine (the class side's renormalisation changes the ranking; the image side's only the scale).
2. WCA's score sums over the crops only; the global view enters only through the crop weights (no ``(1 − θ)``
   global term as in LaZSL). A caller wanting the global view as a view concatenates it to the crops.
3. WCA's view settings (``N = 60`` random square crops per image, sides a uniform fraction of the short side)
   belong to the caller (the view sampler of the LaZSL callback), not to the scorer.
4. AWT's views include the global view ``x_0 = p_g`` (AWT keeps the original image among its augmented views) and
   its text views include the class-name prompt ``t_k0 = n_k`` (the analogue for text), so a class with no real
   descriptor is still scored (by its name); WCA needs at least one descriptor per class.
5. AWT's predictions use the mean logit over the class's text views (``t̄_k`` unnormalised) and the logit scale
   ``s = 100`` (CLIP's; pass the model's ``logit_scale.exp()`` for another model), as the official zero-shot
   evaluation does.
6. AWT's description weight, as in the official zero-shot evaluation: the entropy of the global view's class
   prediction when class ``k``'s mean logit is replaced by that one text view's (a description that sharpens the
   prediction gets more weight). So the text weights depend on the image, and each class's weights on every class
   scored: scores over a class subset are not a slice of the scores over all classes.
7. AWT's temperatures ``τ_v = τ_t = 0.5`` and ``ε = 0.1`` are the official zero-shot evaluation's. Its text views
   there are "a photo of a {class}." and that prompt followed by each description; ours are the name prompt and
   the descriptor sentences the callback encodes for LaZSL (one descriptor encoding for every scorer).
8. Sinkhorn stops per problem on the relative row-marginal error (``tol = 1e-5``, up to ``max_iter = 1000``), as
   LaZSL's default, so scores do not depend on the batch (the official code stops on ``mean |Δr| < 1e-2`` over
   at most 100 rounds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from xvlm.ot import float32_region, sinkhorn

__all__ = ["WCA_CROP_TEMPERATURE", "WCA_TEXT_TEMPERATURE", "awt_scores", "awt_weights", "wca_scores", "wca_weights"]

WCA_CROP_TEMPERATURE = math.exp(-4.0)
"""WCA's ``τ_v``: its authors' code multiplies the crop–global cosines by ``exp(4.0)`` before the softmax."""
WCA_TEXT_TEMPERATURE = math.exp(-2.0)
"""WCA's ``τ_t``: its authors' code multiplies the description–name cosines by ``exp(2.0)`` before the softmax."""

_PLAN_ELEMENTS = 2**24
"""Most ``B × C × V × J`` plan entries one Sinkhorn call handles in :func:`awt_scores`; more classes are chunked."""


# --------------------------------------------------------------------------------------------- shared
def _checked(
    scorer: str,
    crop_feats: torch.Tensor,
    global_feats: torch.Tensor,
    desc_feats: torch.Tensor,
    desc_mask: torch.Tensor,
    name_feats: torch.Tensor,
    **positive: float,
) -> torch.Tensor:
    """Check the shapes and that every option in ``positive`` is > 0; returns ``desc_mask`` as bool on the device."""
    problems = []
    if crop_feats.ndim != 3 or global_feats.ndim != 2 or desc_feats.ndim != 3 or name_feats.ndim != 2:
        problems.append("crop_feats [B, N, D], global_feats [B, D], desc_feats [C, M, D] and name_feats [C, D] "
                        "have the wrong number of dimensions")
    else:
        b, n, d = crop_feats.shape
        c, m, _ = desc_feats.shape
        if global_feats.shape != (b, d):
            problems.append(f"global_feats {tuple(global_feats.shape)} != (B, D) = {(b, d)}")
        if desc_feats.shape[-1] != d or name_feats.shape != (c, d):
            problems.append(f"desc_feats {tuple(desc_feats.shape)} / name_feats {tuple(name_feats.shape)} do not "
                            f"match D = {d} and C = {c}")
        if tuple(desc_mask.shape) != (c, m):
            problems.append(f"desc_mask {tuple(desc_mask.shape)} != (C, M) = {(c, m)}")
        if n < 1:
            problems.append("no crops (N = 0)")
    problems += [f"{name}={value} (must be > 0)" for name, value in positive.items() if not value > 0]
    if problems:
        raise ValueError(f"{scorer}: " + "; ".join(problems))
    return desc_mask.to(desc_feats.device, torch.bool)


def _entropy(logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy ``−Σ_k π_k log π_k`` of ``π = softmax(logits)`` over the last dim (over ``keep`` only if given)."""
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    log_p = F.log_softmax(logits, dim=-1)
    if keep is not None:
        log_p = log_p.masked_fill(~keep, 0)  # π = 0 there: no 0 · (−∞)
    return -(log_p.exp() * log_p).sum(dim=-1)


def _binary_entropy(d: torch.Tensor) -> torch.Tensor:
    """``h₂(σ(d)) = −σ log σ − (1 − σ) log(1 − σ)`` with ``σ = sigmoid(d)``, finite for every finite ``d``."""
    return -(torch.sigmoid(d) * F.logsigmoid(d) + torch.sigmoid(-d) * F.logsigmoid(-d))


def _leave_one_out(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every class ``k`` of ``z [B, C]`` (``C ≥ 2``): ``R_k = log Σ_{l≠k} e^{z_l}`` and the entropy ``h_k`` of
    the softmax over the classes ``l ≠ k``, both ``[B, C]``.

    With ``p = softmax(z)`` and ``H`` its entropy, ``R_k = LSE(z) + log(1 − p_k)`` and
    ``h_k = (H + p_k log p_k) / (1 − p_k) + log(1 − p_k)``. Both are exact; they lose precision only where
    ``1 − p_k`` is small, which can only happen for the top class (``p_k ≤ 1/2`` elsewhere), so the top class of
    each row is computed directly from its masked logits.
    """
    log_p = F.log_softmax(z, dim=-1)
    top = F.one_hot(z.argmax(dim=-1), z.shape[-1]).bool()
    p_other = log_p.exp().masked_fill(top, 0)  # the top class's garbage stays finite (no 0 / 0 in the backward)
    log_rest = torch.log1p(-p_other)
    full_entropy = -(log_p.exp() * log_p).sum(dim=-1, keepdim=True)
    r_other = torch.logsumexp(z, dim=-1, keepdim=True) + log_rest
    h_other = (full_entropy + p_other * log_p.masked_fill(top, 0)) / (1 - p_other) + log_rest
    r_top = torch.logsumexp(z.masked_fill(top, float("-inf")), dim=-1, keepdim=True)
    h_top = _entropy(z, ~top).unsqueeze(-1)
    return torch.where(top, r_top, r_other), torch.where(top, h_top, h_other)


# --------------------------------------------------------------------------------------------- WCA
def wca_weights(
    crop_feats: torch.Tensor,
    global_feats: torch.Tensor,
    desc_feats: torch.Tensor,
    desc_mask: torch.Tensor,
    name_feats: torch.Tensor,
    *,
    crop_temperature: float = WCA_CROP_TEMPERATURE,
    text_temperature: float = WCA_TEXT_TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WCA's crop weights ``w_n = softmax_n(<p_n, p_g> / τ_v)`` and description weights
    ``v_kj = softmax_{j: m_kj}(<q_kj, n_k> / τ_t)`` (module docstring; arguments as :func:`wca_scores`).

    Returns:
        ``w [B, N]`` (rows sum to 1) and ``v [C, M]`` (rows sum to 1 over the real descriptors, 0 on padded ones),
        in float32 (float64 for float64 features).
    """
    return _wca_terms("wca_weights", crop_feats, global_feats, desc_feats, desc_mask, name_feats,
                      crop_temperature, text_temperature)[3:]


def _wca_terms(
    caller: str, crop_feats: torch.Tensor, global_feats: torch.Tensor, desc_feats: torch.Tensor,
    desc_mask: torch.Tensor, name_feats: torch.Tensor, crop_temperature: float, text_temperature: float,
) -> tuple[torch.Tensor, ...]:
    """Checked inputs of ``caller`` as unit-norm crops ``[B, N, D]`` and descriptors ``[C, M, D]`` in the working
    precision, the mask ``[C, M]``, and the weights ``w [B, N]``, ``v [C, M]`` of :func:`wca_weights`."""
    mask = _checked(caller, crop_feats, global_feats, desc_feats, desc_mask, name_feats,
                    crop_temperature=crop_temperature, text_temperature=text_temperature)
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{caller}: every class needs at least one descriptor (desc_mask row of all False)")
    with float32_region(crop_feats, global_feats, desc_feats, name_feats) as feats:
        crops, glob, desc, names = (F.normalize(t, dim=-1) for t in feats)
        crop_weights = torch.softmax(torch.einsum("bnd,bd->bn", crops, glob) / crop_temperature, dim=-1)
        name_sim = torch.einsum("cmd,cd->cm", desc, names) / text_temperature
        desc_weights = torch.softmax(name_sim.masked_fill(~mask, float("-inf")), dim=-1)
    return crops, desc, mask, crop_weights, desc_weights


def wca_scores(
    crop_feats: torch.Tensor,
    global_feats: torch.Tensor,
    desc_feats: torch.Tensor,
    desc_mask: torch.Tensor,
    name_feats: torch.Tensor,
    *,
    crop_temperature: float = WCA_CROP_TEMPERATURE,
    text_temperature: float = WCA_TEXT_TEMPERATURE,
) -> torch.Tensor:
    """WCA scores ``ψ_bk = cos(Σ_n w_bn p_bn, Σ_j v_kj q_kj)``.

    ``w_bn = softmax_n(<p_bn, p_bg> / τ_v)`` weighs the crops by their cosine to the global view and
    ``v_kj = softmax_{j: m_kj}(<q_kj, n_k> / τ_t)`` the descriptions by their cosine to the class-name prompt
    (:func:`wca_weights`); padded descriptors get weight 0. Memory is that of a ``[B, C]`` product.

    Args:
        crop_feats: ``[B, N, D]`` crop features ``P`` (normalised here).
        global_feats: ``[B, D]`` global-view features ``p_g`` (normalised here); used for the crop weights only.
        desc_feats: ``[C, M, D]`` descriptor features ``Q`` (normalised here; padded rows are ignored).
        desc_mask: ``[C, M]`` bool, real descriptors; every class needs at least one.
        name_feats: ``[C, D]`` class-name prompt features ``n`` ("a photo of a {class}."; normalised here).
        crop_temperature: ``τ_v > 0`` of the crop weights (default ``e^{−4}``, the authors' code).
        text_temperature: ``τ_t > 0`` of the description weights (default ``e^{−2}``, the authors' code).

    Returns:
        ``[B, C]`` scores, float32 (float64 for float64 features).

    Raises:
        ValueError: on mismatched shapes, a non-positive temperature or a class without descriptors.

    Example:
        >>> q = torch.eye(3)[:, None]  # one descriptor per class, class k along axis k
        >>> wca_scores(torch.eye(3)[None, 1:2], torch.ones(1, 3), q, torch.ones(3, 1, dtype=torch.bool),
        ...            torch.eye(3)).argmax(dim=1).tolist()
        [1]
    """
    crops, desc, mask, crop_weights, desc_weights = _wca_terms(
        "wca_scores", crop_feats, global_feats, desc_feats, desc_mask, name_feats, crop_temperature, text_temperature)
    with float32_region(crops, desc) as (crops, desc):  # autocast off for the products too
        pooled = torch.einsum("bn,bnd->bd", crop_weights, crops)
        # masked_fill, not a product: a padded row holding inf/NaN must not leak through a zero weight
        prototypes = torch.einsum("cm,cmd->cd", desc_weights, desc.masked_fill(~mask[..., None], 0))
        return F.normalize(pooled, dim=-1) @ F.normalize(prototypes, dim=-1).T


# --------------------------------------------------------------------------------------------- AWT
def _views(
    crops: torch.Tensor, glob: torch.Tensor, desc: torch.Tensor, mask: torch.Tensor, names: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image views ``X = [p_g; P]`` ``[B, V, D]``, text views ``t = [n; Q]`` ``[C, J, D]`` (padded rows zeroed)
    and their mask ``[C, J]``."""
    views = torch.cat([glob[:, None], crops], dim=1)
    text_mask = torch.cat([mask.new_ones(len(mask), 1), mask], dim=1)
    texts = torch.cat([names[:, None], desc], dim=1).masked_fill(~text_mask[..., None], 0)
    return views, texts, text_mask


def _awt_weights(
    views: torch.Tensor, texts: torch.Tensor, text_mask: torch.Tensor, logit_scale: float,
    view_temperature: float, text_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWT's view weights ``a [B, V]`` and text weights ``b [B, C, J]`` from unit-norm views and text views."""
    # zeroed padded rows: the sum runs over the real ones; the mean prototype's logit is the mean logit
    prototypes = texts.sum(dim=1) / text_mask.sum(dim=1, keepdim=True)
    view_entropy = _entropy(logit_scale * torch.einsum("bvd,cd->bvc", views, prototypes))
    view_weights = torch.softmax(-view_entropy / view_temperature, dim=-1)
    z = logit_scale * views[:, 0] @ prototypes.T  # [B, C], the global view
    z_text = logit_scale * torch.einsum("bd,cjd->bcj", views[:, 0], texts)  # [B, C, J]
    if z.shape[-1] == 1:  # a single class: every prediction is certain
        text_entropy = torch.zeros_like(z_text)
    else:
        shift = z.detach().amax(dim=-1, keepdim=True)  # entropies are shift-invariant; keeps the logits near 0
        rest_lse, rest_entropy = _leave_one_out(z - shift)
        d = z_text - shift[..., None] - rest_lse[..., None]
        text_entropy = _binary_entropy(d) + torch.sigmoid(-d) * rest_entropy[..., None]
    logits = (-text_entropy / text_temperature).masked_fill(~text_mask, float("-inf"))
    return view_weights, torch.softmax(logits, dim=-1)


def awt_weights(
    crop_feats: torch.Tensor,
    global_feats: torch.Tensor,
    desc_feats: torch.Tensor,
    desc_mask: torch.Tensor,
    name_feats: torch.Tensor,
    *,
    logit_scale: float = 100.0,
    view_temperature: float = 0.5,
    text_temperature: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWT's entropy weights (module docstring; arguments as :func:`awt_scores`).

    Returns:
        ``a [B, 1 + N]``, the weights of the views (index 0 the global view), and ``b [B, C, 1 + M]``, those of
        each class's text views (index 0 the name prompt, then the descriptors; 0 on padded ones). Every row sums
        to 1. Float32 (float64 for float64 features).
    """
    mask = _checked("awt_weights", crop_feats, global_feats, desc_feats, desc_mask, name_feats,
                    logit_scale=logit_scale, view_temperature=view_temperature, text_temperature=text_temperature)
    with float32_region(crop_feats, global_feats, desc_feats, name_feats) as feats:
        crops, glob, desc, names = (F.normalize(t, dim=-1) for t in feats)
        views, texts, text_mask = _views(crops, glob, desc, mask, names)
        return _awt_weights(views, texts, text_mask, logit_scale, view_temperature, text_temperature)


def awt_scores(
    crop_feats: torch.Tensor,
    global_feats: torch.Tensor,
    desc_feats: torch.Tensor,
    desc_mask: torch.Tensor,
    name_feats: torch.Tensor,
    *,
    eps: float = 0.1,
    logit_scale: float = 100.0,
    view_temperature: float = 0.5,
    text_temperature: float = 0.5,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> torch.Tensor:
    """AWT scores ``ψ_bk = <T_bk, S_bk>``, ``S_bk = X_b t_kᵀ``, ``T_bk = Sinkhorn(1 − S_bk; a_b, b_bk, ε)``.

    Views ``X_b = [p_bg; P_b]`` ``[V = 1 + N, D]`` with the entropy weights ``a_b`` as source marginal; text views
    ``t_k = [n_k; Q_k]`` ``[J = 1 + M, D]`` with the entropy weights ``b_bk`` (zero on padded descriptors) as target
    marginal (:func:`awt_weights`, formulas in the module docstring). One :func:`xvlm.ot.sinkhorn` over the
    ``B × C`` problems, in chunks of classes of at most ``_PLAN_ELEMENTS`` plan entries.

    Args:
        crop_feats: ``[B, N, D]`` crop features ``P`` (normalised here).
        global_feats: ``[B, D]`` global-view features ``p_g`` (normalised here); view 0.
        desc_feats: ``[C, M, D]`` descriptor features ``Q`` (normalised here; padded rows are ignored).
        desc_mask: ``[C, M]`` bool, real descriptors (a class without any is scored by its name prompt alone).
        name_feats: ``[C, D]`` class-name prompt features ``n`` ("a photo of a {class}."; normalised here); text
            view 0 of each class.
        eps: entropic regulariser ``ε > 0`` of the transport.
        logit_scale: ``s > 0`` of the class predictions whose entropies give the weights (CLIP's 100).
        view_temperature: ``τ_v > 0`` of the view weights ``softmax(−H / τ_v)``.
        text_temperature: ``τ_t > 0`` of the text weights.
        max_iter: most Sinkhorn column updates per problem.
        tol: a problem stops once its relative row-marginal error is below ``tol``.

    Returns:
        ``[B, C]`` scores (``1 −`` the OT cost), float32 (float64 for float64 features).

    Raises:
        ValueError: on mismatched shapes or a non-positive ``eps``, ``logit_scale`` or temperature.
    """
    mask = _checked("awt_scores", crop_feats, global_feats, desc_feats, desc_mask, name_feats, eps=eps,
                    logit_scale=logit_scale, view_temperature=view_temperature, text_temperature=text_temperature)
    with float32_region(crop_feats, global_feats, desc_feats, name_feats) as feats:
        crops, glob, desc, names = (F.normalize(t, dim=-1) for t in feats)
        views, texts, text_mask = _views(crops, glob, desc, mask, names)
        view_weights, text_weights = _awt_weights(views, texts, text_mask, logit_scale, view_temperature,
                                                  text_temperature)
        b, v, _ = views.shape
        c, j, _ = texts.shape
        chunk = max(1, _PLAN_ELEMENTS // max(1, b * v * j))
        scores = []
        for start in range(0, c, chunk):
            part = slice(start, start + chunk)
            sim = torch.einsum("bvd,cjd->bcvj", views, texts[part])
            plan = sinkhorn(1 - sim, view_weights[:, None], text_weights[:, part], eps=eps, max_iter=max_iter,
                            tol=tol, b_mask=text_mask[None, part])
            scores.append((plan * sim).sum(dim=(-2, -1)))
        return torch.cat(scores, dim=1)
