"""Test-time augmentation: each batch also run flipped and at other scales, the detections of every
view mapped back to the original pixels and merged per class.

The views are made from the batch as the evaluation transform left it (normalised, resized to
data.test_min_size, padded): each image's unpadded region is rescaled by the view's factor
(bilinear; antialiased when shrinking) and mirrored for flipped views, then padded again. Their
detections, in original pixels (flipped ones mirrored back), are merged by `predictor.merge_detections`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.loader import Batch, pad_images
from .errors import ConfigError
from .predictor import merge_detections


@dataclass(frozen=True)
class TestTimeAugmentation:
    """The views: every scale factor (relative to the evaluation size; 1.0 is the plain view),
    each also mirrored left-right when `hflip`."""
    __test__ = False  # not a pytest test class, whatever its name
    scales: tuple[float, ...] = (1.0,)
    hflip: bool = True

    def __post_init__(self):
        if not self.scales or any(not 0.1 <= s <= 4.0 for s in self.scales):
            raise ConfigError(f"eval.tta.scales: factors of the evaluation size in [0.1, 4], got {list(self.scales)}")

    def views(self) -> list[tuple[float, bool]]:
        return [(scale, flip) for scale in self.scales for flip in ((False, True) if self.hflip else (False,))]


def view_batch(batch: Batch, scale: float, flip: bool, size_divisibility: int) -> Batch:
    """`batch` seen at `scale` times its size, mirrored when `flip` (boxes are not carried)."""
    images, sizes = [], []
    for image, (h, w) in zip(batch.images, batch.image_sizes):
        image = image[:, :h, :w]
        if scale != 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                                  antialias=scale < 1.0)[0]
        images.append(image.flip(-1) if flip else image)
        sizes.append(tuple(image.shape[-2:]))
    return Batch(images=pad_images(images, size_divisibility), boxes=[], labels=[],
                 image_ids=batch.image_ids, image_sizes=sizes, orig_sizes=batch.orig_sizes)


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """(N, 4) xyxy in an image `width` pixels wide, mirrored left-right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def predict_with_tta(predict: Callable[[Batch], list[dict[str, Tensor]]], batch: Batch,
                     tta: TestTimeAugmentation, *, size_divisibility: int, nms_thresh: float,
                     max_detections: int) -> list[dict[str, Tensor]]:
    """`predict` (a collated Batch -> per image detections in original pixels) over every view of
    `batch`, merged per image."""
    per_image: list[list[dict[str, Tensor]]] = [[] for _ in batch.image_ids]
    for scale, flip in tta.views():
        view = batch if (scale, flip) == (1.0, False) else view_batch(batch, scale, flip, size_divisibility)
        for parts, found, (_, width) in zip(per_image, predict(view), batch.orig_sizes):
            parts.append(dict(found, boxes=mirror_boxes(found["boxes"], width)) if flip else found)
    return [merge_detections(parts, nms_thresh=nms_thresh, max_detections=max_detections)
            for parts in per_image]
