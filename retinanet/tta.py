"""Test-time augmentation: each batch also run flipped and at other scales, the detections of every
view mapped back to the original pixels and merged per class.

The views are made from the batch as the evaluation transform left it (normalised, resized to
data.test_min_size, padded): each image's unpadded region is rescaled by the view's factor
(bilinear; antialiased when shrinking) and mirrored for flipped views, then padded again. Their
detections, in original pixels (flipped ones mirrored back), are merged per class: by weighted box
fusion (`fuse_detections`, the default: it measured better) or by NMS (`predictor.merge_detections`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.loader import Batch, pad_images
from .errors import ConfigError
from .boxes import pairwise_iou
from .predictor import merge_detections


@dataclass(frozen=True)
class TestTimeAugmentation:
    """The views: every scale factor (relative to the evaluation size; 1.0 is the plain view),
    each also mirrored left-right when `hflip`."""
    __test__ = False  # not a pytest test class, whatever its name
    scales: tuple[float, ...] = (1.0,)
    hflip: bool = True
    merge: Literal["nms", "wbf"] = "wbf"  # how the views' detections become one set
    wbf_iou: float = 0.55  # wbf: IoU with a cluster's fused box at which a detection joins it

    def __post_init__(self):
        if not self.scales or any(not 0.1 <= s <= 4.0 for s in self.scales):
            raise ConfigError(f"eval.tta.scales: factors of the evaluation size in [0.1, 4], got {list(self.scales)}")
        if self.merge not in ("nms", "wbf"):
            raise ConfigError(f"eval.tta.merge: nms or wbf, got {self.merge!r}")

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
                     max_detections: int, class_agnostic: bool = False) -> list[dict[str, Tensor]]:
    """`predict` (a collated Batch -> per image detections in original pixels) over every view of
    `batch`, merged per image; with `class_agnostic` (the postprocessor's), one box per object
    after the merge too, as views may label one object differently."""
    per_image: list[list[dict[str, Tensor]]] = [[] for _ in batch.image_ids]
    for scale, flip in tta.views():
        view = batch if (scale, flip) == (1.0, False) else view_batch(batch, scale, flip, size_divisibility)
        for parts, found, (_, width) in zip(per_image, predict(view), batch.orig_sizes):
            parts.append(dict(found, boxes=mirror_boxes(found["boxes"], width)) if flip else found)
    if tta.merge == "nms":
        return [merge_detections(parts, nms_thresh=nms_thresh, max_detections=max_detections,
                                 class_agnostic=class_agnostic) for parts in per_image]
    fused = [fuse_detections(parts, iou_thresh=tta.wbf_iou, max_detections=max_detections)
             for parts in per_image]
    if class_agnostic:  # fusion is per class: one label per object after it
        fused = [merge_detections([one], nms_thresh=nms_thresh, max_detections=max_detections,
                                  class_agnostic=True) for one in fused]
    return fused


def fuse_detections(parts: Sequence[dict[str, Tensor]], *, iou_thresh: float,
                    max_detections: int) -> dict[str, Tensor]:
    """Weighted box fusion (Solovyev et al., 2019) of one image's detection sets, one per view
    ({"boxes" (n, 4) xyxy in the same pixels, "scores" (n,), "labels" (n,)}) -> one set, best first.

    By decreasing score, each detection joins the first cluster of its class whose fused box it
    overlaps by more than `iou_thresh`, else starts one. A cluster's box is the score-weighted mean
    of its members' boxes; its score is their mean score times min(members, views) / views, so a
    box that only one view found counts for less than one every view agrees on (NMS keeps the best
    box as it is and its score unchanged)."""
    boxes = torch.cat([p["boxes"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    order = scores.argsort(descending=True)
    fused: list[Tensor] = []  # per cluster: the fused box (4,)
    members: list[list[int]] = []  # per cluster: indices into boxes
    cluster_labels: list[int] = []
    for i in order.tolist():
        label = int(labels[i])
        same = [c for c, cl in enumerate(cluster_labels) if cl == label]
        if same:
            overlap = pairwise_iou(boxes[i:i + 1], torch.stack([fused[c] for c in same]))[0]
            best = int(overlap.argmax())
            if overlap[best] > iou_thresh:
                c = same[best]
                members[c].append(i)
                weights = scores[members[c]]
                fused[c] = (boxes[members[c]] * weights[:, None]).sum(0) / weights.sum()
                continue
        fused.append(boxes[i])
        members.append([i])
        cluster_labels.append(label)
    views = len(parts)
    if not fused:
        return {"boxes": boxes[:0], "scores": scores[:0], "labels": labels[:0]}
    fused_scores = torch.stack([scores[m].mean() * min(len(m), views) / views for m in members])
    keep = fused_scores.argsort(descending=True)[:max_detections]
    return {"boxes": torch.stack(fused)[keep], "scores": fused_scores[keep],
            "labels": torch.tensor(cluster_labels, dtype=labels.dtype, device=labels.device)[keep]}
