"""The Shapes world: procedural images of one coloured, patterned shape on clutter, with its exact mask.

Every sample is a pure function of ``(seed, split, index)``: its class is the split's class list cycled by index,
and a ``numpy.random.Generator`` seeded by ``np.random.SeedSequence((seed, split id, index))`` draws the rest, so
pixels and masks never depend on worker count or order. Nothing is read from disk.

A drawn object is a *look* ``(shape, colour, pattern)``:

- 8 shapes (circle, square, triangle, star, cross, heart, hexagon, crescent), tested per pixel centre in a
  normalised object frame where the unrotated shape spans about ``[-1, 1]``; ``size`` is the side of that box
  in pixels (25-60 % of the image side); rotation is at most 20 degrees;
- 8 saturated colours; 4 patterns drawn with a darker shade or lighter tint of the same colour, so the hue of
  every object pixel is the class hue and every object pixel is coloured while the background is grey;
- a grey background of smooth low-contrast noise and a few small grey blobs drawn under the object.

The :class:`ShapesDataModule` serves three label spaces over the same world (``task``):

- ``objects``: shape classes, all seen (the 8 shapes, or the subset ``shapes`` names, in its order, so that a model
  trained on some shapes can be tested zero-shot on others). Colour and pattern are random per sample. The task
  publishes the category-rationale contract of ``datamodules.rationales``: ``rationale_vocab`` (the facts of its
  shapes, then every colour fact, then every pattern fact), ``rationales`` (per class, its shape facts) and
  ``extras["rationale_table"]`` ``[C, R]`` bool. Batches carry ``rationales`` ``[B, R]`` bool (every fact visible in
  the image: its shape facts, its colour fact and its pattern fact) and ``rationale`` ``[B]`` long, one ground-truth
  rationale among the class's own: ``class_rationales[index % len(class_rationales)]`` for sample ``index``, so it
  is deterministic and every fact of a class is some samples' ground truth.
- ``attributes``: 256 classes named ``"<colour> <pattern> <shape>"`` (``"red solid star"``: the word "solid" is
  kept so every name has the three parts); ``unseen_fraction`` of them are held out of training, never all
  classes with one colour, pattern or shape. Batches carry ``attributes`` ``[B, A]``;
  ``task.extras["attribute_groups"]`` groups its columns (colours, patterns, shapes, geometry facts).
- ``compositions``: CZSL with state = colour and object = shape (64 pairs named ``"red star"``); the pattern is a
  random nuisance. Unseen pairs are split in halves between validation and test (disjoint), both of which also
  carry every training pair. Batches carry ``state`` and ``object`` ``[B]``.

Facts are noun phrases without article ("five points", "red colour", "stripes") so that they read both as DCLIP
descriptors ("which has five points") and as DROR rationales ("because there is five points"). Every task
publishes ``descriptors`` (the facts fixed by the class), so zero-shot scoring runs on all three.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.loading import Split, ZooDataModule
from datamodules.sampling import SampleKey, split_key
from datamodules.task import Task
from datamodules.transforms import A, apply_transform, eval_transform, train_transform

TaskName = Literal["objects", "attributes", "compositions"]

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "crescent")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 200),
    "orange": (250, 135, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 100, 180),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")

SHAPE_FACTS: dict[str, tuple[str, ...]] = {
    "circle": ("curved outline", "round outline", "no corners"),
    "square": ("straight edges", "four corners", "four equal sides", "right angles"),
    "triangle": ("straight edges", "three corners", "sharp points"),
    "star": ("straight edges", "sharp points", "five points", "inward corners"),
    "cross": ("straight edges", "right angles", "four arms", "inward corners"),
    "heart": ("curved outline", "two rounded lobes", "pointed bottom", "notch at the top"),
    "hexagon": ("straight edges", "six corners", "six equal sides"),
    "crescent": ("curved outline", "sharp points", "two pointed tips", "hollow side"),
}
PATTERN_FACTS = {"solid": "uniform fill", "striped": "stripes", "dotted": "dots", "checkered": "checkerboard pattern"}
GEOMETRY = ("straight edges", "curved outline", "sharp points", "right angles")
"""Shape facts that also become columns of the ``attributes`` matrix."""

SIZE_RANGE = (0.25, 0.60)
"""Object bounding size as a fraction of the image side."""
MAX_ROTATION = np.deg2rad(20.0)
_STREAMS = {"train": 0, "val": 1, "test": 2, "classes": 3}


def _colour_fact(colour: str) -> str:
    """The fact naming a colour, e.g. ``"red colour"``."""
    return f"{colour} colour"


# --------------------------------------------------------------------------------------------- geometry
def _polygon(vertices: list[tuple[float, float]]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Even-odd point-in-polygon test for the given ``(u, v)`` vertices (``v`` points up)."""
    start = np.asarray(vertices, dtype=np.float32)
    end = np.roll(start, -1, axis=0)
    slanted = start[:, 1] != end[:, 1]
    (u0, v0), (u1, v1) = start[slanted].T, end[slanted].T
    du_dv = (u1 - u0) / (v1 - v0)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        result = np.zeros(u.shape, dtype=bool)
        for a, b, c, d, slope in zip(u0, v0, u1, v1, du_dv):
            result ^= ((b > v) != (d > v)) & (u < a + (v - b) * slope)
        return result

    return inside


def _ring(radii: list[float]) -> list[tuple[float, float]]:
    """Vertices at equal angle steps from the top, at the given distances from the origin."""
    angles = np.pi / 2 + 2 * np.pi * np.arange(len(radii)) / len(radii)
    return list(zip(np.multiply(radii, np.cos(angles)), np.multiply(radii, np.sin(angles))))


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The sextic heart ``(x^2 + y^2 - 1)^3 <= x^2 y^3``, rescaled from its box ``[-1.14, 1.14] x [-1, 1.236]``."""
    x, y = 1.14 * u, 1.118 * v + 0.118
    return (x * x + y * y - 1.0) ** 3 <= x * x * y**3


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unit disk minus a disk of radius 0.85 shifted right by 0.45, centred horizontally."""
    x = u - 0.233
    return (x * x + v * v <= 1.0) & ((x - 0.45) ** 2 + v * v > 0.85**2)


_ARM = 0.32
SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": _polygon([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _polygon([(-1, -0.866), (1, -0.866), (0, 0.866)]),
    "star": _polygon(_ring([1.0, 0.42] * 5)),
    "cross": _polygon([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
                       (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)]),
    "heart": _heart,
    "hexagon": _polygon(_ring([1.0] * 6)),
    "crescent": _crescent,
}
"""Per shape, a test ``inside(u, v) -> bool array`` in the normalised object frame (``v`` up)."""


def _reach(shape: str, resolution: int = 401) -> float:
    """Largest distance from the frame origin to a point of ``shape`` (normalised units), so any rotation fits."""
    u, v = np.meshgrid(*2 * [np.linspace(-1.5, 1.5, resolution, dtype=np.float32)])
    inside = SHAPE_TESTS[shape](u, v)
    return float(np.sqrt(u[inside] ** 2 + v[inside] ** 2).max()) + 3.0 / resolution


SHAPE_REACH = {shape: _reach(shape) for shape in SHAPES}


def _window(cx: float, cy: float, radius: float, image_size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The pixels within ``radius`` of ``(cx, cy)`` along each axis, clipped to the image.

    Returns:
        The index of the window into an ``[S, S]`` array, and pixel-centre coordinates x ``[1, w]`` and y ``[h, 1]``.
    """
    x0, x1 = max(int(cx - radius), 0), min(int(np.ceil(cx + radius)), image_size)
    y0, y1 = max(int(cy - radius), 0), min(int(np.ceil(cy + radius)), image_size)
    x = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    y = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    return (slice(y0, y1), slice(x0, x1)), x, y


@lru_cache(maxsize=8)
def _upsampler(image_size: int, cells: int) -> np.ndarray:
    """``[S, cells]`` linear-interpolation matrix from a ``cells``-point grid to ``S`` pixels."""
    position = (np.arange(image_size) + 0.5) / image_size * (cells - 1)
    weights = np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(cells)[None, :]))
    return weights.astype(np.float32)


# --------------------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Drawing:
    """One rendered sample.

    Attributes:
        image: ``[S, S, 3]`` uint8 RGB.
        mask: ``[S, S]`` bool, the pixels the object covers.
        size: side of the object's unrotated bounding box, in pixels.
    """

    image: np.ndarray
    mask: np.ndarray
    size: float


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Grey clutter ``[S, S]`` float32: smooth noise around a random grey level plus small darker/lighter blobs."""
    up = _upsampler(image_size, 6)
    level = rng.uniform(90.0, 170.0)
    grey = level + up @ rng.normal(0.0, 14.0, (6, 6)).astype(np.float32) @ up.T
    grey += 12.0 * rng.random((image_size, image_size), dtype=np.float32)
    count = rng.integers(3, 7)
    centres = rng.uniform(0, image_size, (count, 2))
    radii = rng.uniform(0.025, 0.08, (count, 2)) * image_size
    shades = level + np.where(rng.random(count) < 0.5, -1.0, 1.0) * rng.uniform(25.0, 50.0, count)
    for (cx, cy), (rx, ry), shade in zip(centres, radii, shades):
        window, x, y = _window(cx, cy, max(rx, ry), image_size)
        grey[window][((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0] = shade
    return grey


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Bool ``[S, S]``: where the secondary colour goes, in object-frame pixel coordinates ``u, v``."""
    u = u + rng.uniform(0, period)
    v = v + rng.uniform(0, period)
    if pattern == "striped":
        return np.mod(u + v, period) < period / 2
    if pattern == "dotted":
        return (np.mod(u, period) - period / 2) ** 2 + (np.mod(v, period) - period / 2) ** 2 < (0.3 * period) ** 2
    if pattern == "checkered":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0
    return np.zeros(u.shape, dtype=bool)


def render(shape: str, colour: str, pattern: str, rng: np.random.Generator, image_size: int = 64) -> Drawing:
    """Draw one object of the given look at a random size, position and rotation on grey clutter.

    The object lies fully inside the image with a 1-pixel margin. The pattern repeats every tenth of the image
    side, in a darker shade or a lighter tint of ``colour`` (chosen at random), so every object pixel has the
    colour's hue.

    Args:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        pattern: one of :data:`PATTERNS`.
        rng: source of every random choice.
        image_size: side ``S`` of the square image.

    Returns:
        The drawing: image ``[S, S, 3]`` uint8, mask ``[S, S]`` bool and the object size.
    """
    image = np.repeat(_background(rng, image_size)[..., None], 3, axis=-1)
    size = rng.uniform(*SIZE_RANGE) * image_size
    margin = SHAPE_REACH[shape] * size / 2 + 1.0
    cx, cy = rng.uniform(margin, image_size - margin, 2)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    window, x, y = _window(cx, cy, margin, image_size)
    cos, sin = np.cos(angle), np.sin(angle)
    u = cos * (x - cx) + sin * (y - cy)
    v = cos * (y - cy) - sin * (x - cx)
    inside = SHAPE_TESTS[shape](u / (size / 2), -v / (size / 2))
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    secondary = base * 0.45 if rng.random() < 0.5 else base + 0.6 * (255.0 - base)
    marked = _pattern(pattern, u, v, image_size / 10, rng)
    image[window][inside] = np.where(marked[inside][:, None], secondary, base)
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[window] = inside
    return Drawing(np.clip(image, 0, 255).astype(np.uint8), mask, float(size))


def _rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    """The generator of sample ``index`` of ``stream`` (a split, or ``"classes"`` for the class split)."""
    return np.random.default_rng(np.random.SeedSequence((seed, _STREAMS[stream], index)))


# --------------------------------------------------------------------------------------------- label spaces
def _class_facts(shape: int, colour: int, pattern: int) -> list[str]:
    """Facts fixed by a class; factors that are ``-1`` (random per sample) contribute none."""
    facts = []
    if colour >= 0:
        facts.append(_colour_fact(list(COLOURS)[colour]))
    if pattern >= 0:
        facts.append(PATTERN_FACTS[PATTERNS[pattern]])
    if shape >= 0:
        facts.extend(SHAPE_FACTS[SHAPES[shape]])
    return facts


def _hold_out(factors: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Split classes into seen and unseen, keeping every value of every factor in some seen class.

    Args:
        factors: ``[C, F]`` factor values per class.
        fraction: share of classes to hold out.
        rng: generator of the split.

    Returns:
        ``(seen, unseen)`` class indices; ``unseen`` is in random order.
    """
    index = {tuple(row): c for c, row in enumerate(factors.tolist())}
    orders = [rng.permutation(np.unique(column)) for column in factors.T]
    cover = {index[tuple(int(order[k % len(order)]) for order in orders)] for k in range(max(map(len, orders)))}
    candidates = rng.permutation([c for c in range(len(factors)) if c not in cover])
    n_unseen = round(fraction * len(factors))
    if not 0 <= n_unseen <= len(candidates):
        raise ValueError(f"unseen_fraction={fraction} must leave each colour, pattern and shape in a seen class")
    unseen = [int(c) for c in candidates[:n_unseen]]
    seen = sorted(set(range(len(factors))) - set(unseen))
    for column in factors.T:
        assert set(column[seen]) == set(column), "a factor value is missing from the seen classes"
    return seen, unseen


@dataclass(frozen=True)
class World:
    """What a dataset needs to draw samples of one task: the look of every class and the split's classes.

    Attributes:
        name: which label space.
        task: the published label space.
        factors: ``[C, 3]`` (shape, colour, pattern) indices per class; ``-1`` draws the factor per sample.
        split_classes: classes of each split, cycled through by sample index so every class appears equally.
        seed: world seed.
        image_size: image side ``S``.
    """

    name: TaskName
    task: Task
    factors: np.ndarray
    split_classes: dict[str, tuple[int, ...]]
    seed: int
    image_size: int

    def sample(self, split: Split, index: int) -> dict:
        """Raw sample ``index`` of ``split``.

        Returns:
            ``image`` ``[S, S, 3]`` uint8, ``mask`` ``[S, S]`` bool, ``label``, ``index``, ``seen`` and the look
            (``shape``, ``colour``, ``pattern`` as indices) and the object ``size`` in pixels.
        """
        rng = _rng(self.seed, split, index)
        classes = self.split_classes[split]
        label = classes[index % len(classes)]
        counts = (len(SHAPES), len(COLOURS), len(PATTERNS))
        look = [int(rng.integers(n)) if f < 0 else int(f) for f, n in zip(self.factors[label], counts)]
        drawing = render(SHAPES[look[0]], list(COLOURS)[look[1]], PATTERNS[look[2]], rng, self.image_size)
        return dict(image=drawing.image, mask=drawing.mask, label=label, index=index, seen=label in self.task.seen,
                    shape=look[0], colour=look[1], pattern=look[2], size=drawing.size)

    def task_fields(self, raw: dict) -> dict[str, torch.Tensor]:
        """The task-specific batch fields of a raw sample (``attributes``, ``state``/``object``, or ``rationale``
        and ``rationales``: see the module docstring)."""
        if self.name == "attributes":
            return {"attributes": self.task.attributes[raw["label"]]}
        if self.name == "compositions":
            return {"state": torch.tensor(raw["colour"]), "object": torch.tensor(raw["shape"])}
        vocab = self.task.rationale_vocab
        visible = torch.zeros(len(vocab), dtype=torch.bool)
        visible[[vocab.index(fact) for fact in _class_facts(raw["shape"], raw["colour"], raw["pattern"])]] = True
        own = self.task.rationales[self.task.class_names[raw["label"]]]
        truth = vocab.index(own[raw["index"] % len(own)])
        return {"rationale": torch.tensor(truth), "rationales": visible}


def _check_shapes(shapes: list[str] | None, source: str) -> tuple[str, ...]:
    """The objects task's classes: ``shapes`` (checked) or every shape."""
    if shapes is None:
        return SHAPES
    unknown = [shape for shape in shapes if shape not in SHAPES]
    repeated = sorted({shape for shape in shapes if list(shapes).count(shape) > 1})
    if unknown or repeated or not shapes:
        problem = (f"names unknown shapes {unknown}" if unknown else
                   f"repeats {repeated}" if repeated else "is empty")
        raise ValueError(f"{source}: shapes={list(shapes)} {problem}; list distinct shapes among {list(SHAPES)}, "
                         f"or leave it unset for all of them")
    return tuple(shapes)


def _objects(source: str, shapes: list[str] | None = None) -> tuple[Task, np.ndarray]:
    names = _check_shapes(shapes, source)
    factors = np.array([[SHAPES.index(shape), -1, -1] for shape in names])
    shape_facts = list(dict.fromkeys(itertools.chain(*(SHAPE_FACTS[shape] for shape in names))))
    vocab = shape_facts + [_colour_fact(c) for c in COLOURS] + list(PATTERN_FACTS.values())
    rationales = {shape: list(SHAPE_FACTS[shape]) for shape in names}
    table = torch.tensor([[fact in rationales[shape] for fact in vocab] for shape in names], dtype=torch.bool)
    task = Task(source=source, class_names=names, seen=tuple(range(len(names))), descriptors=rationales,
                rationales=rationales, rationale_vocab=tuple(vocab), extras={"rationale_table": table})
    return task, factors


def _attributes(source: str, fraction: float, rng: np.random.Generator) -> tuple[Task, np.ndarray]:
    grid = list(itertools.product(range(len(COLOURS)), range(len(PATTERNS)), range(len(SHAPES))))
    factors = np.array([[s, c, p] for c, p, s in grid])
    seen, unseen = _hold_out(factors, fraction, rng)
    names = tuple(f"{list(COLOURS)[c]} {PATTERNS[p]} {SHAPES[s]}" for s, c, p in factors)
    geometry = [[fact in SHAPE_FACTS[SHAPES[s]] for fact in GEOMETRY] for s in factors[:, 0]]
    one_hot = [np.eye(n)[factors[:, k]] for k, n in ((1, len(COLOURS)), (2, len(PATTERNS)), (0, len(SHAPES)))]
    attributes = torch.tensor(np.concatenate([*one_hot, np.array(geometry)], axis=1), dtype=torch.float32)
    sizes = (len(COLOURS), len(PATTERNS), len(SHAPES), len(GEOMETRY))
    starts = np.cumsum((0, *sizes))
    groups = tuple(tuple(range(start, start + size)) for start, size in zip(starts, sizes))
    task = Task(source=source, class_names=names, seen=tuple(seen), unseen=tuple(sorted(unseen)),
                descriptors={name: _class_facts(*row) for name, row in zip(names, factors.tolist())},
                attributes=attributes, attribute_names=(*COLOURS, *PATTERNS, *SHAPES, *GEOMETRY),
                extras={"attribute_groups": groups})
    return task, factors


def _compositions(source: str, fraction: float, rng: np.random.Generator) -> tuple[Task, np.ndarray]:
    grid = list(itertools.product(range(len(COLOURS)), range(len(SHAPES))))
    factors = np.array([[s, c, -1] for c, s in grid])
    seen, unseen = _hold_out(factors[:, :2], fraction, rng)
    val_unseen, test_unseen = unseen[: len(unseen) // 2], unseen[len(unseen) // 2 :]
    pairs = tuple((list(COLOURS)[c], SHAPES[s]) for c, s in grid)
    names = tuple(f"{state} {obj}" for state, obj in pairs)
    task = Task(source=source, class_names=names, seen=tuple(seen), unseen=tuple(sorted(unseen)),
                descriptors={name: _class_facts(*row) for name, row in zip(names, factors.tolist())},
                states=tuple(COLOURS), objects=SHAPES, pairs=pairs, train_pairs=tuple(seen),
                val_pairs=tuple(sorted(seen + val_unseen)), test_pairs=tuple(sorted(seen + test_unseen)))
    return task, factors


def build_world(task: TaskName, seed: int = 0, unseen_fraction: float = 0.25, image_size: int = 64,
                shapes: list[str] | None = None) -> World:
    """The label space of ``task`` and how each split draws its classes; a pure function of the arguments.

    Train draws seen classes only; val and test draw every class, except in ``compositions`` where they draw
    their own pairs (every train pair plus their half of the unseen pairs). ``objects`` has no unseen classes; its
    classes are ``shapes`` (default: all), which other tasks refuse.
    """
    source = f"ShapesDataModule(task='{task}')"
    if shapes is not None and task != "objects":
        raise ValueError(f"{source}: shapes={shapes!r} chooses the classes of task='objects' only; leave shapes unset "
                         f"for task={task!r}")
    if shapes is not None:
        source = f"ShapesDataModule(task='objects', shapes={list(shapes)!r})"
    rng = _rng(seed, "classes")
    if task == "objects":
        published, factors = _objects(source, shapes)
    elif task == "attributes":
        published, factors = _attributes(source, unseen_fraction, rng)
    elif task == "compositions":
        published, factors = _compositions(source, unseen_fraction, rng)
    else:
        raise ValueError(f"unknown Shapes task {task!r}; choose objects, attributes or compositions")
    everything = tuple(range(published.num_classes))
    split_classes = {"train": published.seen, "val": published.val_pairs or everything,
                     "test": published.test_pairs or everything}
    return World(task, published, factors, split_classes, seed, image_size)


# --------------------------------------------------------------------------------------------- torch side
class ShapesDataset(Dataset):
    """``length`` samples of one split, as batch-ready dicts.

    Items: ``image`` ``[3, S, S]`` float (CLIP-normalised), ``mask`` ``[S, S]`` bool, ``label``/``index`` long,
    ``seen`` bool, plus the task fields of :meth:`World.task_fields`.

    Keys are indices or the ``(index, seed)`` pairs of the training sampler (``datamodules.sampling``); a random
    ``transform`` is reseeded per item by that seed (:func:`~datamodules.transforms.apply_transform`), so
    augmentation repeats across runs, workers and resumption.
    """

    def __init__(self, world: World, split: Split, length: int, transform: A.Compose, random_transform: bool) -> None:
        self.world, self.split, self.length, self.transform = world, split, length, transform
        self.random_transform = random_transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        index, seed = split_key(key)
        raw = self.world.sample(self.split, index)
        out = apply_transform(self.transform, self.random_transform, seed, image=raw["image"],
                              mask=raw["mask"].astype(np.uint8))
        return dict(image=out["image"], mask=out["mask"].bool(), label=torch.tensor(raw["label"]),
                    index=torch.tensor(index), seen=torch.tensor(raw["seen"]), **self.world.task_fields(raw))


class ShapesDataModule(ZooDataModule):
    """The procedural Shapes world as a DataModule; ``self.task`` is ready after ``__init__``.

    Args:
        task: label space: ``objects``, ``attributes`` or ``compositions`` (see the module docstring).
        image_size: image side in pixels.
        batch_size: samples per batch.
        num_workers: data loader workers.
        seed: seed of the class split and of every sample.
        train_size: samples per training epoch (the same samples each epoch, augmented afresh).
        val_size: validation samples.
        test_size: test (and predict) samples.
        unseen_fraction: share of classes (attributes) or pairs (compositions) held out of training; objects
            ignores it.
        augment: apply the mild geometric training augmentation.
        shapes: the classes of the ``objects`` task, a subset of :data:`SHAPES` in the order given (None: all); its
            rationale vocabulary holds the facts of these shapes plus every colour and pattern fact. Other tasks
            refuse it.
    """

    def __init__(self, task: TaskName = "attributes", image_size: int = 64, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, train_size: int = 4096, val_size: int = 512,
                 test_size: int = 512, unseen_fraction: float = 0.25, augment: bool = True,
                 shapes: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.world = build_world(task, seed, unseen_fraction, image_size, shapes)
        self.task: Task = self.world.task

    def build_dataset(self, split: Split) -> ShapesDataset:
        """The dataset of ``split`` (cheap: samples are drawn on access)."""
        hp = self.hparams
        random = split == "train" and hp.augment
        transform = train_transform(hp.image_size) if random else eval_transform(hp.image_size)
        return ShapesDataset(self.world, split, hp[f"{split}_size"], transform, random_transform=random)

    def raw_sample(self, split: Split, index: int) -> dict:
        """Sample ``index`` of ``split`` before any transform (see :meth:`World.sample`), as the loaders draw it."""
        return self.world.sample(split, index)
