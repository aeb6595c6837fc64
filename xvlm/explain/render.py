"""One figure per sample from the dict a module's ``explain(batch)`` returns (contract 4 of DESIGN.md).

**Key conventions.** In the output of ``explain(batch)`` every value is batch-first: a tensor whose first dim is
``B`` or a list of length ``B`` (shared names are repeated per sample). :func:`sample_explanation` takes sample
``i``; the shapes below are per sample, after that slicing. Keys the renderer does not know are ignored, so a
method may return more (OT plans, boxes) than is drawn. Callers run ``explain`` through
:func:`xvlm.explain.gallery.explain_batch`: eval mode, ``torch.no_grad()``, outside inference mode (a method that
needs gradients, like Grad-CAM, enables them inside with ``torch.enable_grad()``).

============================================  ===============================================================
key (per sample)                              drawn as
============================================  ===============================================================
``original_image`` ``[3, H, W]`` uint8        the image shown (under every map) instead of the normalised
                                              batch image: the sample as decoded, at its own size (LaZSL
                                              explanations of a datamodule's originals)
``predicted`` ``[]`` long                     the predicted class, named in the title of the image panel
``logits`` ``[C]``                            adds the predicted class's softmax probability to that title
``saliency`` ``[H, W]`` in [0, 1]             a heat map overlaid on the image
``<group>_maps`` ``[K, h, w]``                the group's top-``top_k`` maps (by score, else the first ones),
                                              one overlay panel each, titled "name (score)"
``<group>_names`` ``list[str]`` of ``K``      names of the group's entries (``descriptor_names``)
``<group>_contributions`` or                  evidence per entry (the first suffix present wins); with
``<group>_scores`` ``[K]``                    ``<group>_names``, a horizontal bar chart of the top
                                              ``top_bars`` entries (``rationale_scores [R]``)
============================================  ===============================================================

Maps of any resolution ``[h, w]`` are stretched over the image; the maps of one group share one colour scale
``[0, max]`` so that their strengths compare. For example LaZSL returns ``descriptor_maps [B, K, H, W]``,
``descriptor_names`` (``B`` lists of ``K`` descriptors of the predicted class) and
``descriptor_contributions [B, K]``: the top descriptors are drawn as maps and all of them ranked as bars.

Figures are built without pyplot (no display backend, no global figure registry), so rendering works headless
and inside training loops without leaking figures. Every panel is ``PANEL_INCHES`` square at ``DPI``, laid out
in rows of at most ``MAX_COLUMNS`` panels: the image, the saliency, the maps, then the bar charts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from xvlm.backbones import CLIP_MEAN, CLIP_STD

MAP_SUFFIX = "_maps"
NAME_SUFFIX = "_names"
SCORE_SUFFIXES = ("_contributions", "_scores")
PANEL_INCHES = 3.0
DPI = 100
MAX_COLUMNS = 4
OVERLAY_ALPHA = 0.5
COLORMAP = "jet"


def denormalise(image: torch.Tensor) -> np.ndarray:
    """Undo CLIP normalisation.

    Args:
        image: ``[3, H, W]`` CLIP-normalised image, on any device.

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std + mean).clamp(0.0, 1.0)
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def per_sample_entries(values: dict[str, Any]) -> dict[str, Any]:
    """The batch-first entries of ``values`` (tensors with a batch axis, lists, tuples); batch-level values (a 0-dim
    tensor such as a batch's ``skipped_images`` count, a number, ``None``) are dropped."""
    return {key: value for key, value in values.items()
            if (isinstance(value, torch.Tensor) and value.ndim > 0) or isinstance(value, (list, tuple))}


def sample_explanation(explanation: dict[str, Any], index: int) -> dict[str, Any]:
    """Sample ``index`` of a batch-first explanation (``saliency [B, H, W]`` -> ``[H, W]``); other values dropped."""
    return {key: value[index] for key, value in per_sample_entries(explanation).items()}


def _scores(explanation: dict[str, Any], group: str) -> torch.Tensor | None:
    """``[K]`` evidence of a group's entries, from the first score suffix present."""
    for suffix in SCORE_SUFFIXES:
        if group + suffix in explanation:
            return torch.as_tensor(explanation[group + suffix]).detach().cpu().float()
    return None


def _groups(explanation: dict[str, Any], suffixes: Sequence[str]) -> list[str]:
    """Group names of the keys ending in one of ``suffixes``, in key order, without repeats."""
    found = [key[: -len(s)] for key in explanation for s in suffixes if key.endswith(s) and len(key) > len(s)]
    return list(dict.fromkeys(found))


def _ranked(count: int, scores: torch.Tensor | None, limit: int, names: Sequence[str] | None) -> list[int]:
    """Indices of the ``limit`` entries with the highest scores (the first ones without scores); entries named
    ``""`` are padding and never shown."""
    order = range(count) if scores is None else scores.argsort(descending=True, stable=True).tolist()
    return [k for k in order if names is None or str(names[k])][:limit]


def top_ranked(explanation: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """The best entry of every ranked group of one sample's explanation: ``{group: (name, score)}`` for each
    ``<group>_names`` with ``<group>_contributions`` or ``<group>_scores`` (the first suffix present), the entry of
    the highest score; padding entries named ``""`` are skipped, as in the bar charts."""
    best = {}
    for group in _groups(explanation, SCORE_SUFFIXES):
        names, scores = explanation.get(group + NAME_SUFFIX), _scores(explanation, group)
        if names is None or scores is None or scores.ndim != 1:
            continue
        top = _ranked(len(scores), scores, 1, names)
        if top:
            best[group] = (str(names[top[0]]), float(scores[top[0]]))
    return best


def _entry_name(names: Sequence[str] | None, index: int) -> str:
    return str(names[index]) if names is not None else f"#{index}"


def _overlay(ax: Axes, rgb: np.ndarray, heat: torch.Tensor, vmax: float, title: str) -> None:
    """The image with ``heat [h, w]`` stretched over it in ``[0, vmax]``."""
    height, width = rgb.shape[:2]
    ax.imshow(rgb)
    ax.set_axis_off()
    ax.imshow(heat.detach().cpu().float().numpy(), cmap=COLORMAP, alpha=OVERLAY_ALPHA, vmin=0.0,
              vmax=max(vmax, 1e-12), extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear")
    ax.set_title(title, fontsize=8)


def _bars(ax: Axes, names: Sequence[str], scores: torch.Tensor, order: list[int], title: str) -> None:
    """Horizontal bars of ``scores[order]``, the first at the top, each labelled "name  score" inside the axes."""
    positions = list(range(len(order)))[::-1]
    ax.barh(positions, [float(scores[k]) for k in order], color="tab:orange", alpha=0.6)
    for y, k in zip(positions, order):
        ax.text(0.0, y, f" {names[k]}  {float(scores[k]):.2f}", va="center", ha="left", fontsize=7, clip_on=True)
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
    ax.set_title(f"{title} ranking", fontsize=8)


def _image_title(explanation: dict[str, Any], class_names: Sequence[str], label: int | None) -> str:
    """``"pred: <class> (p)"`` and, when ``label`` is given, ``"true: <class>"`` on a second line."""
    lines = []
    if "predicted" in explanation:
        predicted = int(explanation["predicted"])
        line = f"pred: {class_names[predicted]}"
        if "logits" in explanation:
            probability = torch.as_tensor(explanation["logits"]).float().softmax(dim=-1)[predicted]
            line += f" ({float(probability):.2f})"
        lines.append(line)
    if label is not None:
        lines.append(f"true: {class_names[label]}")
    return "\n".join(lines)


def render_explanation(
    image: torch.Tensor,
    explanation: dict[str, Any],
    class_names: Sequence[str],
    *,
    label: int | None = None,
    title: str | None = None,
    top_k: int = 4,
    top_bars: int = 10,
) -> Figure:
    """Draw one sample's explanation (keys in the module docstring).

    Args:
        image: ``[3, H, W]`` CLIP-normalised image (not shown when the explanation has an ``original_image``).
        explanation: one sample's explanation, e.g. ``sample_explanation(module.explain(batch), i)``.
        class_names: name of every class, indexed by ``predicted`` and ``label``.
        label: true class, named under the prediction when given.
        title: figure title, e.g. the sample's name.
        top_k: maps drawn per ``<group>_maps``.
        top_bars: entries drawn per bar chart.

    Returns:
        A pyplot-free figure of ``ceil(P / MAX_COLUMNS)`` rows of ``min(P, MAX_COLUMNS)`` panels of
        ``PANEL_INCHES`` square, ``P`` being the number of panels.
    """
    original = explanation.get("original_image")
    rgb = denormalise(image) if original is None else original.detach().cpu().permute(1, 2, 0).numpy()
    panels: list[Callable[[Axes], None]] = []
    if "saliency" in explanation:
        panels.append(partial(_overlay, rgb=rgb, heat=explanation["saliency"], vmax=1.0, title="saliency"))
    for group in _groups(explanation, (MAP_SUFFIX,)):
        maps = explanation[group + MAP_SUFFIX]
        names = explanation.get(group + NAME_SUFFIX)
        scores = _scores(explanation, group)
        for k in _ranked(len(maps), scores, top_k, names):
            score = "" if scores is None else f" ({float(scores[k]):.2f})"
            panels.append(partial(_overlay, rgb=rgb, heat=maps[k], vmax=float(maps.max()),
                                  title=f"{group}: {_entry_name(names, k)}{score}"))
    for group in _groups(explanation, SCORE_SUFFIXES):
        names = explanation.get(group + NAME_SUFFIX)
        scores = _scores(explanation, group)
        if names is not None:
            panels.append(partial(_bars, names=names, scores=scores, order=_ranked(len(scores), scores, top_bars, names),
                                  title=group))

    count = 1 + len(panels)
    columns = min(count, MAX_COLUMNS)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    axes[0].imshow(rgb)
    axes[0].set_axis_off()
    axes[0].set_title(_image_title(explanation, class_names, label), fontsize=8)
    for ax, draw in zip(axes[1:], panels):
        draw(ax)
    for ax in axes[count:]:
        ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at its own DPI (creating the folder) and return the path.

    The figure is not registered with pyplot, so nothing stays open: it is freed once no longer referenced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=figure.dpi)
    return path
