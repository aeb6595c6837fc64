"""CIFAR wide residual networks (Zagoruyko & Komodakis 2016) in the FixMatch form, registered with timm.

``WRN-d-k``: a 3×3 stem of 16 channels, then three groups of ``n = (d − 4) / 6`` pre-activation basic blocks of
widths ``16k, 32k, 64k`` and strides 1, 2, 2, then BatchNorm and LeakyReLU. A 32-px image gives the final map
``[B, 64k, 8, 8]`` (``forward_features``), the map LICO's recipe uses on CIFAR: ``wrn28_2`` (128 channels) for
CIFAR-10/SVHN and ``wrn28_8`` (512 channels) for CIFAR-100. FixMatch details: BatchNorm momentum 0.001 and eps
0.001, LeakyReLU slope 0.1, no dropout. timm has no CIFAR-style WRN, so these are registered in its model
registry under those names (``timm.create_model('wrn28_8')``, ``image_encoder: timm:wrn28_8``). There are no
pretrained weights.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

BN_MOMENTUM = 0.001
BN_EPS = 0.001
SLOPE = 0.1


def _norm_act(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS), nn.LeakyReLU(SLOPE))


class BasicBlock(nn.Module):
    """Pre-activation block ``x + conv(act(conv(act(x))))``; a 1×1 shortcut when the width or stride changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.pre = _norm_act(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.mid = _norm_act(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None if in_ch == out_ch and stride == 1 else nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.pre(x)
        residual = self.conv2(self.mid(self.conv1(activated)))
        return residual + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """``WRN-depth-widen``; ``forward_features`` gives ``[B, 64·widen, H/4, W/4]``, ``forward`` the logits.

    Args:
        depth: ``6n + 4`` layers.
        widen: width factor ``k``.
        num_classes: classifier outputs; 0 for none (``forward`` then returns the pooled features ``[B, 64k]``).
        global_pool: ``avg`` or ``''`` (``forward`` then returns the feature map).
    """

    def __init__(self, depth: int = 28, widen: int = 2, num_classes: int = 10, global_pool: str = "avg") -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth={depth}: needs 6n + 4 layers")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
        for group, stride in zip(range(3), (1, 2, 2)):
            for b in range(blocks):
                layers.append(BasicBlock(widths[group] if b == 0 else widths[group + 1], widths[group + 1],
                                         stride if b == 0 else 1))
        layers.append(_norm_act(widths[-1]))
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]
        self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.forward_features(images)
        return self.head(maps.mean(dim=(2, 3))) if self.global_pool == "avg" else maps


def _create(depth: int, widen: int, pretrained: bool, kwargs: dict[str, Any]) -> WideResNet:
    if pretrained:
        raise ValueError(f"wrn{depth}_{widen} has no pretrained weights; train it from scratch (pretrained=False)")
    for timm_option in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_option, None)
    return WideResNet(depth, widen, **kwargs)


@register_model
def wrn28_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-2 (1.5 M parameters), final map 128 × 8 × 8 at 32 px."""
    return _create(28, 2, pretrained, kwargs)


@register_model
def wrn28_8(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-8 (23 M parameters), final map 512 × 8 × 8 at 32 px."""
    return _create(28, 8, pretrained, kwargs)
