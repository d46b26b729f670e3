"""IoU matching of anchors to ground truth, for a whole batch at once."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

BACKGROUND = -1
IGNORE = -2


class Matcher:
    """Assigns each anchor the index of its best ground-truth box, or BACKGROUND / IGNORE.

    IoU >= fg_iou: positive; IoU < bg_iou: background; in between: ignored. With
    `allow_low_quality`, every anchor whose IoU with some box equals that box's best IoU over all
    anchors is made positive too (matched to its own best box), so each box with any overlap gets
    at least one positive.
    """

    def __init__(self, *, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality: bool = True):
        if not 0 < bg_iou <= fg_iou <= 1:
            raise ValueError(f"need 0 < bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
        self.fg_iou, self.bg_iou, self.allow_low_quality = fg_iou, bg_iou, allow_low_quality

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        """anchors (A, 4), gt_boxes (B, M, 4) xyxy, gt_valid (B, M) bool -> matched_idx (B, A) long.

        Rows of gt_boxes that are padding or degenerate must be False in gt_valid: a box with zero
        IoU everywhere would otherwise make every anchor its "best" low-quality match.
        """
        batch, max_boxes = gt_valid.shape
        num_anchors = anchors.shape[0]
        if max_boxes == 0:
            return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.long, device=anchors.device)
        iou = box_iou(gt_boxes.reshape(-1, 4).float(), anchors.float()).view(batch, max_boxes, num_anchors)
        iou = iou.masked_fill(~gt_valid[..., None], -1.0)
        best_iou, matched_idx = iou.max(dim=1)  # (B, A)
        result = matched_idx.clone()
        result[best_iou < self.fg_iou] = IGNORE
        result[best_iou < self.bg_iou] = BACKGROUND
        if self.allow_low_quality:
            best_per_gt = iou.max(dim=2).values  # (B, M)
            usable = gt_valid & (best_per_gt > 0)
            is_best = (iou == best_per_gt[..., None]) & usable[..., None]  # (B, M, A)
            low_quality = is_best.any(dim=1)
            result[low_quality] = matched_idx[low_quality]
        return result
