"""Shared fixtures: offline, quiet, deterministic CPU runs."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_vit():
    """A randomly initialised ``xvlm-tiny`` (conv-stem ViT) in eval mode."""
    from xvlm.backbones import VisionLanguageModel

    return VisionLanguageModel("xvlm-tiny", pretrained=None).eval()
