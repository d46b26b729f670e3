"""RetinaNet training loss: match anchors for the whole batch, then focal + box loss.

No Python loop over images: targets are padded to (B, M_max) and every step is a batched op, so
images with many, few or no boxes share one pass.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from ..boxes import BoxCoder, box_areas_valid
from .box import giou_loss, smooth_l1_loss
from .classification import IGNORE_CLASS, ClassificationLoss, FocalLoss, anchor_class_weights
from .matcher import BACKGROUND, IGNORE, Matcher


def pad_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Lists of (n_i, 4) boxes and (n_i,) labels -> boxes (B, M, 4), labels (B, M), valid (B, M).

    Padding rows and degenerate boxes (non-finite, zero or negative size) are not valid.
    """
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    if max((len(b) for b in boxes), default=0) == 0:
        batch = len(boxes)
        return (torch.zeros(batch, 0, 4, device=device), torch.zeros(batch, 0, dtype=torch.long,
                device=device), torch.zeros(batch, 0, dtype=torch.bool, device=device))
    padded_boxes = pad_sequence([b.float().reshape(-1, 4) for b in boxes], batch_first=True)
    padded_labels = pad_sequence([lab.long() for lab in labels], batch_first=True, padding_value=-1)
    valid = (padded_labels >= 0) & box_areas_valid(padded_boxes)
    return padded_boxes, padded_labels, valid


class RetinaNetCriterion(nn.Module):
    """forward(cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4), gt_boxes, gt_labels)
    -> {"loss_cls", "loss_box", "num_fg"}; the total loss is loss_cls + loss_box (weights applied).

    `sync_free`, matcher.sync_free(device) for the device it will run on, picks once the box loss
    over every anchor (background made exact zeros, no nonzero: a host sync on a GPU) instead of
    over the gathered positives.
    """

    def __init__(self, *, num_classes: int, matcher: Matcher, box_coder: BoxCoder,
                 cls_loss: Optional[ClassificationLoss] = None, cls_weight: float = 1.0,
                 class_weights: Optional[Tensor] = None, box_loss: str = "smooth_l1",
                 smooth_l1_beta: float = 0.1, box_weight: float = 1.0,
                 normalizer_momentum: float = 0.0,
                 reduce_num_fg: Optional[Callable[[Tensor], Tensor]] = None, sync_free: bool = False):
        super().__init__()
        if box_loss not in ("smooth_l1", "l1", "giou"):
            raise ValueError(f"box loss must be smooth_l1, l1 or giou, got {box_loss!r}")
        self.num_classes = num_classes
        self.matcher, self.box_coder = matcher, box_coder
        self.cls_loss = cls_loss if cls_loss is not None else FocalLoss()
        # (K,) class-balanced weights for positives, or None
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.cls_weight, self.box_weight = cls_weight, box_weight
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.normalizer_momentum = normalizer_momentum
        # Detectron2's starting value: about the number of positives of a COCO image batch.
        self.register_buffer("normalizer_ema", torch.tensor(100.0), persistent=True)
        # Under DDP: the mean of num_fg over ranks, so that N ranks x batch b normalise (and,
        # with DDP's gradient averaging, train) like 1 process x batch N*b. Training mode only:
        # in evaluation ranks run different numbers of batches, so a collective would hang.
        self.reduce_num_fg: Callable[[Tensor], Tensor] = reduce_num_fg or (lambda num_fg: num_fg)
        self._positive_box_loss = self._dense_box_loss if sync_free else self._sparse_box_loss

    def forward(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
                gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor]) -> dict[str, Tensor]:
        boxes, labels, valid = pad_targets(gt_boxes, gt_labels)
        boxes, labels, valid = boxes.to(anchors.device), labels.to(anchors.device), valid.to(anchors.device)
        matched_idx = self.matcher(anchors, boxes, valid)  # (B, A)
        fg_mask = matched_idx >= 0
        num_fg = fg_mask.sum()

        # Integer class per anchor: k for a positive of class k, K for background, -1 ignored.
        safe_idx = matched_idx.clamp(min=0)
        classes = torch.gather(labels, 1, safe_idx) if labels.shape[1] else torch.zeros_like(safe_idx)
        classes = torch.where(fg_mask, classes, torch.full_like(classes, self.num_classes))
        classes = classes.masked_fill(matched_idx == IGNORE, IGNORE_CLASS)
        anchor_weights = None if self.class_weights is None else \
            anchor_class_weights(classes, self.class_weights)
        loss_cls = self.cls_loss(cls_logits, classes, anchor_weights)

        # Box loss over positives only; with no positive it is an empty sum that is still connected
        # to the graph, so every parameter keeps a gradient (matters under DDP).
        loss_box = self._positive_box_loss(box_deltas, anchors, boxes, safe_idx, fg_mask)

        normalizer = self._normalizer(num_fg)
        if self.cls_loss.normalized_by_num_fg:
            loss_cls = loss_cls / normalizer
        return {"loss_cls": self.cls_weight * loss_cls,
                "loss_box": self.box_weight * loss_box / normalizer,
                "num_fg": num_fg.detach()}

    def _box_loss(self, pred: Tensor, anchors: Tensor, target_boxes: Tensor,
                  mask: Optional[Tensor] = None) -> Tensor:
        """Summed box loss of deltas (N, 4) at anchors (N, 4) against boxes (N, 4) xyxy, over the
        rows where mask (N,) is True (all when None)."""
        if self.box_loss == "giou":
            return giou_loss(self.box_coder.decode(pred, anchors), target_boxes, mask)
        beta = 0.0 if self.box_loss == "l1" else self.smooth_l1_beta
        return smooth_l1_loss(pred, self.box_coder.encode(anchors, target_boxes), beta, mask)

    def _sparse_box_loss(self, box_deltas: Tensor, anchors: Tensor, boxes: Tensor, safe_idx: Tensor,
                         fg_mask: Tensor) -> Tensor:
        """_box_loss over the positives: deltas (B, A, 4), anchors (A, 4), boxes (B, M, 4),
        safe_idx (B, A) each anchor's box (0 where unmatched), fg_mask (B, A)."""
        batch_idx, anchor_idx = torch.nonzero(fg_mask, as_tuple=True)
        targets = boxes[batch_idx, safe_idx[batch_idx, anchor_idx]] if boxes.shape[1] else \
            boxes.new_zeros(0, 4)
        return self._box_loss(box_deltas[batch_idx, anchor_idx], anchors[anchor_idx], targets)

    def _dense_box_loss(self, box_deltas: Tensor, anchors: Tensor, boxes: Tensor, safe_idx: Tensor,
                        fg_mask: Tensor) -> Tensor:
        """_sparse_box_loss over every anchor of the batch (B, A), background ones made exact
        zeros: no nonzero(), which waits for the GPU to know how many positives there are."""
        batch, num_anchors = fg_mask.shape
        pred = box_deltas.reshape(-1, 4)
        flat_anchors = anchors.expand(batch, num_anchors, 4).reshape(-1, 4)
        if boxes.shape[1] == 0:
            return self._box_loss(pred[:0], flat_anchors[:0], boxes.new_zeros(0, 4)) + 0 * pred.sum()
        fg = fg_mask.reshape(-1)
        target_boxes = torch.gather(boxes, 1, safe_idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        # a background anchor's target is the anchor itself (finite, unlike a padding box); masked out
        target_boxes = torch.where(fg[:, None], target_boxes, flat_anchors)
        return self._box_loss(pred, flat_anchors, target_boxes, fg)

    def _normalizer(self, num_fg: Tensor) -> Tensor:
        num_fg = self.reduce_num_fg(num_fg.float()) if self.training else num_fg.float()
        if self.normalizer_momentum > 0 and self.training:
            m = self.normalizer_momentum
            self.normalizer_ema.mul_(m).add_((1 - m) * num_fg.detach())
            return self.normalizer_ema.clamp(min=1.0)
        return num_fg.clamp(min=1.0)


__all__ = ["RetinaNetCriterion", "pad_targets", "BACKGROUND", "IGNORE"]
