"""Anchor boxes for every pyramid level, cached per feature-map size."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Anchors for levels with the given strides.

    Level l has base size `sizes[l]` times each octave scale (or the explicit `level_sizes[l]`),
    in each aspect ratio (height / width), ordered ratio-major then size (torchvision's order).
    Anchor centres lie at ((x + offset) * stride, (y + offset) * stride), where stride is the
    level's nominal stride, or with `stride_from_image` torchvision's padded image size // grid
    size per axis. Output for feature sizes [(H_l, W_l)]: anchors (A, 4) xyxy float32 with
    A = sum_l H_l * W_l * num_anchors, ordered level, y, x, type. Computed once per distinct set
    of sizes and device, then served from a small cache.
    """

    def __init__(self, *, sizes: Sequence[float], octave_scales: Sequence[float],
                 aspect_ratios: Sequence[float], strides: Sequence[int], offset: float = 0.0,
                 round_base: bool = False, level_sizes: Sequence[Sequence[float]] | None = None,
                 stride_from_image: bool = False, cache_size: int = 16):
        super().__init__()
        if level_sizes is None:
            level_sizes = [[size * scale for scale in octave_scales] for size in sizes]
        if len(level_sizes) != len(strides) or len({len(s) for s in level_sizes}) != 1:
            raise ValueError(f"need one list of anchor sizes per stride, all of one length, got "
                             f"{[list(s) for s in level_sizes]} for strides {list(strides)}")
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self.stride_from_image = stride_from_image
        self.num_anchors = len(level_sizes[0]) * len(aspect_ratios)
        self.base_anchors = [self._base(sizes_l, aspect_ratios, round_base) for sizes_l in level_sizes]
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @staticmethod
    def _base(sizes: Sequence[float], ratios: Sequence[float], round_base: bool) -> Tensor:
        scales_t = torch.tensor(list(sizes), dtype=torch.float32)
        ratios_t = torch.tensor(list(ratios), dtype=torch.float32)
        h_ratios = torch.sqrt(ratios_t)
        w_ratios = 1.0 / h_ratios
        widths = (w_ratios[:, None] * scales_t[None, :]).reshape(-1)
        heights = (h_ratios[:, None] * scales_t[None, :]).reshape(-1)
        base = torch.stack([-widths, -heights, widths, heights], dim=1) / 2
        return base.round() if round_base else base

    def forward(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device,
                image_size: tuple[int, int] | None = None) -> Tensor:
        """feature_sizes [(H_l, W_l)]; image_size (H, W) of the padded input, needed only with
        stride_from_image."""
        sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        if self.stride_from_image:
            if image_size is None:
                raise ValueError("stride_from_image needs the padded image size")
            strides = [(int(image_size[0]) // h, int(image_size[1]) // w) for h, w in sizes]
        else:
            strides = [(s, s) for s in self.strides]
        key = (sizes, tuple(strides), str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = torch.cat([
                self._grid(base, stride, h, w)
                for base, stride, (h, w) in zip(self.base_anchors, strides, sizes)
            ]).to(device)
            self._cache[key] = anchors
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return anchors

    def _grid(self, base: Tensor, stride: tuple[int, int], height: int, width: int) -> Tensor:
        xs = (torch.arange(width, dtype=torch.float32) + self.offset) * stride[1]
        ys = (torch.arange(height, dtype=torch.float32) + self.offset) * stride[0]
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        return (shifts + base[None]).reshape(-1, 4)

    def num_anchors_per_level(self, feature_sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [int(h) * int(w) * self.num_anchors for h, w in feature_sizes]
