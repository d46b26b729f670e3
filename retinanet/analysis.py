"""Anchor coverage: how well a set of anchors can match a dataset's ground-truth boxes.

A box is *covered* when its best anchor has IoU >= the matcher's `fg_iou`: it then gets ordinary
positive anchors. A box below that is trained only through low-quality matching (its best anchor
is made positive whatever the IoU, with `model.matcher.allow_low_quality`), or not at all without
it, so a size bucket with low coverage is one the detector learns badly.

Everything here is tensor code on boxes and anchors (xyxy pixels of the resized image) plus the
arithmetic of the test/train resize; `tools/analyze_anchors.py` reads the dataset and prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .boxes import broadcast_iou, padded_size, pairwise_iou, resize_scale
from .model.anchors import AnchorGenerator

# COCO's size buckets, by box area (COCOeval measures the mask area; here it is the box's).
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, math.inf))
SIZE_BUCKET_NAMES = tuple(name for name, _, _ in SIZE_BUCKETS)

# IoU pairs per chunk of ground-truth boxes: pairwise_iou keeps a few floats per pair, so this
# bounds a chunk's memory whatever the image size (COCO at 800 px has ~200k anchors).
MAX_IOU_PAIRS = 4_000_000


# --------------------------------------------------------------------------------------------
# Per set of anchors
# --------------------------------------------------------------------------------------------
def best_anchor_iou(anchors: Tensor, gt_boxes: Tensor,
                    max_pairs: int = MAX_IOU_PAIRS) -> tuple[Tensor, Tensor]:
    """anchors (A, 4), gt_boxes (N, 4) xyxy -> (best_iou (N,) float32, best_index (N,) int64):
    each box's highest IoU over all anchors and that anchor's index (-1 when there are no anchors).

    The (N, A) IoU matrix is computed for chunks of boxes of at most `max_pairs` pairs, so memory
    stays bounded for big images and many boxes."""
    gt_boxes, anchors = gt_boxes.reshape(-1, 4).float(), anchors.reshape(-1, 4).float()
    num_boxes, num_anchors = gt_boxes.shape[0], anchors.shape[0]
    best_iou = torch.zeros(num_boxes, dtype=torch.float32, device=gt_boxes.device)
    best_index = torch.full((num_boxes,), -1, dtype=torch.int64, device=gt_boxes.device)
    if num_boxes == 0 or num_anchors == 0:
        return best_iou, best_index
    rows = max(1, max_pairs // num_anchors)
    for start in range(0, num_boxes, rows):
        iou = pairwise_iou(gt_boxes[start:start + rows], anchors.to(gt_boxes.device))  # (rows, A)
        best_iou[start:start + rows], best_index[start:start + rows] = iou.max(dim=1)
    return best_iou, best_index


def anchor_levels(num_anchors_per_level: Sequence[int]) -> Tensor:
    """[A_l] -> (A,) int64 level index (0 = the first level) of every anchor."""
    counts = torch.as_tensor(list(num_anchors_per_level), dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def size_buckets(boxes: Tensor) -> Tensor:
    """boxes (N, 4) xyxy -> (N,) int64 index into SIZE_BUCKETS by box area (w * h)."""
    boxes = boxes.reshape(-1, 4).float()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    upper = torch.tensor([high for _, _, high in SIZE_BUCKETS[:-1]], dtype=areas.dtype, device=areas.device)
    # right=True: an area equal to a bound (32**2) belongs to the bucket above it, as in COCOeval
    return torch.bucketize(areas, upper, right=True)


def _group_stats(best_iou: Tensor, fg_iou: float) -> dict:
    """best_iou (n,) -> {num_boxes, covered, coverage, median_iou}; None where there are no boxes."""
    count = int(best_iou.numel())
    covered = int((best_iou >= fg_iou).sum())
    return {"num_boxes": count, "covered": covered,
            "coverage": covered / count if count else None,
            # the interpolated median (the mean of the two middle values for even counts)
            "median_iou": float(torch.quantile(best_iou.float(), 0.5)) if count else None}


def summarize_coverage(best_iou: Tensor, boxes: Tensor, fg_iou: float, best_level: Tensor | None = None,
                       level_names: Sequence[str] | None = None) -> dict:
    """best_iou (N,), boxes (N, 4) xyxy (for their size bucket), best_level (N,) the level index of
    each box's best anchor -> {"fg_iou", "all": stats, "buckets": {name: stats},
    "levels": {name: stats}} with stats = {num_boxes, covered, coverage, median_iou}. Every
    bucket is listed, empty ones with coverage None; levels only when best_level is given."""
    best_iou = best_iou.reshape(-1).float().cpu()
    bucket = size_buckets(boxes).cpu()
    result = {"fg_iou": float(fg_iou), "all": _group_stats(best_iou, fg_iou),
              "buckets": {name: _group_stats(best_iou[bucket == i], fg_iou)
                          for i, (name, _, _) in enumerate(SIZE_BUCKETS)}}
    if best_level is not None:
        best_level = best_level.reshape(-1).cpu()
        if level_names is None:
            level_names = [str(i) for i in range(int(best_level.max()) + 1 if best_level.numel() else 0)]
        result["levels"] = {name: _group_stats(best_iou[best_level == i], fg_iou)
                            for i, name in enumerate(level_names)}
    return result


def anchor_coverage(anchors: Tensor, gt_boxes: Tensor, fg_iou: float = 0.5,
                    num_anchors_per_level: Sequence[int] | None = None,
                    level_names: Sequence[str] | None = None) -> dict:
    """anchors (A, 4), gt_boxes (N, 4) xyxy in the same (resized) image -> summarize_coverage's
    dict. With num_anchors_per_level (anchors ordered by level, as AnchorGenerator returns them)
    it also reports per level, a box counting at the level of its best anchor."""
    best_iou, best_index = best_anchor_iou(anchors, gt_boxes)
    best_level = None
    if num_anchors_per_level is not None:
        if sum(num_anchors_per_level) != anchors.shape[0]:
            raise ValueError(f"num_anchors_per_level sums to {sum(num_anchors_per_level)} but there "
                             f"are {anchors.shape[0]} anchors")
        best_level = anchor_levels(num_anchors_per_level)[best_index.clamp(min=0).cpu()]
    return summarize_coverage(best_iou, gt_boxes, fg_iou, best_level, level_names)


# --------------------------------------------------------------------------------------------
# Over a dataset: images resized as the transforms do, anchors per padded size
# --------------------------------------------------------------------------------------------
def resized_size(height: int, width: int, min_size: int, max_size: int, *,
                 train: bool = False) -> tuple[int, int]:
    """The (h, w) the transforms resize an image to: scale = min(min_size / shorter side,
    max_size / longer side), then side * scale floored at test time (EvalTransform's torch
    interpolate) and rounded in training (albumentations' MaxSizeTransform, at least 1 px)."""
    scale = resize_scale(height, width, min_size, max_size)
    if train:
        return max(1, round(height * scale)), max(1, round(width * scale))
    return int(height * scale), int(width * scale)


def feature_sizes(height: int, width: int, size_divisibility: int,
                  strides: Sequence[int]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Padded input size (H, W) of a one-image batch (padded_size) and the (H_l, W_l) of each
    level: the ResNet/FPN stride-2 convolutions give ceil(H / stride)."""
    height, width = padded_size(height, width, size_divisibility)
    return (height, width), [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


@dataclass
class ResizedBoxes:
    """A dataset's boxes in the resized images, grouped by padded input size (anchors depend on
    nothing else): groups maps (H, W) -> boxes (n, 4) xyxy of all images of that size."""
    groups: dict[tuple[int, int], Tensor]
    num_images: int

    @property
    def boxes(self) -> Tensor:
        """(N, 4): all boxes, in the order best_ious() returns their IoUs."""
        return torch.cat(list(self.groups.values())) if self.groups else torch.zeros(0, 4)


def resize_dataset_boxes(images: Iterable[tuple[int, int, Tensor]], *, min_size: int, max_size: int,
                         size_divisibility: int, train: bool = False) -> ResizedBoxes:
    """images: (height, width, boxes (n, 4) xyxy in file pixels) per image -> ResizedBoxes, with
    resized_size(..., train=train). Each image is its own batch (padded alone): anchors past the
    image's padded edge in a larger batch lie outside the image and rarely change a box's best IoU."""
    grouped: dict[tuple[int, int], list[Tensor]] = {}
    count = 0
    for height, width, boxes in images:
        count += 1
        new_h, new_w = resized_size(height, width, min_size, max_size, train=train)
        scale = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
        padded, _ = feature_sizes(new_h, new_w, size_divisibility, [1])
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        grouped.setdefault(padded, []).append(boxes * scale)
    return ResizedBoxes({size: torch.cat(parts) for size, parts in grouped.items()}, count)


def best_ious(generator: AnchorGenerator, resized: ResizedBoxes) -> tuple[Tensor, Tensor]:
    """Best anchor IoU (N,) and its level index (N,) of every box of `resized` (in its order)
    for the anchors `generator` makes at each padded size (grid_best_anchor_iou: exact, and fast
    enough to score dozens of anchor settings on thousands of COCO images)."""
    ious, levels = [torch.zeros(0)], [torch.zeros(0, dtype=torch.int64)]
    for padded, boxes in resized.groups.items():
        _, sizes = feature_sizes(padded[0], padded[1], 1, generator.strides)
        anchors = generator(sizes, torch.device("cpu"), image_size=padded)
        iou, index = grid_best_anchor_iou(anchors, sizes, boxes)
        ious.append(iou)
        levels.append(anchor_levels(generator.num_anchors_per_level(sizes))[index.clamp(min=0)])
    return torch.cat(ious), torch.cat(levels)


def grid_best_anchor_iou(anchors: Tensor, feature_sizes: Sequence[tuple[int, int]],
                         gt_boxes: Tensor, max_boxes: int = 50_000) -> tuple[Tensor, Tensor]:
    """best_anchor_iou for anchors laid out as AnchorGenerator makes them (level, y, x, type on
    a grid of feature_sizes [(H_l, W_l)]), without the (N, A) matrix: same (best_iou (N,),
    best_index (N,)), up to which of equally good anchors is named.

    Why it is exact: for one anchor shape, the overlap along x only shrinks as the centres move
    apart along x (and likewise along y), and IoU grows with the overlap, so the best anchor of
    each shape sits at the grid column and row whose centres are nearest the box centre. Only
    the two columns and two rows around it are checked, per level and anchor type: N x L x T x 4
    pairs instead of N x A (A is ~200k anchors for an 800 x 1333 input), `max_boxes` boxes at a
    time (~40 MB with 9 anchor types)."""
    gt_boxes = gt_boxes.reshape(-1, 4).float()
    if gt_boxes.shape[0] > max_boxes:
        parts = [grid_best_anchor_iou(anchors, feature_sizes, chunk, max_boxes)
                 for chunk in gt_boxes.split(max_boxes)]
        return torch.cat([iou for iou, _ in parts]), torch.cat([index for _, index in parts])
    num_boxes = gt_boxes.shape[0]
    best_iou = torch.zeros(num_boxes)
    best_index = torch.full((num_boxes,), -1, dtype=torch.int64)
    cells = sum(h * w for h, w in feature_sizes)
    if num_boxes == 0 or cells == 0:
        return best_iou, best_index
    if anchors.shape[0] % cells:
        raise ValueError(f"{anchors.shape[0]} anchors do not fit {cells} grid cells of {list(feature_sizes)}")
    types = anchors.shape[0] // cells
    centre_x = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
    centre_y = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    start = 0
    for height, width in feature_sizes:
        if height * width == 0:
            continue
        grid = anchors[start:start + height * width * types].float().reshape(height, width, types, 4)
        cols = _nearest_two(((grid[0, :, :, 0] + grid[0, :, :, 2]) / 2).T, centre_x)  # (T, N, 2)
        rows = _nearest_two(((grid[:, 0, :, 1] + grid[:, 0, :, 3]) / 2).T, centre_y)  # (T, N, 2)
        type_idx = torch.arange(types)[:, None, None, None]
        # (T, N, 2 rows, 2 cols) indices into the whole anchor tensor
        index = start + (rows[..., :, None] * width + cols[..., None, :]) * types + type_idx
        iou = broadcast_iou(anchors[index].float(), gt_boxes[None, :, None, None])
        level_iou, flat = iou.permute(1, 0, 2, 3).reshape(num_boxes, -1).max(dim=1)
        level_index = index.permute(1, 0, 2, 3).reshape(num_boxes, -1).gather(1, flat[:, None])[:, 0]
        better = level_iou > best_iou  # strict: ties keep the earlier level, as argmax would
        best_iou = torch.where(better, level_iou, best_iou)
        best_index = torch.where(better, level_index, best_index)
        start += height * width * types
    # a box overlapping no anchor at all still names one, as best_anchor_iou's argmax does
    best_index[best_index < 0] = 0
    return best_iou, best_index


def _nearest_two(centres: Tensor, values: Tensor) -> Tensor:
    """centres (T, K) ascending per row, values (N,) -> (T, N, 2) indices of the centres just
    below and just above each value (clamped to the row)."""
    above = torch.searchsorted(centres.contiguous(), values[None].expand(centres.shape[0], -1).contiguous())
    last = centres.shape[1] - 1
    return torch.stack([(above - 1).clamp(0, last), above.clamp(0, last)], dim=-1)


def level_names(strides: Sequence[int]) -> list[str]:
    """[8, 16, ...] -> ["P3", "P4", ...] (level = log2 of the stride)."""
    return [f"P{int(round(math.log2(s)))}" for s in strides]


def dataset_coverage(generator: AnchorGenerator, resized: ResizedBoxes, fg_iou: float) -> dict:
    """summarize_coverage over all boxes of a dataset, per size bucket and per pyramid level."""
    iou, level = best_ious(generator, resized)
    return summarize_coverage(iou, resized.boxes, fg_iou, level, level_names(generator.strides))


# --------------------------------------------------------------------------------------------
# Suggestions: candidate anchor settings scored on the same boxes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnchorSetting:
    """The part of model.anchors that the search varies (strides, offset and rounding stay)."""
    sizes: tuple[float, ...]
    octave_scales: tuple[float, ...]
    aspect_ratios: tuple[float, ...]

    @property
    def anchors_per_location(self) -> int:
        return len(self.octave_scales) * len(self.aspect_ratios)

    def generator(self, *, strides: Sequence[int], offset: float = 0.0, round_base: bool = False,
                  stride_from_image: bool = False) -> AnchorGenerator:
        return AnchorGenerator(sizes=self.sizes, octave_scales=self.octave_scales,
                               aspect_ratios=self.aspect_ratios, strides=strides, offset=offset,
                               round_base=round_base, stride_from_image=stride_from_image)

    def overrides(self) -> list[str]:
        """Command-line overrides that select this setting."""
        def fmt(values):
            return "[" + ",".join(f"{v:.4g}" for v in values) + "]"
        return [f"model.anchors.sizes={fmt(self.sizes)}",
                f"model.anchors.octave_scales={fmt(self.octave_scales)}",
                f"model.anchors.aspect_ratios={fmt(self.aspect_ratios)}"]


# Octave-scale sets tried: the paper's 3 per octave, and 4 per octave (denser in size).
OCTAVE_CHOICES = ((1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (1.0, 2 ** 0.25, 2 ** 0.5, 2 ** 0.75))
# Base sizes tried: the current ones times these (halving catches small boxes, doubling large).
SIZE_FACTORS = (0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0)


def aspect_ratio_quantiles(boxes: Tensor, quantiles: Sequence[float]) -> tuple[float, ...]:
    """Height / width of boxes (N, 4) at the given quantiles, rounded to 2 decimals, distinct."""
    boxes = boxes.reshape(-1, 4).float()
    ratios = (boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    if ratios.numel() == 0:
        return (1.0,)
    values = torch.quantile(ratios, torch.tensor(list(quantiles), dtype=torch.float32))
    return tuple(sorted({round(float(v), 2) for v in values}))


def candidate_settings(current: AnchorSetting, boxes: Tensor) -> list[AnchorSetting]:
    """Variations of `current`: base sizes scaled by SIZE_FACTORS x octave scales (current and
    OCTAVE_CHOICES) x aspect ratios (current, [0.5, 1, 2], and the boxes' own height/width at the
    10/50/90% and 5/25/50/75/95% quantiles). `current` comes first; duplicates are removed."""
    ratio_choices = [current.aspect_ratios, (0.5, 1.0, 2.0),
                     aspect_ratio_quantiles(boxes, (0.1, 0.5, 0.9)),
                     aspect_ratio_quantiles(boxes, (0.05, 0.25, 0.5, 0.75, 0.95))]
    octave_choices = [current.octave_scales, *OCTAVE_CHOICES]
    def key(setting: AnchorSetting) -> tuple:
        return (tuple(round(s, 2) for s in setting.sizes), tuple(round(o, 4) for o in setting.octave_scales),
                tuple(round(r, 2) for r in setting.aspect_ratios))

    seen, settings = {key(current)}, [current]
    for factor in SIZE_FACTORS:
        sizes = tuple(round(s * factor, 2) for s in current.sizes)
        for octaves in octave_choices:
            for ratios in ratio_choices:
                setting = AnchorSetting(sizes, tuple(octaves), tuple(ratios))
                if key(setting) not in seen:
                    seen.add(key(setting))
                    settings.append(setting)
    return settings


def rank_settings(results: Sequence[tuple[AnchorSetting, dict]],
                  target: float) -> list[tuple[AnchorSetting, dict]]:
    """Orders (setting, summarize_coverage dict) best first. Settings that bring every non-empty
    size bucket to `target` come first, the fewest anchors per location among them first (each
    anchor costs head compute and negatives); then the rest by overall coverage. Ties: higher
    overall coverage, then fewer anchors per location, then the original order."""
    def key(item):
        index, (setting, summary) = item
        buckets = [b["coverage"] for b in summary["buckets"].values() if b["coverage"] is not None]
        meets = all(c >= target for c in buckets)
        overall = summary["all"]["coverage"] or 0.0
        return (not meets, setting.anchors_per_location if meets else 0, -overall,
                setting.anchors_per_location, index)
    return [item for _, item in sorted(enumerate(results), key=key)]


def search_anchor_settings(current: AnchorSetting, resized: ResizedBoxes, fg_iou: float, *, target: float,
                           strides: Sequence[int], offset: float = 0.0, round_base: bool = False,
                           stride_from_image: bool = False) -> list[tuple[AnchorSetting, dict]]:
    """Scores every candidate_settings() on the boxes of `resized` -> ranked (setting, summary)."""
    results = []
    for setting in candidate_settings(current, resized.boxes):
        generator = setting.generator(strides=strides, offset=offset, round_base=round_base,
                                      stride_from_image=stride_from_image)
        results.append((setting, dataset_coverage(generator, resized, fg_iou)))
    return rank_settings(results, target)


# --------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------
def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_coverage(summary: dict) -> str:
    """summarize_coverage's dict -> a table: one row for all boxes, each size bucket, each level."""
    rows = [("all boxes", summary["all"])]
    rows += [(f"{name} ({_bucket_range(name)})", stats) for name, stats in summary["buckets"].items()]
    rows += [(f"best anchor in {name}", stats) for name, stats in summary.get("levels", {}).items()]
    lines = [f"{'group':<24} {'boxes':>8} {'covered':>8} {'coverage':>9} {'median IoU':>11}"]
    for name, s in rows:
        median = "-" if s["median_iou"] is None else f"{s['median_iou']:.3f}"
        lines.append(f"{name:<24} {s['num_boxes']:>8} {s['covered']:>8} "
                     f"{_percent(s['coverage']):>9} {median:>11}")
    return "\n".join(lines)


def _bucket_range(name: str) -> str:
    low, high = next((lo, hi) for n, lo, hi in SIZE_BUCKETS if n == name)
    return f"area < {math.isqrt(int(high))}^2" if low == 0 else \
        f">= {math.isqrt(int(low))}^2" if high == math.inf else f"< {math.isqrt(int(high))}^2"


def format_candidates(ranked: Sequence[tuple[AnchorSetting, dict]], count: int = 5) -> str:
    """The first `count` ranked settings with their coverage per bucket."""
    names = list(SIZE_BUCKET_NAMES)
    lines = [f"{'#':>2} {'all':>7} " + " ".join(f"{n:>7}" for n in names)
             + "  per loc  sizes x octave scales x aspect ratios"]
    for i, (setting, summary) in enumerate(ranked[:count], 1):
        cells = " ".join(f"{_percent(summary['buckets'][n]['coverage']):>7}" for n in names)
        lines.append(f"{i:>2} {_percent(summary['all']['coverage']):>7} {cells} "
                     f"{setting.anchors_per_location:>8}  "
                     f"{_fmt(setting.sizes)} x {_fmt(setting.octave_scales)} x {_fmt(setting.aspect_ratios)}")
    return "\n".join(lines)


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"
