"""Albumentations pipelines behind small functions, so the rest of xvlm never imports albumentations directly.

Images enter as ``[H, W, 3]`` uint8 RGB with an optional ``[H, W]`` mask (``mask=``); they leave as a
CLIP-normalised float tensor ``[3, H, W]`` and a ``[H, W]`` mask tensor that followed every geometric step
(nearest-neighbour). Training augmentation never touches hue: in the Shapes world colour is part of the label.

Three families: Shapes (``train_transform`` / ``eval_transform``), natural photos of any size
(``natural_train_transform`` / ``natural_eval_transform``) and CIFAR's 32-pixel images (``cifar_train_transform``,
evaluated with ``eval_transform``). The attribute zero-shot datasets (``datamodules.xlsa``) follow the SVIP recipe:
one training pipeline per dataset (``cub_train_transform``, ``awa2_train_transform``, ``sun_train_transform``) and
``resize_crop_eval_transform`` for evaluation. :func:`apply_transform` is the one place that seeds a random pipeline.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks the network at import otherwise

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN as CLIP_MEAN  # noqa: E402  (the pixel statistics of CLIP)
from open_clip.constants import OPENAI_DATASET_STD as CLIP_STD  # noqa: E402

PAD_GREY = 128
"""Fill of the image area that a shift or shrink uncovers (the mask gets 0 there)."""
CIFAR_SIZE = 32
"""Side of a CIFAR image in pixels."""
CIFAR_PAD = 4
"""Zero pixels added on every side before CIFAR's random crop."""


def _to_clip_tensor() -> list[A.BasicTransform]:
    return [A.Normalize(mean=CLIP_MEAN, std=CLIP_STD, max_pixel_value=255), ToTensorV2()]


def train_transform(image_size: int) -> A.Compose:
    """Resize, mild shift/scale (at most 8 % of the side, 0.9-1.1x), horizontal flip, tiny brightness/contrast.

    Args:
        image_size: output side in pixels.
    """
    return A.Compose(
        [
            A.Resize(image_size, image_size),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), border_mode=cv2.BORDER_CONSTANT,
                     fill=PAD_GREY, fill_mask=0, p=0.8),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.08, contrast_limit=0.08, p=0.5),
            *_to_clip_tensor(),
        ]
    )


def eval_transform(image_size: int) -> A.Compose:
    """Resize and normalise; deterministic."""
    return A.Compose([A.Resize(image_size, image_size), *_to_clip_tensor()])


def natural_train_transform(image_size: int) -> A.Compose:
    """Random resized crop (50-100 % of the area, aspect 3/4-4/3) to ``image_size`` square, horizontal flip.

    Args:
        image_size: output side in pixels.
    """
    return A.Compose(
        [
            A.RandomResizedCrop(size=(image_size, image_size), scale=(0.5, 1.0)),
            A.HorizontalFlip(p=0.5),
            *_to_clip_tensor(),
        ]
    )


def natural_eval_transform(image_size: int) -> A.Compose:
    """Resize the shorter side to ``image_size``, then crop the centre square; deterministic.

    Args:
        image_size: output side in pixels.
    """
    return A.Compose([A.SmallestMaxSize(max_size=image_size), A.CenterCrop(image_size, image_size), *_to_clip_tensor()])


def cifar_train_transform(image_size: int) -> A.Compose:
    """The LICO CIFAR recipe: pad 4 black pixels per side, random 32-pixel crop, horizontal flip.

    The crop is resized to ``image_size`` when that differs from 32.

    Args:
        image_size: output side in pixels.
    """
    resize = [A.Resize(image_size, image_size)] if image_size != CIFAR_SIZE else []
    return A.Compose(
        [
            A.Pad(padding=CIFAR_PAD, fill=0, border_mode=cv2.BORDER_CONSTANT),
            A.RandomCrop(CIFAR_SIZE, CIFAR_SIZE),
            A.HorizontalFlip(p=0.5),
            *resize,
            *_to_clip_tensor(),
        ]
    )


EVAL_RESIZE_RATIO = 256 / 224
"""Shorter side before the centre crop, per pixel of the crop (ImageNet's 256 for 224)."""


def _resize_and_centre_crop(image_size: int) -> list[A.BasicTransform]:
    """Resize the shorter side to ``image_size * 256 / 224`` (rounded), then crop the centre ``image_size`` square."""
    return [A.SmallestMaxSize(max_size=round(image_size * EVAL_RESIZE_RATIO)), A.CenterCrop(image_size, image_size)]


def resize_crop_eval_transform(image_size: int) -> A.Compose:
    """Resize the shorter side to ``image_size * 256 / 224``, then crop the centre ``image_size`` square;
    deterministic. The evaluation pipeline of the SVIP recipe on CUB, AwA2 and SUN.

    Args:
        image_size: output side in pixels.
    """
    return A.Compose([*_resize_and_centre_crop(image_size), *_to_clip_tensor()])


def cub_train_transform(image_size: int) -> A.Compose:
    """SVIP's CUB training pipeline: resize the shorter side to ``image_size * 256 / 224``, crop the centre
    ``image_size`` square, horizontal flip.

    Args:
        image_size: output side in pixels.
    """
    return A.Compose([*_resize_and_centre_crop(image_size), A.HorizontalFlip(p=0.5), *_to_clip_tensor()])


def awa2_train_transform(image_size: int) -> A.Compose:
    """SVIP's AwA2 training pipeline: resize to ``image_size`` square (the aspect ratio is not kept); deterministic.

    Args:
        image_size: output side in pixels.
    """
    return A.Compose([A.Resize(image_size, image_size), *_to_clip_tensor()])


def sun_train_transform(image_size: int) -> A.Compose:
    """SVIP's SUN training pipeline: random resized crop (8-100 % of the area, aspect 3/4-4/3) to ``image_size``
    square, horizontal flip.

    Args:
        image_size: output side in pixels.
    """
    return A.Compose(
        [
            A.RandomResizedCrop(size=(image_size, image_size), scale=(0.08, 1.0)),
            A.HorizontalFlip(p=0.5),
            *_to_clip_tensor(),
        ]
    )


def open_clip_preprocess(transform: A.Compose) -> dict[str, object]:
    """The evaluation ``transform`` in open_clip's ``preprocess_cfg`` terms (``open_clip.transform.PreprocessCfg``).

    ``mean`` and ``std`` are the pipeline's ``Normalize`` (of pixels scaled to [0, 1]); ``Resize`` to ``S`` square
    is ``resize_mode: squash``; a shorter side resized to ``S`` then a centre crop is ``shortest`` (a shorter side
    resized beyond the crop, as in :func:`resize_crop_eval_transform`, has no open_clip equivalent and is also
    described as ``shortest``, which crops less); the resizing's interpolation is ``bicubic`` for OpenCV's cubic,
    else ``bilinear``. ``size`` is the output side ``S``.

    Raises:
        ValueError: the pipeline has no ``Normalize`` or no resizing step (it is not an evaluation transform).
    """
    steps = {type(step).__name__: step for step in transform.transforms}
    normalise = steps.get("Normalize")
    resize = steps.get("Resize") or steps.get("SmallestMaxSize")
    if normalise is None or resize is None:
        raise ValueError(f"the transform {[type(step).__name__ for step in transform.transforms]} has no Normalize or "
                         f"no Resize/SmallestMaxSize step: it cannot be described as open_clip preprocessing")
    scale = float(normalise.max_pixel_value) / 255.0  # albumentations: (x - m·M) / (s·M) for pixels x in [0, 255]
    crop = steps.get("CenterCrop")
    size = (resize.height, resize.width) if crop is None else (crop.height, crop.width)
    return {
        "size": int(size[0]) if size[0] == size[1] else [int(side) for side in size],
        "mean": [float(m) * scale for m in normalise.mean],
        "std": [float(s) * scale for s in normalise.std],
        "interpolation": "bicubic" if resize.interpolation == cv2.INTER_CUBIC else "bilinear",
        "resize_mode": "squash" if type(resize).__name__ == "Resize" else "shortest",
    }


def apply_transform(transform: A.Compose, random: bool, seed: int | None = None, **targets: np.ndarray) -> dict:
    """Run ``transform`` on one item; a ``random`` pipeline is first reseeded.

    The seed is the sample's own (``seed``: ``datamodules.sampling.sample_seed(seed, epoch, index)`` from the
    training sampler), so an augmentation depends on nothing but the sample and the epoch: not on the worker, the
    process, the batch or a restart. Without one (a loader of the caller's own), it is drawn from torch's generator
    (the global one, or the worker's own in a loader worker).

    Args:
        transform: the pipeline.
        random: whether the pipeline draws random numbers.
        seed: the sample's augmentation seed, or None.
        targets: ``image=`` ``[H, W, 3]`` uint8 RGB and optional ``mask=`` ``[H, W]``.

    Returns:
        The pipeline's output: ``image`` ``[3, S, S]`` float and, when given, ``mask`` ``[S, S]``.
    """
    if random:
        transform.set_random_seed(int(torch.randint(2**31 - 1, ())) if seed is None else seed)
    return transform(**targets)
