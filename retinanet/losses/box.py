"""Box regression losses over positive anchors, summed (the criterion normalises)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss


def smooth_l1_loss(pred_deltas: Tensor, target_deltas: Tensor, beta: float,
                   mask: Optional[Tensor] = None) -> Tensor:
    """(N, 4), (N, 4) -> scalar sum, over the rows where mask (N,) is True. beta == 0 is plain L1:
    smooth-L1's 0.5 x^2 / beta branch would divide by zero and give NaN gradients through
    torch.where."""
    reduction = "sum" if mask is None else "none"
    if beta < 1e-5:
        loss = F.l1_loss(pred_deltas.float(), target_deltas, reduction=reduction)
    else:
        loss = F.smooth_l1_loss(pred_deltas.float(), target_deltas, beta=beta, reduction=reduction)
    return loss if mask is None else torch.where(mask[:, None], loss, torch.zeros_like(loss)).sum()


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """(N, 4), (N, 4) xyxy -> scalar sum of 1 - GIoU, over the rows where mask (N,) is True."""
    if mask is None:
        return generalized_box_iou_loss(pred_boxes.float(), target_boxes.float(), reduction="sum")
    per_box = generalized_box_iou_loss(pred_boxes.float(), target_boxes.float(), reduction="none")
    return torch.where(mask, per_box, torch.zeros_like(per_box)).sum()
