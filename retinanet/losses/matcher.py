"""IoU matching of anchors to ground truth, for a whole batch at once."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..boxes import broadcast_iou, pairwise_iou

BACKGROUND = -1
IGNORE = -2


def sync_free(device: torch.device | str) -> bool:
    """Whether matching and loss on `device` should avoid ops whose output size depends on the
    data (nonzero, unique): they make the host wait for the device. On accelerators only; on CPU
    there is nothing to wait for and the sparse forms are faster."""
    return torch.device(device).type != "cpu"


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

    `sync_free`, sync_free(device) for the device it will run on, picks once the second pass
    without nonzero / unique (each a host sync on a GPU) and bigger IoU blocks.
    """

    def __init__(self, *, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality: bool = True,
                 max_iou_elements: Optional[int] = None, sync_free: bool = False):
        if not 0 < bg_iou <= fg_iou <= 1:
            raise ValueError(f"need 0 < bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
        self.fg_iou, self.bg_iou, self.allow_low_quality = fg_iou, bg_iou, allow_low_quality
        # The (B, M, chunk) IoU block is computed for chunks of anchors with at most this many
        # elements. None: 2^18 floats (1 MB) on CPU, where its dozen elementwise passes then run
        # in cache instead of streaming a (B, M, A) matrix through memory; 2^25 (128 MB) when
        # sync_free (a GPU), where fewer, bigger kernels win. Either way the memory is bounded.
        self.max_iou_elements = max_iou_elements or (2 ** 25 if sync_free else 2 ** 18)
        self._add_low_quality = self._low_quality_dense if sync_free else self._low_quality_sparse

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        """anchors (A, 4), gt_boxes (B, M, 4) xyxy, gt_valid (B, M) bool -> matched_idx (B, A) long.

        Rows of gt_boxes that are padding or degenerate must be False in gt_valid: a box with zero
        IoU everywhere would otherwise make every anchor its "best" low-quality match.
        """
        batch, max_boxes = gt_valid.shape
        num_anchors = anchors.shape[0]
        device = anchors.device
        if max_boxes == 0:
            return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.long, device=device)
        gt_flat, anchors = gt_boxes.reshape(-1, 4).float(), anchors.float()
        chunk = max(1, self.max_iou_elements // (batch * max_boxes))
        num_chunks = -(-num_anchors // chunk)

        best_iou = torch.empty(batch, num_anchors, device=device)
        result = torch.empty(batch, num_anchors, dtype=torch.long, device=device)
        # Each box's highest IoU within each chunk: locates its best anchors for the second pass.
        chunk_best = torch.empty(batch * max_boxes, num_chunks, device=device)
        for index in range(num_chunks):
            cols = slice(index * chunk, (index + 1) * chunk)
            iou = pairwise_iou(gt_flat, anchors[cols])  # (B * M, chunk)
            iou.view(batch, max_boxes, -1).masked_fill_(~gt_valid[..., None], -1.0)
            torch.max(iou.view(batch, max_boxes, -1), dim=1, out=(best_iou[:, cols], result[:, cols]))
            torch.amax(iou, dim=1, out=chunk_best[:, index])
        result.masked_fill_(best_iou < self.fg_iou, IGNORE)
        result.masked_fill_(best_iou < self.bg_iou, BACKGROUND)
        if self.allow_low_quality:
            best_per_gt = chunk_best.max(dim=1).values  # (B * M,)
            # Boxes with zero overlap everywhere would make every anchor "best": skip them.
            usable = gt_valid.reshape(-1) & (best_per_gt > 0)
            self._add_low_quality(result, anchors, gt_flat, best_per_gt, usable, chunk_best, chunk)
        return result

    @staticmethod
    def _low_quality_dense(result: Tensor, anchors: Tensor, gt_flat: Tensor, best_per_gt: Tensor,
                               usable: Tensor, chunk_best: Tensor, chunk: int) -> None:
        """_low_quality_sparse without nonzero / unique: every chunk's IoU block is recomputed and
        searched for the boxes' best anchors."""
        batch, num_anchors = result.shape
        max_boxes = best_per_gt.shape[0] // batch
        best_per_gt = best_per_gt.view(batch, max_boxes, 1)
        usable = usable.view(batch, max_boxes, 1)
        for start in range(0, num_anchors, chunk):
            cols = slice(start, start + chunk)
            iou = pairwise_iou(gt_flat, anchors[cols]).view(batch, max_boxes, -1)
            is_best = (iou == best_per_gt) & usable  # (B, M, chunk): anchor is a best anchor of box m
            # Among the boxes an anchor is best for, the one it overlaps most (the first on ties).
            best_for_gt = iou.masked_fill_(~is_best, -1.0).max(dim=1).indices
            result[:, cols] = torch.where(is_best.any(dim=1), best_for_gt, result[:, cols])

    @staticmethod
    def _low_quality_sparse(result: Tensor, anchors: Tensor, gt_flat: Tensor, best_per_gt: Tensor,
                         usable: Tensor, chunk_best: Tensor, chunk: int) -> None:
        """Makes every usable box's best anchors positive, matched to the box they are best for,
        in place in result (B, A); best_per_gt, usable: (B * M,). Only the chunks that hold a
        box's best IoU are revisited, one box against one chunk of anchors each (a few hundred x
        chunk IoUs, not B x M x A)."""
        batch, num_anchors = result.shape
        max_boxes = best_per_gt.shape[0] // batch
        box, where = torch.nonzero((chunk_best == best_per_gt[:, None]) & usable[:, None], as_tuple=True)
        if box.numel() == 0:
            return
        anchor_idx = where[:, None] * chunk + torch.arange(chunk, device=anchors.device)  # (T, chunk)
        inside = anchor_idx < num_anchors
        anchor_idx = anchor_idx.clamp_(max=num_anchors - 1)
        # The same operations as the first pass's pairwise_iou: bit-identical values, so == finds
        # exactly the anchors that reached the box's maximum (ties included).
        iou = broadcast_iou(gt_flat[box][:, None], anchors[anchor_idx])
        pair, col = torch.nonzero((iou == best_per_gt[box][:, None]) & inside, as_tuple=True)
        box, anchor, value = box[pair], anchor_idx[pair, col], iou[pair, col]
        # An anchor best for several boxes goes to the one it overlaps most, the first on ties.
        key = torch.div(box, max_boxes, rounding_mode="floor") * num_anchors + anchor  # into (B, A)
        keys, group = torch.unique(key, return_inverse=True)
        top = torch.full(keys.shape, -1.0, device=anchors.device).scatter_reduce_(0, group, value, "amax")
        winner = value == top[group]
        first = torch.full(keys.shape, max_boxes, dtype=torch.long, device=anchors.device)
        first.scatter_reduce_(0, group[winner], (box % max_boxes)[winner], "amin")
        result.view(-1)[keys] = first
