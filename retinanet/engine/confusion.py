"""A detection confusion matrix: which class each object was detected as, at one IoU and score."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..boxes import pairwise_iou


def confusion_matrix(detections: Mapping[int, Mapping[str, torch.Tensor]],
                     targets: Mapping[int, tuple[np.ndarray, np.ndarray]], num_classes: int, *,
                     iou_thresh: float = 0.5, score_thresh: float = 0.25) -> np.ndarray:
    """Per image id, detections {"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,) in 0..K-1} and
    targets (boxes (M, 4) xyxy, labels (M,)) in the same pixels -> counts (K + 1, K + 1) int64:
    row = true class, column = detected class; index K is background (row K: detections of no
    object, false positives; column K: objects nothing detected, misses).

    Detections scoring at least `score_thresh` are matched to objects whatever their classes, one
    to one, pairs of higher IoU first (IoU >= `iou_thresh`), so that a right box with a wrong
    class counts as a confusion, not as a miss plus a false positive."""
    counts = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for image_id, (gt_boxes, gt_labels) in targets.items():
        found = detections.get(image_id)
        keep = found["scores"] >= score_thresh if found is not None else None
        boxes = found["boxes"][keep].float() if found is not None else torch.zeros(0, 4)
        labels = found["labels"][keep].numpy() if found is not None else np.zeros(0, np.int64)
        iou = pairwise_iou(torch.as_tensor(gt_boxes, dtype=torch.float32), boxes.cpu()).numpy()  # (M, N)
        objects, dets = np.nonzero(iou >= iou_thresh)
        order = np.argsort(-iou[objects, dets], kind="stable")
        matched_objects, matched_dets = set(), set()
        for m, n in zip(objects[order], dets[order]):
            if m not in matched_objects and n not in matched_dets:
                matched_objects.add(m)
                matched_dets.add(n)
                counts[gt_labels[m], labels[n]] += 1
        for m in set(range(len(gt_labels))) - matched_objects:
            counts[gt_labels[m], num_classes] += 1
        for n in set(range(len(labels))) - matched_dets:
            counts[num_classes, labels[n]] += 1
    return counts
