"""Explainers x methods on Shapes: placement (object mask) and faithfulness (insertion/deletion) of each map.

Every explainer on every method, on Shapes ``attributes``: where the map of the predicted class lies and how
faithful it is, against baseline maps and LaZSL's region maps.

``python -m benchmarks.explanations`` (from the repository root; ``--help`` for the options, ``--quick`` for the
1-seed, 32-image version ``make bench`` runs) does, for each method of :data:`xvlm.methods.__all__` that has a
``configs/<method>/shapes.yaml`` and for each seed:

1. fine-tune the method from its Shapes config exactly as ``benchmarks/compare_lico.py`` does (its
   :func:`~benchmarks.compare_lico.fit`), plus once the backbone as loaded (CLIPFineTune, 0 epochs);
2. on the first ``--images`` validation images (with their exact object masks), explain the class the module
   predicts (``module.classify``) with every explainer of :mod:`xvlm.explain.explainers` that supports the module
   (those that do not, e.g. attention rollout on a CNN tower, are skipped and listed) and with three
   baseline maps: uniform, a centred Gaussian (``σ`` = 1/4 of the side) and a seeded random map;
3. score every map (:mod:`xvlm.metrics.saliency`): pointing game, mass in mask, IoU of the top-``k`` pixels with
   the mask (``k`` = the mean mask area of these images), insertion and deletion AUCs through ``module.classify``,
   and time each explainer per image (best of ``--repeats`` in-turn timings, ``benchmarks/timing.py``);
4. score LaZSL's region map, the heat map of the top descriptor of LaZSL's predicted class
   (:func:`xvlm.zeroshot.regions.explain_lazsl`) through the module's zero-shot towers, drawn over the scoring
   crops alone and over several region crops (:class:`~xvlm.zeroshot.regions.RegionCrops`); the best of them on
   mass in mask is marked "best on validation" (no test split is used anywhere).

It prints the tables and writes them to ``--out`` (Markdown: command, date, tables of mean ± std over seeds) with a
gallery PNG beside it (same name, ``.png``): for each fine-tuned method, 4 validation images with their mask
outline and every explainer's map.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import xvlm.methods  # noqa: E402
from benchmarks.compare_lico import FORMER_DEFAULTS, fit  # noqa: E402
from benchmarks.mass_in_mask import check_backbone  # noqa: E402
from benchmarks.timing import best_seconds_in_turn  # noqa: E402
from xvlm.explain import denormalise, save_figure  # noqa: E402
from xvlm.explain.explainers import attribution_maps, check_explainer, explainer_names  # noqa: E402
from xvlm.explain.gallery import first_samples  # noqa: E402
from xvlm.metrics.saliency import (  # noqa: E402
    auc,
    centred_gaussian_map,
    insertion_deletion,
    localisation_scores,
    uniform_mass_in_mask,
)
from xvlm.zeroshot import LaZSLSettings  # noqa: E402
from xvlm.zeroshot.regions import RegionCrops, explain_lazsl, top_descriptor_maps  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKBONE_METHOD = "CLIPFineTune"
BACKBONE_ROW = "backbone (CLIPFineTune, not fine-tuned)"
BASELINES = ("uniform", "centred Gaussian", "random")
MAP_COLUMNS = {"pointing": "pointing ↑", "mass_in_mask": "mass ↑", "topk_iou": "IoU@k ↑", "insertion": "ins ↑",
               "deletion": "del ↓", "ms_per_image": "ms/image"}
LAZSL_COLUMNS = {key: MAP_COLUMNS[key] for key in ("pointing", "mass_in_mask", "topk_iou", "ms_per_image")}
GALLERY_IMAGES = 4
PANEL_INCHES = 1.4
TARGET_POINTING, TARGET_MASS_RATIO, TARGET_LAZSL_RATIO = 0.9, 4.0, 2.0
"""The targets a default must reach on Shapes: pointing, mass in mask over the uniform share, and the same ratio
for LaZSL's top-descriptor map."""

#: ``(module, images [B, 3, H, W], target [B]) -> maps [B, H, W]``.
MapFunction = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
#: Per row, a list (one entry per seed) of metric name -> mean over the images.
Results = dict[tuple[str, str], list[dict[str, float]]]


@dataclass
class Options:
    """What one benchmark run measures (the parsed command line, with ``--quick`` applied)."""

    methods: list[str]
    explainers: list[str]
    seeds: list[int]
    epochs: int | None
    images: int
    steps: int
    backbone: str
    repeats: int
    time_images: int
    chunk: int
    out: Path


# --------------------------------------------------------------------------------------------- methods
def method_configs() -> dict[str, dict]:
    """Shapes config of every method of ``xvlm.methods.__all__`` (but the base class) that has one, by class name."""
    found = {}
    for path in sorted(CONFIGS.glob("*/shapes.yaml")):
        config = yaml.safe_load(path.read_text())
        name = config.get("model", {}).get("class_path", "").rsplit(".", 1)[-1]
        if name in xvlm.methods.__all__ and name != "XVLMModule":
            found[name] = config
    return found


def builder(name: str, config: dict, backbone: str) -> Callable[[], Any]:
    """Constructor of method ``name`` with the init arguments of its config and the open_clip ``backbone``."""
    return partial(getattr(xvlm.methods, name), **{**config["model"]["init_args"], "model": backbone})


def train(name: str, config: dict, options: Options, seed: int, epochs: int | None) -> tuple[Any, Any]:
    """``(module in eval mode, set-up datamodule)`` of ``name`` fine-tuned for ``epochs`` (default: its config's)."""
    epochs = config["trainer"]["max_epochs"] if epochs is None else epochs
    _, module, data = fit(builder(name, config, options.backbone), config["data"]["init_args"], seed, epochs)
    return module.eval(), data


# --------------------------------------------------------------------------------------------- maps
def baseline_maps(seed: int) -> dict[str, MapFunction]:
    """The reference maps: uniform, centred Gaussian (``σ`` = side / 4) and uniform noise from a generator seeded
    by ``seed`` (successive calls continue its stream)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(module: Any, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return images.new_ones(len(images), *images.shape[-2:])

    def gaussian(module: Any, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return centred_gaussian_map(*images.shape[-2:], sigma=0.25).expand(len(images), -1, -1)

    def noise(module: Any, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(images), *images.shape[-2:], generator=generator)

    return dict(zip(BASELINES, (uniform, gaussian, noise)))


def explainer_maps(names: list[str]) -> dict[str, MapFunction]:
    """``attribution_maps`` of each named explainer."""
    return {name: partial(attribution_maps, explainer=name) for name in names}


def chunked(function: MapFunction, module: Any, images: torch.Tensor, target: torch.Tensor,
            chunk: int) -> torch.Tensor:
    """``function`` on ``chunk`` images at a time, joined: ``[B, H, W]`` on the CPU."""
    parts = [function(module, x, t).detach().float().cpu() for x, t in zip(images.split(chunk), target.split(chunk))]
    return torch.cat(parts)


def predicted_classes(module: Any, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[B]`` argmax of ``module.classify``, the class every map explains."""
    with torch.no_grad():
        return torch.cat([module.classify(x).argmax(dim=1) for x in images.split(chunk)])


def gallery_rows(count: int) -> torch.Tensor:
    """Indices of the :data:`GALLERY_IMAGES` images the gallery shows, evenly spaced over ``count`` (the validation
    classes cycle, so neighbours share colour and pattern)."""
    return torch.linspace(0, count - 1, min(GALLERY_IMAGES, count)).round().long()


# --------------------------------------------------------------------------------------------- scores
def score_maps(module: Any, batch: dict, target: torch.Tensor, maps: torch.Tensor, fraction: float,
               options: Options) -> dict[str, float]:
    """Means over the images of pointing, mass in mask (NaN maps left out), top-k IoU, insertion and deletion AUC."""
    per_image = localisation_scores(maps, batch["mask"], fraction)
    insertion, deletion = insertion_deletion(module.classify, batch["image"], maps, target, steps=options.steps,
                                             chunk=options.chunk)
    per_image.update(insertion=auc(insertion), deletion=auc(deletion))
    return {key: float(values.nanmean()) for key, values in per_image.items()}


def milliseconds_per_image(module: Any, functions: dict[str, MapFunction], batch: dict, target: torch.Tensor,
                           options: Options) -> dict[str, float]:
    """Best-of-``repeats`` in-turn time of each map function on the first ``time_images`` images, per image."""
    images, target = batch["image"][: options.time_images], target[: options.time_images]
    passes = {name: partial(function, module, images, target) for name, function in functions.items()}
    seconds = best_seconds_in_turn(passes, steps=1, repeats=options.repeats)
    return {name: 1000 * value / len(images) for name, value in seconds.items()}


def evaluate_maps(module: Any, batch: dict, functions: dict[str, MapFunction], fraction: float, options: Options,
                  skipped: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Scores and timings of every map function that supports ``module``; the explainers that do not
    (:func:`~xvlm.explain.explainers.check_explainer` raises ``ValueError``) are named in ``skipped``.

    Returns:
        Per map name its scores, and its maps of the gallery's images (:func:`gallery_rows`) ``[4, H, W]``.
    """
    target = predicted_classes(module, batch["image"], options.chunk)
    scores, maps, supported = {}, {}, {}
    for name, function in functions.items():
        if name in options.explainers:
            try:
                check_explainer(name, module)
            except ValueError as error:
                skipped.append(f"{name} on {type(module).__name__}: {error}")
                continue
        supported[name] = function
        all_maps = chunked(function, module, batch["image"], target, options.chunk)
        scores[name] = score_maps(module, batch, target, all_maps, fraction, options)
        maps[name] = all_maps[gallery_rows(len(all_maps))]
    for name, value in milliseconds_per_image(module, supported, batch, target, options).items():
        scores[name]["ms_per_image"] = value
    return scores, maps


def region_crop_grid() -> dict[str, RegionCrops | None]:
    """The heat maps' crops: the scoring crops themselves (one pass), the shipped region crops, and neighbours with
    fewer / more, smaller / larger crops."""
    def label(crops: RegionCrops) -> str:
        return f"{crops.n_crops} crops of side {crops.alpha}–{crops.beta}"

    shipped = RegionCrops()
    grid: dict[str, RegionCrops | None] = {
        f"scoring crops alone ({LaZSLSettings.n_crops} of side {LaZSLSettings.alpha}–{LaZSLSettings.beta})": None,
        f"{label(shipped)} (shipped)": shipped,
    }
    for crops in (RegionCrops(48, 0.1, 0.25), RegionCrops(32, 0.1, 0.25), RegionCrops(64, 0.1, 0.3),
                  RegionCrops(32, 0.2, 0.5)):
        grid[label(crops)] = crops
    return grid


def evaluate_lazsl(module: Any, batch: dict, task: Any, fraction: float) -> dict[str, dict[str, float]]:
    """Per region-crop setting: mask scores of the top-descriptor map of LaZSL's predicted class (scored with the
    default settings through the module's zero-shot towers; none without them) and the milliseconds per image of
    that one explanation call."""
    encoder = module.zero_shot_encoder()
    if encoder is None:
        return {}
    scores = {}
    for label, crops in region_crop_grid().items():
        start = time.perf_counter()
        with torch.no_grad():
            explanation = explain_lazsl(encoder, batch["image"], batch["index"], task, region_crops=crops)
        seconds = time.perf_counter() - start
        per_image = localisation_scores(top_descriptor_maps(explanation), batch["mask"], fraction)
        scores[label] = {key: float(values.nanmean()) for key, values in per_image.items()}
        scores[label]["ms_per_image"] = 1000 * seconds / len(batch["image"])
    return scores


# --------------------------------------------------------------------------------------------- one model
@dataclass
class Collected:
    """Everything measured so far: per-seed scores of each (model, map) and LaZSL row, the gallery's maps."""

    maps: Results
    lazsl: Results
    gallery: dict[str, dict[str, torch.Tensor]]
    skipped: list[str]
    defaults: dict[str, str]


def measure_model(label: str, module: Any, data: Any, seed: int, options: Options, collected: Collected,
                  gallery: bool) -> dict:
    """Score one trained module's explainers, baselines and LaZSL maps into ``collected`` (and its default explainer,
    ``module.explainer_name``); return the batch."""
    collected.defaults[label] = module.explainer_name
    batch = first_samples(data.val_dataloader(), options.images)
    fraction = float(uniform_mass_in_mask(batch["mask"]).mean())
    functions = {**explainer_maps(options.explainers), **baseline_maps(seed)}
    scores, maps = evaluate_maps(module, batch, functions, fraction, options, collected.skipped)
    for name, row in scores.items():
        collected.maps.setdefault((label, name), []).append(row)
    for name, row in evaluate_lazsl(module, batch, data.task, fraction).items():
        collected.lazsl.setdefault((label, name), []).append(row)
    if gallery:
        collected.gallery[label] = {name: maps[name] for name in options.explainers if name in maps}
    return batch


# --------------------------------------------------------------------------------------------- output
def cell(values: list[float], digits: int) -> str:
    """``mean ± std`` over seeds (a single value alone; "–" for none)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: Results, columns: dict[str, str], first: str, second: str) -> list[str]:
    """Markdown rows of ``results``: one row per key, one cell per column (milliseconds to 0.1, others to 0.001)."""
    lines = [f"| {first} | {second} | " + " | ".join(columns.values()) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for (row, name), rows in results.items():
        cells = [cell([r[key] for r in rows if key in r], 1 if key == "ms_per_image" else 3) for key in columns]
        lines.append(f"| {row} | {name} | " + " | ".join(cells) + " |")
    return lines


def chosen_lazsl(lazsl: Results) -> dict[str, str]:
    """Per model, the LaZSL setting with the highest mean mass in mask over seeds (chosen on validation)."""
    best: dict[str, tuple[float, str]] = {}
    for (model, name), rows in lazsl.items():
        mass = sum(r["mass_in_mask"] for r in rows) / len(rows)
        if model not in best or mass > best[model][0]:
            best[model] = (mass, name)
    return {model: name for model, (_, name) in best.items()}


def marked_lazsl(lazsl: Results) -> Results:
    """``lazsl`` with each model's chosen setting suffixed "← best on validation"."""
    chosen = chosen_lazsl(lazsl)
    return {(model, name + (" ← best on validation" if chosen[model] == name else "")): rows
            for (model, name), rows in lazsl.items()}


def defaults_table(collected: Collected, area: float) -> list[str]:
    """Markdown rows: per model, its default explainer and its former default (:data:`FORMER_DEFAULTS`) against the
    targets, then the shipped LaZSL region crops against theirs (``area``: the uniform share)."""
    shipped = next(name for name in region_crop_grid() if name.endswith("(shipped)"))

    def row(model: str, label: str, key: tuple[str, str], pointing: bool) -> str:
        rows = collected.maps.get(key) if pointing else collected.lazsl.get(key)
        if not rows:
            return f"| {model} | {label} | – | – | – | – |"
        hits = statistics.mean(r["pointing"] for r in rows)
        ratio = statistics.mean(r["mass_in_mask"] for r in rows) / area
        met = (hits >= TARGET_POINTING and ratio >= TARGET_MASS_RATIO) if pointing else ratio >= TARGET_LAZSL_RATIO
        return (f"| {model} | {label} | {cell([r['pointing'] for r in rows], 3)} | "
                f"{cell([r['mass_in_mask'] for r in rows], 3)} | {ratio:.1f}× | {'yes' if met else 'no'} |")

    lines = ["| model | map | pointing ↑ | mass ↑ | mass / uniform | target met |", "|---|---|---:|---:|---:|---|"]
    for model, default in collected.defaults.items():
        method = BACKBONE_METHOD if model == BACKBONE_ROW else model
        lines.append(row(model, f"default: {default}", (model, default), True))
        if method in FORMER_DEFAULTS:
            former = FORMER_DEFAULTS[method]
            lines.append(row(model, f"former default: {former}", (model, former), True))
        lines.append(row(model, f"LaZSL, {shipped}", (model, shipped), False))
    return lines


def report(collected: Collected, options: Options, area: float, gallery: Path, seconds: float) -> str:
    """The Markdown page: command, date, setup, both tables (``area``: the mean mask area), the gallery and the
    skipped explainers."""
    seeds = ", ".join(map(str, options.seeds))
    lines = [
        "# Explainers on Shapes: placement and faithfulness of every method's maps",
        "",
        "```",
        f"python -m benchmarks.explanations {' '.join(sys.argv[1:])}".rstrip(),
        "```",
        "",
        f"Run {datetime.datetime.now():%Y-%m-%d %H:%M} in {seconds / 60:.0f} min; backbone `{options.backbone}` "
        f"(`pretrained: shapes`); seeds {seeds}; {options.images} Shapes `attributes` validation images (64 px) "
        f"with exact object masks; {options.steps} insertion/deletion steps.",
        "",
        "Each method is fine-tuned from its `configs/<method>/shapes.yaml` as in `benchmarks/compare_lico.py` "
        "(epochs, data and optimiser of the config); every map explains the class the module predicts "
        "(`module.classify`), and insertion/deletion use the same `classify`. Columns: **pointing** = share of "
        "images whose map maximum lies in the mask; **mass** = share of the map inside the mask; **IoU@k** = IoU "
        f"of the map's top-k pixels with the mask, k = the mean mask area ({area:.3f} of the image); **ins**/"
        "**del** = insertion/deletion AUC (`xvlm.metrics.saliency`); **ms/image** = best of "
        f"{options.repeats} in-turn timings on {options.time_images} images (`benchmarks/timing.py`). "
        f"Mean ± std over seeds; the not-fine-tuned backbone is measured once.",
        "",
        f"For reference, the uniform share of the mask (the mass of a uniform map) is **{area:.3f}**. The uniform "
        "map points at the first pixel (raster order), and its top-k pixels are the first rows.",
        "",
        "## Each method's default against the targets",
        "",
        f"Targets: the default explainer points at the object in ≥ {TARGET_POINTING:.0%} of images and puts ≥ "
        f"{TARGET_MASS_RATIO:.0f}× the uniform share of its mass on it; LaZSL's top-descriptor map ≥ "
        f"{TARGET_LAZSL_RATIO:.0f}× the uniform share. The former defaults are what `explain()` drew before the "
        "explainers became configurable. Rows from the tables below.",
        "",
        *defaults_table(collected, area),
        "",
        "## Explainers and baseline maps",
        "",
        *table(collected.maps, MAP_COLUMNS, "model", "map"),
        "",
        "## LaZSL region maps (top descriptor of the predicted class)",
        "",
        "Scored with the default `LaZSLSettings` through each module's zero-shot towers, the maps drawn over the "
        "crops of each row (`xvlm.zeroshot.regions.RegionCrops`; the first row draws them over the scoring crops, "
        "as before region crops existed). The setting with the highest mass in mask per model is marked (these are "
        "the validation images above; no test split is used). ms/image is one timed explanation call (both "
        "passes) over all images.",
        "",
        *table(marked_lazsl(collected.lazsl), LAZSL_COLUMNS, "model", "crops"),
        "",
        "## Gallery",
        "",
        f"{GALLERY_IMAGES} validation images evenly spaced among the {options.images} (cyan: mask outline) and each "
        f"explainer's map of the predicted class (black 0 to yellow 1), for every fine-tuned method "
        f"(seed {options.seeds[0]}).",
        "",
        f"![explainer gallery]({gallery.name})",
    ]
    if collected.skipped:
        lines += ["", "Skipped (the explainer does not support the module):", ""]
        lines += [f"- {line}" for line in dict.fromkeys(collected.skipped)]
    return "\n".join(lines) + "\n"


def _panel(ax: Axes, picture: Any, mask: torch.Tensor, title: str) -> None:
    """An image ``[H, W, 3]`` or a map ``[H, W]`` in ``[0, 1]`` (colour map ``inferno``) with the mask's outline."""
    ax.imshow(picture, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.contour(mask.float().numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_axis_off()
    ax.set_title(title, fontsize=6)


def draw_gallery(batch: dict, gallery: dict[str, dict[str, torch.Tensor]], class_names: list[str],
                 path: Path) -> Path:
    """PNG at ``path``: per model, one row per gallery image (:func:`gallery_rows`): the image, then each
    explainer's map (max 1), all with the mask outline; an explainer a model does not support leaves a blank."""
    names = list(dict.fromkeys(name for maps in gallery.values() for name in maps))
    indices = gallery_rows(len(batch["image"])).tolist()
    rows, columns = max(len(indices) * len(gallery), 1), 1 + len(names)
    figure = Figure(figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES), dpi=100, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for block, (model, maps) in enumerate(gallery.items()):
        for k, i in enumerate(indices):
            row, mask = axes[block * len(indices) + k], batch["mask"][i]
            _panel(row[0], denormalise(batch["image"][i]), mask,
                   f"{model}\ntrue: {class_names[int(batch['label'][i])]}")
            for ax, name in zip(row[1:], names):
                if name in maps:
                    _panel(ax, maps[name][k].numpy(), mask, name)
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------------- main
def parse_options(argv: list[str] | None = None) -> Options:
    """The command line, with ``--quick`` replacing the seeds, images, steps and timing repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configs = method_configs()
    parser.add_argument("--methods", nargs="+", default=list(configs), choices=list(configs),
                        help="methods with a configs/<method>/shapes.yaml (default: all)")
    parser.add_argument("--explainers", nargs="+", default=None, help=f"default: all of {explainer_names()}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=None, help="default: max_epochs of each method's config")
    parser.add_argument("--images", type=int, default=64, help="validation images explained (default: 64)")
    parser.add_argument("--steps", type=int, default=16, help="insertion/deletion steps (default: 16)")
    parser.add_argument("--backbone", default="xvlm-tiny", choices=["xvlm-tiny", "xvlm-tiny-reg"],
                        help="open_clip architecture, pretrained: shapes (default: xvlm-tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="in-turn timing rounds (default: 3)")
    parser.add_argument("--time_images", type=int, default=8, help="images per timed call (default: 8)")
    parser.add_argument("--chunk", type=int, default=32, help="images per explainer / classify call (default: 32)")
    parser.add_argument("--out", type=Path, default=Path("docs/explanations.md"),
                        help="Markdown report; the gallery PNG goes beside it (default: docs/explanations.md)")
    parser.add_argument("--quick", action="store_true",
                        help="the first seed only, 32 images, 8 steps, 2 timing rounds on 4 images (make bench)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.images, args.steps, args.repeats, args.time_images = args.seeds[:1], 32, 8, 2, 4
    unknown = set(args.explainers or []) - set(explainer_names())
    if unknown:
        parser.error(f"unknown explainers {sorted(unknown)}; choose from {explainer_names()}")
    return Options(methods=args.methods, explainers=args.explainers or explainer_names(), seeds=args.seeds,
                   epochs=args.epochs, images=args.images, steps=args.steps, backbone=args.backbone,
                   repeats=args.repeats, time_images=args.time_images, chunk=args.chunk, out=args.out)


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    check_backbone(options.backbone)
    start = time.perf_counter()
    configs = method_configs()
    collected = Collected(maps={}, lazsl={}, gallery={}, skipped=[], defaults={})
    runs = [(BACKBONE_ROW, BACKBONE_METHOD, options.seeds[0], 0)] if BACKBONE_METHOD in configs else []
    runs += [(name, name, seed, options.epochs) for name in options.methods for seed in options.seeds]
    batch, task = None, None
    for label, name, seed, epochs in runs:
        begun = time.perf_counter()
        module, data = train(name, configs[name], options, seed, epochs)
        batch = measure_model(label, module, data, seed, options, collected,
                              gallery=seed == options.seeds[0] and label != BACKBONE_ROW)
        task = data.task
        print(f"{label} seed {seed}: {time.perf_counter() - begun:.0f} s", flush=True)
    gallery = draw_gallery(batch, collected.gallery, list(task.class_names), options.out.with_suffix(".png"))
    area = float(uniform_mass_in_mask(batch["mask"]).mean())
    text = report(collected, options, area, gallery, time.perf_counter() - start)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(text)
    print("\n" + text + f"\nwritten: {options.out}, {gallery}")


if __name__ == "__main__":
    main()
