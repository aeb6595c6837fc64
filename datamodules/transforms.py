"""Albumentations pipelines behind small functions, so the rest of xvlm never imports albumentations directly.

Images enter as ``[H, W, 3]`` uint8 RGB with an optional ``[H, W]`` mask (``mask=``); they leave as a
CLIP-normalised float tensor ``[3, H, W]`` and a ``[H, W]`` mask tensor that followed every geometric step
(nearest-neighbour). Training augmentation never touches hue: in the Shapes world colour is part of the label.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks the network at import otherwise

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_GREY = 128
"""Fill of the image area that a shift or shrink uncovers (the mask gets 0 there)."""


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
