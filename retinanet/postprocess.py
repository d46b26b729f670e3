"""Detections from head outputs, for the whole batch at once.

Per level: score threshold, then the top-k candidates of each image; decode and clip; one
`batched_nms` call for the whole batch (per image and class); keep the best N per image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .boxes import BoxCoder, clip_boxes
from .losses import score_activation


class PostProcessor:
    """__call__(cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4), num_anchors_per_level,
    image_sizes [(h, w)] of the resized images, output_sizes [(h, w)] to rescale boxes to, or None)
    -> per image {"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,) in 0..K-1}, by score.
    """

    def __init__(self, *, box_coder: BoxCoder, score_thresh: float = 0.05,
                 topk_candidates: int = 1000, nms_thresh: float = 0.5, max_detections: int = 100,
                 activation: str = "sigmoid"):
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        self.box_coder, self.activation = box_coder, activation
        self.score_thresh, self.topk_candidates = score_thresh, topk_candidates
        self.nms_thresh, self.max_detections = nms_thresh, max_detections

    @torch.no_grad()
    def __call__(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
                 num_anchors_per_level: Sequence[int], image_sizes: Sequence[tuple[int, int]],
                 output_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[dict[str, Tensor]]:
        batch, _, num_classes = cls_logits.shape
        device = cls_logits.device
        all_boxes, all_scores, all_labels, all_images = [], [], [], []
        start = 0
        for count in num_anchors_per_level:
            logits = cls_logits[:, start:start + count].float()
            # Sigmoid is monotonic: rank raw logits and convert only the k kept. Softmax scores
            # depend on the anchor's other logits, so they are computed before ranking.
            ranking = (logits if self.activation == "sigmoid" else self._softmax_scores(logits))
            ranking = ranking.reshape(batch, -1)  # (B, A_l * K)
            # top-k over everything then the threshold selects the same set as the threshold
            # then top-k (the published order), with one batched top-k call for all images.
            k = min(self.topk_candidates, ranking.shape[1])
            top, flat_idx = batched_topk(ranking, k)  # (B, k)
            scores = top.sigmoid() if self.activation == "sigmoid" else top
            keep = scores > self.score_thresh
            image_idx = torch.arange(batch, device=device)[:, None].expand(batch, k)[keep]
            flat_idx = flat_idx[keep]
            anchor_idx = start + torch.div(flat_idx, num_classes, rounding_mode="floor")
            all_labels.append(flat_idx % num_classes)
            all_scores.append(scores[keep])
            all_images.append(image_idx)
            all_boxes.append(self.box_coder.decode(box_deltas[image_idx, anchor_idx], anchors[anchor_idx]))
            start += count

        boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
        labels, image_idx = torch.cat(all_labels), torch.cat(all_images)
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device).reshape(batch, 2)
        boxes = clip_boxes(boxes, sizes[image_idx, 0], sizes[image_idx, 1])
        keep = batched_nms(boxes, scores, image_idx * num_classes + labels, self.nms_thresh)
        keep = _top_per_image(keep, image_idx, self.max_detections)  # grouped by image, by score
        boxes, scores, labels, image_idx = boxes[keep], scores[keep], labels[keep], image_idx[keep]

        if output_sizes is not None:
            out = torch.tensor(output_sizes, dtype=torch.float32, device=device).reshape(batch, 2)
            scale = (out / sizes)[image_idx]  # (N, 2): (sy, sx)
            boxes = boxes * scale[:, [1, 0, 1, 0]]
        counts = torch.bincount(image_idx, minlength=batch).tolist()
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in
                zip(boxes.split(counts), scores.split(counts), labels.split(counts))]


    @staticmethod
    def _softmax_scores(logits: Tensor) -> Tensor:
        """(B, A_l, K) logits -> (B, A_l, K) probabilities of a softmax over K + 1 classes with
        the background logit fixed at 0 (see SoftmaxFocalLoss)."""
        background = logits.new_zeros(*logits.shape[:-1], 1)
        return torch.cat([logits, background], dim=-1).softmax(dim=-1)[..., :-1]


# Scores per block in batched_topk: the k best blocks hold k * _TOPK_BLOCK candidates.
_TOPK_BLOCK = 64


def batched_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """values (B, n) -> the k largest of each row (B, k), sorted, and their column indices (B, k):
    torch.topk's result (up to which of tied values is picked), several times faster on CPU for
    k << n.

    CPU topk over millions of scores is the bulk of postprocessing. Instead, rows are cut into
    blocks of _TOPK_BLOCK scores: the k-th largest score is at least the k-th largest block
    maximum, so every top-k score lies in one of the k blocks with the largest maxima. One max
    pass, then topk over block maxima and over those k blocks' scores only.
    """
    batch, n = values.shape
    if values.device.type != "cpu" or n < 8 * k * _TOPK_BLOCK or k == 0:
        return values.topk(k, dim=1)
    num_blocks = n // _TOPK_BLOCK
    blocks = values[:, :num_blocks * _TOPK_BLOCK].reshape(batch, num_blocks, _TOPK_BLOCK)
    best_blocks = blocks.amax(dim=2).topk(k, dim=1).indices  # (B, k)
    # the scores of those blocks and their columns, plus the ragged tail (< one block)
    columns = (best_blocks[..., None] * _TOPK_BLOCK + torch.arange(_TOPK_BLOCK, device=values.device))
    columns = torch.cat([columns.reshape(batch, -1), torch.arange(num_blocks * _TOPK_BLOCK, n,
                        device=values.device).expand(batch, -1)], dim=1)
    top, picked = values.gather(1, columns).topk(k, dim=1)
    return top, columns.gather(1, picked)


def _top_per_image(keep: Tensor, image_idx: Tensor, max_per_image: int) -> Tensor:
    """keep: indices sorted by decreasing score -> the first max_per_image of each image,
    grouped by image (stable: still by decreasing score within an image)."""
    order = torch.sort(image_idx[keep], stable=True)
    keep, images = keep[order.indices], order.values
    first_of_image = torch.searchsorted(images, images, right=False)
    rank = torch.arange(len(keep), device=keep.device) - first_of_image
    return keep[rank < max_per_image]


def build_postprocessor(config, box_coder: BoxCoder) -> PostProcessor:
    p = config.model.postprocess
    return PostProcessor(box_coder=box_coder, score_thresh=p.score_thresh,
                         topk_candidates=p.topk_candidates, nms_thresh=p.nms_thresh,
                         max_detections=p.max_detections, activation=score_activation(config))
