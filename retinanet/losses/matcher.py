"""IoU matching of anchors to ground truth, for a whole batch at once."""
from __future__ import annotations

import torch
from torch import Tensor

from ..boxes import pairwise_iou

BACKGROUND = -1
IGNORE = -2


class Matcher:
    """Assigns each anchor a ground-truth box (its row in gt_boxes), BACKGROUND or IGNORE.

    An anchor's IoU with its best box decides: >= fg_iou: positive (matched to that box);
    < bg_iou: background; in between: ignored.

    With `allow_low_quality`, each valid box's *best anchors* (those whose IoU with it equals its
    highest IoU over all anchors, ties included, if that is > 0) are made positive too, and matched
    to the box they are best for, not to the anchor's own best box (mmdetection's choice;
    detectron2 and torchvision keep the anchor's own best box, which leaves a small box with no
    positive when its best anchor overlaps a bigger neighbour more). An anchor that is a best
    anchor of several boxes goes to the one it overlaps most. Hence the guarantee: every valid box
    with any overlap gets at least one positive, unless each of its best anchors is also a best
    anchor of another box (two boxes sharing one anchor cannot both keep it).
    """

    def __init__(self, *, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality: bool = True,
                 max_iou_elements: int = 2 ** 25):
        if not 0 < bg_iou <= fg_iou <= 1:
            raise ValueError(f"need 0 < bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
        self.fg_iou, self.bg_iou, self.allow_low_quality = fg_iou, bg_iou, allow_low_quality
        # Bound on the (B, M, anchors) IoU block held at once (2^25 floats = 128 MB): beyond it
        # the anchors are processed in chunks, and the low-quality pass recomputes each chunk.
        self.max_iou_elements = max_iou_elements

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        """anchors (A, 4), gt_boxes (B, M, 4) xyxy, gt_valid (B, M) bool -> matched_idx (B, A) long.

        Rows of gt_boxes that are padding or degenerate must be False in gt_valid: a box with zero
        IoU everywhere would otherwise make every anchor its "best" low-quality match.
        """
        batch, max_boxes = gt_valid.shape
        num_anchors = anchors.shape[0]
        if max_boxes == 0:
            return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.long, device=anchors.device)
        gt_flat, anchors = gt_boxes.reshape(-1, 4).float(), anchors.float()
        chunk = max(1, self.max_iou_elements // (batch * max_boxes))
        starts = range(0, num_anchors, chunk)

        def iou_block(start: int) -> Tensor:  # (B, M, chunk), -1 on invalid boxes
            block = pairwise_iou(gt_flat, anchors[start:start + chunk]).view(batch, max_boxes, -1)
            return block.masked_fill_(~gt_valid[..., None], -1.0)

        result = torch.empty(batch, num_anchors, dtype=torch.long, device=anchors.device)
        best_per_gt = torch.full((batch, max_boxes, 1), -1.0, device=anchors.device)
        blocks = []
        for start in starts:
            iou = iou_block(start)
            best_iou, matched = iou.max(dim=1)  # (B, chunk)
            matched[best_iou < self.fg_iou] = IGNORE
            matched[best_iou < self.bg_iou] = BACKGROUND
            result[:, start:start + chunk] = matched
            best_per_gt = torch.maximum(best_per_gt, iou.max(dim=2, keepdim=True).values)
            if len(starts) == 1:
                blocks.append(iou)  # one block: keep it rather than recompute it
        if not self.allow_low_quality:
            return result
        # Boxes with zero overlap everywhere would make every anchor "best": skip them.
        usable = gt_valid[..., None] & (best_per_gt > 0)
        for start in starts:
            iou = blocks[0] if blocks else iou_block(start)
            is_best = (iou == best_per_gt) & usable  # (B, M, chunk): anchor is a best anchor of box m
            low_quality = is_best.any(dim=1)  # (B, chunk)
            # Among the boxes an anchor is best for, take the one it overlaps most (the first on
            # ties). In place: the IoU block is not needed any more and is the largest tensor here;
            # max().indices, not argmax(), which is several times slower over this dim on CPU.
            best_for_gt = iou.masked_fill_(~is_best, -1.0).max(dim=1).indices
            result[:, start:start + chunk] = torch.where(low_quality, best_for_gt,
                                                         result[:, start:start + chunk])
        return result
