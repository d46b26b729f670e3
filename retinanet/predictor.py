"""The one inference path: detections from the network's outputs, written once.

`PostProcessor.padded` is the rule, for the whole batch at once: per level, the top-k candidates
of each image (k = min(topk_candidates, A_l * K)) above the score threshold; decode; clip; one
`batched_nms` for the batch (per image and class; per image with `class_agnostic`); the best
`max_detections` of each image. It runs eagerly, scripted and traced. Its outputs,
D = max_detections, best first in each image: boxes (B, D, 4) float32 xyxy, scores (B, D),
labels (B, D) int64 in 0..K-1, num_detections (B,) int64; rows from num_detections on are
padding (zeros, label -1). Calling a `PostProcessor` gives each image's rows, rescaled (Detector,
evaluation). `Predictor` is the network, the anchors of its feature maps' shapes and the rule in
one module: the graph `export` writes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .boxes import BoxCoder, clip_boxes
from .config import Config
from .model import RetinaNet

# Scores per block in batched_topk: the k best blocks hold k * _TOPK_BLOCK candidates.
_TOPK_BLOCK = 64


class PostProcessor(nn.Module):
    """__call__(cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4), num_anchors_per_level,
    image_sizes [(h, w)] of the resized images, output_sizes [(h, w)] to rescale boxes to, or None)
    -> per image {"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,) in 0..K-1}, by score:
    the rows of `padded`, with boxes clipped to each image's size and then rescaled.
    """

    __annotations__ = {"box_coder": BoxCoder}  # so that TorchScript compiles the class

    def __init__(self, *, box_coder: BoxCoder, score_thresh: float = 0.05,
                 topk_candidates: int = 1000, nms_thresh: float = 0.5, max_detections: int = 100,
                 activation: str = "sigmoid", class_agnostic: bool = False):
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        self.box_coder, self.activation = box_coder, activation
        self.score_thresh, self.topk_candidates = float(score_thresh), int(topk_candidates)
        self.nms_thresh, self.max_detections = float(nms_thresh), int(max_detections)
        self.class_agnostic = bool(class_agnostic)

    @torch.jit.unused
    @torch.no_grad()
    def forward(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor,
                num_anchors_per_level: Sequence[int], image_sizes: Sequence[tuple[int, int]],
                output_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[dict[str, Tensor]]:
        levels = list(num_anchors_per_level)
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=cls_logits.device).reshape(-1, 2)
        boxes, scores, labels, image_idx = self.detections(
            list(cls_logits.split(levels, dim=1)), list(box_deltas.split(levels, dim=1)),
            list(anchors.split(levels)), sizes)
        # padded's rows without the padding: the same rank rule, cut instead of slotted
        order, image_sorted, rank, per_image = _rank_in_image(image_idx, sizes.shape[0])
        fits = rank < self.max_detections
        keep, image_idx = order[fits], image_sorted[fits]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if output_sizes is not None:
            out = torch.tensor(output_sizes, dtype=torch.float32, device=sizes.device).reshape(-1, 2)
            boxes = boxes * (out / sizes)[image_idx][:, [1, 0, 1, 0]]  # (sy, sx) per box
        counts = per_image.clamp(max=self.max_detections).tolist()
        return [{"boxes": b, "scores": s, "labels": lab}
                for b, s, lab in zip(boxes.split(counts), scores.split(counts), labels.split(counts))]

    def padded(self, cls_logits: List[Tensor], box_deltas: List[Tensor], anchors: List[Tensor],
               image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per level cls_logits [(B, A_l, K)], box_deltas [(B, A_l, 4)], anchors [(A_l, 4)], and
        image_sizes (B, 2) (h, w) to clip each image's boxes to -> (boxes (B, D, 4), scores (B, D),
        labels (B, D) int64, num_detections (B,) int64), padded as the module docstring says."""
        boxes, scores, labels, image_idx = self.detections(cls_logits, box_deltas, anchors, image_sizes)
        return _pad_per_image(boxes, scores, labels, image_idx, cls_logits[0].shape[0],
                              self.max_detections)

    def detections(self, cls_logits: List[Tensor], box_deltas: List[Tensor], anchors: List[Tensor],
                   image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """padded's inputs -> the whole batch's detections after NMS, by decreasing score: boxes
        (N, 4), scores (N,), labels (N,), image_idx (N,), before the per-image limit."""
        num_classes = cls_logits[0].shape[-1]
        softmax = self.activation == "softmax"
        all_boxes, all_scores, all_labels, all_images = [], [], [], []  # List[Tensor] in TorchScript
        for level, logits in enumerate(cls_logits):
            logits = logits.float()
            # Sigmoid is monotonic: rank raw logits and convert only the k kept. Softmax scores
            # depend on the anchor's other logits, so they are computed before ranking.
            ranking = (softmax_scores(logits) if softmax else logits).flatten(1)  # (B, A_l * K)
            # top-k over everything then the threshold selects the same set as the threshold
            # then top-k (the published order), with one top-k call for all images.
            top, flat_idx = _topk(ranking, self.topk_candidates)  # (B, k)
            scores = top if softmax else top.sigmoid()
            keep = scores > self.score_thresh
            image_idx = torch.arange(top.shape[0], device=top.device)[:, None].expand_as(flat_idx)[keep]
            flat_idx = flat_idx[keep]
            anchor_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
            all_boxes.append(self.box_coder.decode(box_deltas[level][image_idx, anchor_idx],
                                                   anchors[level][anchor_idx]))
            all_scores.append(scores[keep])
            all_labels.append(flat_idx % num_classes)
            all_images.append(image_idx)
        boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
        labels, image_idx = torch.cat(all_labels), torch.cat(all_images)
        sizes = image_sizes.to(device=boxes.device, dtype=torch.float32)[image_idx]  # (N, 2)
        boxes = clip_boxes(boxes, sizes[:, 0], sizes[:, 1])
        groups = image_idx if self.class_agnostic else image_idx * num_classes + labels
        keep = batched_nms(boxes, scores, groups, self.nms_thresh)
        return boxes[keep], scores[keep], labels[keep], image_idx[keep]


class Predictor(nn.Module):
    """forward(images (B, 3, H, W) normalised and padded) -> `postprocessor.padded`'s outputs for
    `model`'s network per level and the anchors of its feature maps' shapes, boxes clipped to the
    padded size. Runs eagerly, traced for ONNX (every size a tensor, so batch, height and width
    stay dynamic) and scripted with the network traced (`export.export_torchscript`)."""

    def __init__(self, model: RetinaNet, *, postprocessor: PostProcessor):
        super().__init__()
        self.network, self.postprocessor = model, postprocessor
        # held here too: the scripted graph calls its grid, while the network in it is traced
        self.anchor_generator = model.anchor_generator

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        cls_logits, box_deltas, features = self.network.forward_levels(images)
        anchors = self.anchor_generator.from_shapes(features, images)
        # (H, W) as a tensor in every mode: eager shapes are ints, traced ones 0-dim tensors
        size = torch._shape_as_tensor(images)[-2:].to(device=images.device, dtype=torch.float32)
        return self.postprocessor.padded(cls_logits, box_deltas, anchors, size.expand(images.shape[0], 2))


def merge_detections(parts: Sequence[dict[str, Tensor]], *, nms_thresh: float,
                     max_detections: int, class_agnostic: bool = False) -> dict[str, Tensor]:
    """Detection sets of one image {"boxes" (n, 4) xyxy in the same pixels, "scores", "labels"}
    -> one set, by one per-class NMS over all of them (torchvision batched_nms; across classes
    with `class_agnostic`), the best `max_detections` kept, best first."""
    boxes = torch.cat([p["boxes"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    keep = batched_nms(boxes, scores, torch.zeros_like(labels) if class_agnostic else labels,
                       nms_thresh)[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _pad_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, image_idx: Tensor, batch: int,
                   limit: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detections (N, ...) of the whole batch, by decreasing score -> the first `limit` of each
    image in (B, limit, ...) slots, padded with zeros and label -1, and the counts (B,)."""
    order, image_sorted, rank, per_image = _rank_in_image(image_idx, batch)
    fits = rank < limit
    slot = (image_sorted * limit + rank)[fits]
    source = order[fits]
    out_boxes = torch.zeros([batch * limit, 4], dtype=boxes.dtype, device=boxes.device)
    out_scores = torch.zeros([batch * limit], dtype=scores.dtype, device=scores.device)
    out_labels = torch.full([batch * limit], -1, dtype=torch.int64, device=labels.device)
    out_boxes[slot] = boxes[source]
    out_scores[slot] = scores[source]
    out_labels[slot] = labels[source]
    return (out_boxes.reshape(batch, limit, 4), out_scores.reshape(batch, limit),
            out_labels.reshape(batch, limit), per_image.clamp(max=limit))


def _rank_in_image(image_idx: Tensor, batch: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """image_idx (N,) of detections by decreasing score -> order (N,) grouping them by image with
    the score order kept, the image of each (N,), each one's rank within its image (N,), and the
    count per image (B,)."""
    num_kept = image_idx.shape[0]
    position = torch.arange(num_kept, device=image_idx.device)
    # The keys are unique, so any sort (ONNX TopK is not stable) gives a stable sort's order.
    order = torch.argsort(image_idx * num_kept + position)
    per_image = torch.zeros([batch], dtype=torch.int64, device=image_idx.device)
    per_image = per_image.scatter_add(0, image_idx, torch.ones_like(image_idx))  # (B,)
    first = per_image.cumsum(0) - per_image  # where each image starts in `order`
    image_sorted = image_idx[order]
    return order, image_sorted, position - first[image_sorted], per_image


def softmax_scores(logits: Tensor) -> Tensor:
    """(..., K) logits -> (..., K) probabilities of a softmax over K + 1 classes with the
    background logit fixed at 0 (see SoftmaxFocalLoss)."""
    background = torch.zeros_like(logits[..., :1])
    return torch.cat([logits, background], dim=-1).softmax(dim=-1)[..., :-1]


def _topk(ranking: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """The k = min(topk, n) largest of each row of ranking (B, n) and their columns: eagerly by
    batched_topk; under the tracer with a 0-dim tensor k (which ops accept for an int), so that
    ONNX's TopK gets a k that follows the input size instead of the example's."""
    if not torch.jit.is_scripting():  # TorchScript skips this block, and its types
        if torch.jit.is_tracing():
            k = torch.clamp(torch._shape_as_tensor(ranking)[1], max=topk)
            return ranking.topk(k, dim=1)  # type: ignore[call-overload]
        return batched_topk(ranking, min(topk, ranking.shape[1]))
    return ranking.topk(min(topk, ranking.shape[1]), dim=1)


def batched_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """values (B, n) -> the k largest of each row (B, k), sorted, and their column indices (B, k):
    torch.topk's result (up to which of tied values is picked), faster on CPU for k << n.

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


def score_activation(config: Config) -> str:
    """How the head's logits become scores: softmax (background logit 0) for softmax_focal."""
    return "softmax" if config.loss.cls.type == "softmax_focal" else "sigmoid"


def build_postprocessor(config: Config) -> PostProcessor:
    """The config's model.postprocess and model.box_coder settings and its loss's score activation."""
    p, coder = config.model.postprocess, config.model.box_coder
    return PostProcessor(box_coder=BoxCoder(coder.weights, coder.clamp), score_thresh=p.score_thresh,
                         topk_candidates=p.topk_candidates, nms_thresh=p.nms_thresh,
                         max_detections=p.max_detections, activation=score_activation(config),
                         class_agnostic=p.class_agnostic)
