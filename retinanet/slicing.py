"""Sliced inference for large images with small objects: overlapping tiles and their merge.

A large image resized to the evaluation size shrinks small objects below what the network can
see. Sliced inference runs the network on tiles of the image at their native resolution as
well (`Detector.predict(images, slice=Slicing(512, 512))`), and merges the tiles' detections
with those of the whole image, resized as usual, in image coordinates:

1. each tile's boxes are shifted by the tile's offset;
2. a box that a tile's inner edge cuts (it touches that edge) is dropped when it lies inside the
   strip the neighbouring tile also covers: the neighbour sees that object whole, and the cut
   box, a part of it, would overlap the whole box too little for NMS to merge them;
3. one per-class NMS (torchvision `batched_nms`, the postprocessor's IoU threshold) over all of
   it, and the best `max_detections` kept.

The tiles of one side start evenly spaced from 0 to `side - tile`, as few as keep neighbours
overlapping by at least ceil(overlap * tile) pixels, so every tile has the full tile size (an
image side shorter than the tile is one tile of that side).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .errors import ConfigError
from .predictor import merge_detections

# A cut object's box ends at the tile edge, give or take the box regression's error (px).
EDGE_MARGIN = 2.0


@dataclass(frozen=True)
class Slicing:
    """How to slice: tiles of height x width pixels, neighbours sharing `overlap` of a tile's
    side; `whole_image` adds the whole image resized as without slicing (it finds the objects
    too large for a tile); `batch_size` tiles per forward pass."""
    height: int
    width: int
    overlap: float = 0.25
    whole_image: bool = True
    batch_size: int = 16

    def __post_init__(self):
        if int(self.height) < 1 or int(self.width) < 1:
            raise ConfigError(f"slice size must be positive, got {self.height} x {self.width}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"slice overlap is a fraction of the tile in [0, 1), got {self.overlap}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"slice batch_size must be positive, got {self.batch_size}")


def as_slicing(spec: Slicing | Sequence[float]) -> Slicing:
    """A Slicing, or (height, width) or (height, width, overlap) -> Slicing."""
    if isinstance(spec, Slicing):
        return spec
    values = list(spec)
    if len(values) not in (2, 3):
        raise ConfigError(f"slice is Slicing(height, width, overlap) or (height, width[, overlap]), "
                          f"got {spec!r}")
    return Slicing(int(values[0]), int(values[1]), *([float(values[2])] if len(values) == 3 else []))


def tile_spans(length: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """The [start, end) spans of the tiles along one side of `length` pixels."""
    if length <= tile:
        return [(0, length)]
    step = tile - math.ceil(overlap * tile)  # the largest start-to-start distance allowed
    count = math.ceil((length - tile) / max(step, 1)) + 1
    # floor of evenly spaced starts: consecutive starts differ by at most ceil(spacing) <= step
    return [((k * (length - tile)) // (count - 1), (k * (length - tile)) // (count - 1) + tile)
            for k in range(count)]


class Tiling(NamedTuple):
    """The tiles of one image: a grid of row spans `ys` and column spans `xs`, [start, end)."""
    ys: list[tuple[int, int]]
    xs: list[tuple[int, int]]

    def windows(self) -> list[tuple[int, int, int, int]]:
        """(x0, y0, x1, y1) per tile, row by row: the order merge_tiles expects."""
        return [(x0, y0, x1, y1) for y0, y1 in self.ys for x0, x1 in self.xs]


def tile_image(height: int, width: int, slicing: Slicing) -> Tiling:
    """The tiling of a height x width image."""
    return Tiling(tile_spans(height, int(slicing.height), slicing.overlap),
                  tile_spans(width, int(slicing.width), slicing.overlap))


def cut_by_inner_edge(boxes: Tensor, tiling: Tiling, row: int, col: int,
                      margin: float = EDGE_MARGIN) -> Tensor:
    """boxes (N, 4) xyxy in image pixels, from tile (row, col) -> (N,) bool: touching an edge of
    the tile that lies inside the image while inside the strip that the neighbour across that
    edge also covers (see the module docstring)."""
    x0, y0, x1, y1 = boxes.unbind(1)
    cut = torch.zeros_like(x0, dtype=torch.bool)
    for spans, index, low, high in ((tiling.xs, col, x0, x1), (tiling.ys, row, y0, y1)):
        start, end = spans[index]
        if index > 0:  # the previous tile covers up to spans[index - 1][1]
            cut |= (low <= start + margin) & (high <= spans[index - 1][1])
        if index + 1 < len(spans):  # the next one from spans[index + 1][0]
            cut |= (high >= end - margin) & (low >= spans[index + 1][0])
    return cut


def merge_tiles(tile_detections: Sequence[dict[str, Tensor]], tiling: Tiling,
                whole: dict[str, Tensor] | None, *, nms_thresh: float, max_detections: int,
                margin: float = EDGE_MARGIN, class_agnostic: bool = False) -> dict[str, Tensor]:
    """Per tile (in `tiling.windows()` order) {"boxes" (n, 4) xyxy in the tile's pixels,
    "scores" (n,), "labels" (n,)}, and optionally the whole image's in image pixels -> the
    merged {"boxes" (N, 4) in image pixels, "scores" (N,), "labels" (N,)}, best first."""
    parts = []
    for index, ((x0, y0, _, _), dets) in enumerate(zip(tiling.windows(), tile_detections)):
        shifted = dets["boxes"] + dets["boxes"].new_tensor([x0, y0, x0, y0])
        keep = ~cut_by_inner_edge(shifted, tiling, index // len(tiling.xs), index % len(tiling.xs), margin)
        parts.append({"boxes": shifted[keep], "scores": dets["scores"][keep], "labels": dets["labels"][keep]})
    return merge_detections(parts + ([whole] if whole is not None else []), nms_thresh=nms_thresh,
                            max_detections=max_detections, class_agnostic=class_agnostic)
