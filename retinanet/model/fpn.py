"""Feature pyramid P3..P7 on top of C3..C5."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Top-down pyramid with lateral 1x1 and output 3x3 convs, plus P6/P7 by stride-2 3x3 convs.

    forward([C3, C4, C5]) -> [P3, P4, P5, P6, P7], each (B, channels, H/s, W/s), s = 8..128.
    P6 comes from C5 (RetinaNet paper, detectron2) or from P5 (torchvision's v1 weights).
    """

    def __init__(self, *, in_channels: Sequence[int], channels: int = 256, p6_from: str = "c5"):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        self.p6_from = p6_from
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(in_channels[-1] if p6_from == "c5" else channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        inner = self.lateral[-1](features[-1])
        outputs = [self.output[-1](inner)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            inner = lateral + _upsample_nearest(inner, tuple(lateral.shape[-2:]))
            outputs.insert(0, self.output[level](inner))
        p6 = self.p6(features[-1] if self.p6_from == "c5" else outputs[-1])
        p7 = self.p7(F.relu(p6))
        return outputs + [p6, p7]


def _upsample_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling to `size` (the lateral's size rather than x2, so that odd sizes stay
    aligned). On CUDA an exact x2 is a broadcast instead: same values, and its backward is a sum
    with a deterministic kernel, unlike interpolate's (CPU keeps interpolate, faster there)."""
    n, c, h, w = x.shape
    if x.is_cuda and size == (2 * h, 2 * w):
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
    return F.interpolate(x, size=size, mode="nearest")
