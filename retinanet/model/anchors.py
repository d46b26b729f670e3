"""Anchor boxes for every pyramid level: one grid rule, cached per feature-map size when eager."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

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
    of sizes and device, then served from a small cache; `from_shapes` computes them from tensor
    shapes instead, for graphs whose sizes stay dynamic.
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

    @torch.jit.unused
    def forward(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device,
                image_size: tuple[int, int] | None = None) -> Tensor:
        """feature_sizes [(H_l, W_l)]; image_size (H, W) of the padded input, needed only with
        stride_from_image. Eager only: the cache is keyed by Python ints."""
        if self.stride_from_image and image_size is None:
            raise ValueError("stride_from_image needs the padded image size")
        sizes = [(int(h), int(w)) for h, w in feature_sizes]
        image_size = (int(image_size[0]), int(image_size[1])) if self.stride_from_image else (0, 0)
        key = (tuple(sizes), image_size, str(device))
        anchors = self._cache.pop(key, None)
        if anchors is None:
            anchors = torch.cat(self.grid(sizes, image_size, torch.device("cpu"))).to(device)
        self._cache[key] = anchors  # the most recently used last
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return anchors

    def from_shapes(self, features: List[Tensor], images: Tensor) -> List[Tensor]:
        """features [(B, C, H_l, W_l)] of images (B, 3, H, W) -> `grid` of their shapes, on their
        device. Sizes are read where the tracer records them (0-dim tensors), so that an ONNX
        graph keeps H and W dynamic."""
        sizes = [(feature.shape[-2], feature.shape[-1]) for feature in features]
        return self.grid(sizes, (images.shape[-2], images.shape[-1]), images.device)

    def grid(self, feature_sizes: List[Tuple[int, int]], image_size: Tuple[int, int],
             device: torch.device) -> List[Tensor]:
        """The anchors of each level, (H_l * W_l * num_anchors, 4) float32, for feature sizes
        [(H_l, W_l)] of a padded input of image_size (H, W) (read only with stride_from_image)."""
        anchors: List[Tensor] = []
        for level, size in enumerate(feature_sizes):
            height, width = size
            stride_y, stride_x = self.strides[level], self.strides[level]
            if self.stride_from_image:  # torchvision's padded size // grid size, per axis
                stride_y, stride_x = image_size[0] // height, image_size[1] // width
            xs = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * stride_x
            ys = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * stride_y
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + self.base_anchors[level].to(device)[None]).reshape(-1, 4))
        return anchors

    def num_anchors_per_level(self, feature_sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [int(h) * int(w) * self.num_anchors for h, w in feature_sizes]
