"""Box and image geometry, each rule once: validity, IoU, clipping, the resize scale, padding,
and the anchor-relative delta coder.

Inside the package boxes are absolute `xyxy` float32 pixels with no "+1": width = x1 - x0.
COCO `xywh` appears only at the dataset and evaluator boundaries (`torchvision.ops.box_convert`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Boxes with a side under this many pixels are degenerate and dropped with a counted warning:
# COCO json has 2 decimals, and albumentations' normalised coordinates collapse to zero width
# for sides near float32 precision.
MIN_BOX_SIDE = 1e-2


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to anchors and back (R-CNN parametrisation).

    dx = wx * (gx - ax) / aw,  dy = wy * (gy - ay) / ah,  dw = ww * log(gw / aw),  dh = wh * log(gh / ah)
    with (x, y) box centres. All shapes broadcast: `(..., 4)`. A plain class that TorchScript
    compiles (as torchvision's), so that a scripted module holding one decodes with it too.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = math.log(1000.0 / 16)):
        wx, wy, ww, wh = weights  # any sequence of 4 from Python (config lists)
        self.weights = (float(wx), float(wy), float(ww), float(wh))
        self.clamp = float(clamp)

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        """anchors, boxes: (..., 4) xyxy -> deltas (..., 4), in float32."""
        anchors, boxes = anchors.float(), boxes.float()
        wx, wy, ww, wh = self.weights
        aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
        ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
        bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        bx, by = boxes[..., 0] + 0.5 * bw, boxes[..., 1] + 0.5 * bh
        return torch.stack((wx * (bx - ax) / aw, wy * (by - ay) / ah,
                            ww * torch.log(bw / aw), wh * torch.log(bh / ah)), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas, anchors: (..., 4) -> boxes (..., 4) xyxy, in float32.

        Deltas are cast to float32 and dw, dh clamped before exp() so that fp16 outputs or an
        untrained head cannot overflow to inf.
        """
        deltas, anchors = deltas.float(), anchors.float()
        wx, wy, ww, wh = self.weights
        aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
        ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
        cx = deltas[..., 0] / wx * aw + ax
        cy = deltas[..., 1] / wy * ah + ay
        w = torch.exp((deltas[..., 2] / ww).clamp(max=self.clamp)) * aw
        h = torch.exp((deltas[..., 3] / wh).clamp(max=self.clamp)) * ah
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def clip_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clips (..., 4) xyxy boxes to [0, width] x [0, height]; heights/widths broadcast to boxes[..., 0]."""
    x0 = torch.minimum(boxes[..., 0].clamp(min=0), widths)
    y0 = torch.minimum(boxes[..., 1].clamp(min=0), heights)
    x1 = torch.minimum(boxes[..., 2].clamp(min=0), widths)
    y1 = torch.minimum(boxes[..., 3].clamp(min=0), heights)
    return torch.stack((x0, y0, x1, y1), dim=-1)


def box_areas_valid(boxes: Tensor | np.ndarray, min_side: float = 0.0) -> Tensor | np.ndarray:
    """The one validity rule: (..., 4) xyxy tensor or array -> (...) bool, True where the box is
    finite, of positive width and height, and no side is under `min_side`. Annotations entering
    the package are held to MIN_BOX_SIDE, augmented and padded boxes to 0."""
    is_array = isinstance(boxes, np.ndarray)
    finite = np.isfinite(boxes).all(axis=-1) if is_array else torch.isfinite(boxes).all(dim=-1)
    if min_side > 0:  # in float32, as boxes are stored, whatever their dtype here; implies > 0
        side = float(np.float32(min_side))
        return finite & (boxes[..., 2] - boxes[..., 0] >= side) & (boxes[..., 3] - boxes[..., 1] >= side)
    return finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair: (N, 4) x (M, 4) xyxy -> (N, M), equal to torchvision's box_iou (bit for
    bit in float32) with fewer temporaries: one coordinate at a time with in-place ops, instead of
    (N, M, 2) corner tensors. Matching runs it over every box x anchor pair of a batch."""
    return broadcast_iou(boxes1[:, None], boxes2[None])


def broadcast_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of broadcastable (..., 4) xyxy boxes -> (...): the same operations in the same order
    as pairwise_iou, so any pair gets bit for bit the value it has in pairwise_iou's matrix."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    width = torch.minimum(boxes1[..., 2], boxes2[..., 2]) \
        .sub_(torch.maximum(boxes1[..., 0], boxes2[..., 0])).clamp_(min=0)
    height = torch.minimum(boxes1[..., 3], boxes2[..., 3]) \
        .sub_(torch.maximum(boxes1[..., 1], boxes2[..., 1])).clamp_(min=0)
    inter = width.mul_(height)
    union = (area1 + area2).sub_(inter)
    return inter.div_(union)


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The scale that brings the shorter side to min_size unless the longer side would then pass
    max_size (then the longer side is max_size): detectron2's and torchvision's rule, shared by
    training, evaluation and anchor analysis."""
    return min(min_size / min(height, width), max_size / max(height, width))


def padded_size(height: int, width: int, divisibility: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of `divisibility` (as given for 0 or 1): a batch's
    input size; 128, the P7 stride, keeps every level's grid aligned with its stride."""
    if divisibility > 1:
        height = math.ceil(height / divisibility) * divisibility
        width = math.ceil(width / divisibility) * divisibility
    return height, width
