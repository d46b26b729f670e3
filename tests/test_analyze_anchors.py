"""retinanet/analysis.py and tools/analyze_anchors.py: coverage numbers on constructed cases,
the resize arithmetic against the real transforms and model, the suggestion search, the tool."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from retinanet import analysis
from retinanet.config import load_config
from retinanet.data.transforms import DetectionTransform, EvalTransform
from retinanet.model import AnchorGenerator, build_model

from conftest import REPO_ROOT, tiny_overrides
from numerics import U32

# Two anchors, one per level: a 16 px square at the origin (level 0) and a 64 px one (level 1).
ANCHORS = torch.tensor([[0, 0, 16, 16], [100, 100, 164, 164]], dtype=torch.float32)
BOXES = torch.tensor([
    [0, 0, 16, 16],        # small, IoU 1 with anchor 0: covered
    [0, 0, 12, 12],        # small, 144 / 256 = 0.5625: covered
    [0, 0, 8, 8],          # small, 64 / 256 = 0.25
    [100, 100, 164, 164],  # medium, IoU 1 with anchor 1: covered
    [100, 100, 140, 140],  # medium (40^2), 1600 / 4096 = 0.390625
    [0, 0, 200, 200],      # large, best is anchor 1: 4096 / 40000 = 0.1024
], dtype=torch.float32)
EXPECTED_IOU = [1.0, 0.5625, 0.25, 1.0, 0.390625, 0.1024]


def test_known_coverage_per_bucket_and_level():
    result = analysis.anchor_coverage(ANCHORS, BOXES, fg_iou=0.5, num_anchors_per_level=[1, 1],
                                      level_names=["P3", "P4"])
    assert result["all"]["num_boxes"] == 6 and result["all"]["covered"] == 3
    assert result["all"]["coverage"] == pytest.approx(0.5)
    # median of 0.1024, 0.25, 0.390625, 0.5625, 1, 1: mean of the middle two
    assert result["all"]["median_iou"] == pytest.approx((0.390625 + 0.5625) / 2)
    buckets = {name: (s["num_boxes"], s["covered"]) for name, s in result["buckets"].items()}
    assert buckets == {"small": (3, 2), "medium": (2, 1), "large": (1, 0)}
    assert result["buckets"]["small"]["median_iou"] == pytest.approx(0.5625)
    levels = {name: (s["num_boxes"], s["covered"]) for name, s in result["levels"].items()}
    assert levels == {"P3": (3, 2), "P4": (3, 1)}
    # a stricter threshold counts differently, from the same IoUs
    strict = analysis.anchor_coverage(ANCHORS, BOXES, fg_iou=0.6)
    assert strict["all"]["covered"] == 2 and "levels" not in strict


def test_best_anchor_iou_chunked_and_empty():
    full_iou, full_idx = analysis.best_anchor_iou(ANCHORS, BOXES)
    assert full_iou.tolist() == pytest.approx(EXPECTED_IOU)
    assert full_idx.tolist() == [0, 0, 0, 1, 1, 1]
    for max_pairs in (1, 2, 5):  # one box per chunk, ..., several
        iou, idx = analysis.best_anchor_iou(ANCHORS, BOXES, max_pairs=max_pairs)
        assert torch.equal(iou, full_iou) and torch.equal(idx, full_idx)
    iou, idx = analysis.best_anchor_iou(ANCHORS, torch.zeros(0, 4))
    assert iou.shape == idx.shape == (0,)
    empty = analysis.anchor_coverage(ANCHORS, torch.zeros(0, 4), 0.5, [1, 1])
    assert empty["all"] == {"num_boxes": 0, "covered": 0, "coverage": None, "median_iou": None}


def test_size_bucket_bounds_follow_coco():
    side = torch.tensor([31.99, 32.0, 95.99, 96.0])
    boxes = torch.stack([torch.zeros(4), torch.zeros(4), side, side], dim=1)
    assert analysis.size_buckets(boxes).tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("kwargs,image,pad", [
    (dict(offset=0.5, aspect_ratios=[1.0]), (128, 128), 128),
    (dict(round_base=True), (200, 300), 128),
    (dict(stride_from_image=True), (300, 500), 32),  # torchvision's strides: 64 -> 60ish
])
def test_grid_search_equals_brute_force(kwargs, image, pad):
    args = dict(sizes=[32, 64, 128, 256, 512], octave_scales=[1, 2 ** (1 / 3), 2 ** (2 / 3)],
                aspect_ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])
    generator = AnchorGenerator(**{**args, **kwargs})
    padded, sizes = analysis.feature_sizes(*image, pad, generator.strides)
    anchors = generator(sizes, torch.device("cpu"), image_size=padded)
    gen = torch.Generator().manual_seed(0)
    corner = torch.rand(300, 2, generator=gen) * torch.tensor([image[1], image[0]])
    boxes = torch.cat([corner, corner + 1 + torch.rand(300, 2, generator=gen) * 250], dim=1)
    boxes = boxes.minimum(torch.tensor([image[1], image[0]] * 2, dtype=torch.float32))
    boxes = boxes[(boxes[:, 2] > boxes[:, 0] + 0.5) & (boxes[:, 3] > boxes[:, 1] + 0.5)]
    brute_iou, _ = analysis.best_anchor_iou(anchors, boxes)
    grid_iou, grid_idx = analysis.grid_best_anchor_iou(anchors, sizes, boxes)
    # Both take each pair's IoU by box_iou's operations, and the grid search looks only where a
    # best anchor must be: the same best IoU, or, where two anchors tie in exact arithmetic
    # (symmetric positions), the other's. An IoU is ~10 roundings, each relative to its result
    # (the coordinates are exact floats): tied ones differ by at most 20 u of the IoU.
    torch.testing.assert_close(grid_iou, brute_iou, rtol=20 * U32, atol=0)
    # the anchor it names really has that IoU: the same operations on the same pair, bit for bit
    from torchvision.ops import box_iou
    named = box_iou(boxes, anchors)[torch.arange(len(boxes)), grid_idx]
    assert torch.equal(named, grid_iou)


def test_resize_and_feature_sizes_match_transforms_and_model(tmp_path, shapes_dir):
    for height, width in [(480, 640), (333, 500), (1000, 200), (128, 128)]:
        image = np.zeros((height, width, 3), np.uint8)
        sample = {"image": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                  "image_id": 0, "orig_size": (height, width)}
        test = EvalTransform(min_size=96, max_size=160, mean=[0, 0, 0], std=[1, 1, 1])(sample)
        assert test["image_size"] == analysis.resized_size(height, width, 96, 160)
        train = DetectionTransform(min_sizes=[100], max_size=150, mean=[0, 0, 0], std=[1, 1, 1])(sample)
        assert train["image_size"] == analysis.resized_size(height, width, 100, 150, train=True)
    # training rounds, evaluation floors: 333 x 0.3 = 99.9
    assert analysis.resized_size(333, 500, 100, 150, train=True) == (100, 150)
    assert analysis.resized_size(333, 500, 100, 150) == (99, 150)
    # the model's anchors for a 100 x 150 input padded to 32 are the ones the analysis builds
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                         tiny_overrides(shapes_dir, tmp_path) + ["data.size_divisibility=32"])
    model = build_model(config.model, 5, load_backbone_weights=False).eval()
    padded, sizes = analysis.feature_sizes(100, 150, 32, config.model.anchors.strides)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, *padded))
    assert padded == (128, 160)
    assert out.num_anchors_per_level == model.anchor_generator.num_anchors_per_level(sizes)
    assert torch.equal(out.anchors, model.anchor_generator(sizes, torch.device("cpu"), image_size=padded))


def test_dataset_coverage_matches_per_image_anchors():
    """Images are resized (here x2 and x0.5), grouped by padded size and scored against that
    size's anchors: the same numbers as anchor_coverage on each image's own anchors."""
    generator = AnchorGenerator(sizes=[16, 32, 64, 128, 256], octave_scales=[1.0], aspect_ratios=[1.0],
                                strides=[8, 16, 32, 64, 128], offset=0.5)
    images = [(64, 64, torch.tensor([[4.0, 4, 20, 20], [10, 10, 50, 40]])),
              (256, 256, torch.tensor([[0.0, 0, 32, 32], [100, 120, 228, 250], [7, 7, 13, 13]])),
              (64, 64, torch.tensor([[30.0, 2, 60, 12]]))]
    resized = analysis.resize_dataset_boxes(images, min_size=128, max_size=128, size_divisibility=128)
    assert resized.num_images == 3 and list(resized.groups) == [(128, 128)]
    summary = analysis.dataset_coverage(generator, resized, 0.5)
    _, sizes = analysis.feature_sizes(128, 128, 128, generator.strides)
    anchors = generator(sizes, torch.device("cpu"))
    scaled = torch.cat([images[0][2] * 2, images[1][2] / 2, images[2][2] * 2])
    expected = analysis.anchor_coverage(anchors, scaled, 0.5, generator.num_anchors_per_level(sizes),
                                        analysis.level_names(generator.strides))
    assert summary == expected
    assert list(summary["levels"]) == ["P3", "P4", "P5", "P6", "P7"]


def test_suggestion_covers_tall_boxes():
    """Boxes 3x taller than wide: square anchors miss most of them; the search finds aspect
    ratios (from the boxes' own quantiles) that cover them, ahead of the current setting."""
    gen = torch.Generator().manual_seed(0)
    images = []
    for _ in range(20):
        width = 8 + torch.rand(4, generator=gen) * 20
        x0 = torch.rand(4, generator=gen) * 60
        y0 = torch.rand(4, generator=gen) * 20
        boxes = torch.stack([x0, y0, x0 + width, y0 + 3 * width], dim=1)
        images.append((128, 128, boxes))
    resized = analysis.resize_dataset_boxes(images, min_size=128, max_size=128, size_divisibility=128)
    current = analysis.AnchorSetting((16, 32, 64, 128, 256), (1.0, 2 ** 0.5), (1.0,))
    strides = [8, 16, 32, 64, 128]
    before = analysis.dataset_coverage(current.generator(strides=strides, offset=0.5), resized, 0.5)
    assert before["all"]["coverage"] < 0.5
    ranked = analysis.search_anchor_settings(current, resized, 0.5, target=0.9, strides=strides, offset=0.5)
    best, after = ranked[0]
    assert after["all"]["coverage"] > before["all"]["coverage"] + 0.3
    assert max(best.aspect_ratios) > 2  # tall anchors
    assert any(setting == current for setting, _ in ranked)
    # the suggestion is printed as overrides the config accepts
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", best.overrides())
    assert config.model.anchors.aspect_ratios == pytest.approx(best.aspect_ratios, abs=1e-3)


def test_rank_prefers_fewest_anchors_that_reach_target():
    def summary(coverages):
        known = [c for c in coverages if c is not None]
        return {"all": {"coverage": sum(known) / len(known)},
                "buckets": {name: {"coverage": c} for name, c in zip(analysis.SIZE_BUCKET_NAMES, coverages)}}
    cheap = analysis.AnchorSetting((8,), (1.0,), (1.0,))
    rich = analysis.AnchorSetting((8,), (1.0, 1.5), (0.5, 1.0, 2.0))
    middle = analysis.AnchorSetting((8,), (1.0,), (0.5, 1.0, 2.0))
    ranked = analysis.rank_settings([(cheap, summary([0.5, 0.9, None])), (rich, summary([0.99, 0.99, None])),
                                     (middle, summary([0.92, 0.95, None]))], target=0.9)
    assert [s for s, _ in ranked] == [middle, rich, cheap]  # middle: enough with 3 per location
    ranked = analysis.rank_settings([(cheap, summary([0.5, 0.6, 0.7])), (rich, summary([0.8, 0.8, 0.8]))],
                                    target=0.9)
    assert ranked[0][0] == rich  # none reaches the target: the best coverage


def _tool(*args):
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "analyze_anchors.py"), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_tool_on_shapes(shapes_dir, tmp_path):
    config = REPO_ROOT / "configs" / "shapes_R18.yaml"
    report = tmp_path / "anchors.json"
    ok = _tool("--config", config, "--max-images", 20, "--json", report,
               *tiny_overrides(shapes_dir, tmp_path / "run"))
    missing = _tool("--config", config, "--split", "val", f"data.val.images={shapes_dir / 'val'}",
                    f"data.val.annotations={tmp_path / 'nope.json'}")
    stdout, stderr = ok.communicate(timeout=300)
    assert ok.returncode == 0, stderr
    assert "20 of 24 images" in stdout and "min_size 128 / max_size 128" in stdout
    for row in ("all boxes", "small (area < 32^2)", "medium (< 96^2)", "large (>= 96^2)",
                "best anchor in P3", "best anchor in P7"):
        assert row in stdout
    data = json.loads(report.read_text())
    coverage = data["coverage"]
    configured = load_config(config).model.matcher.fg_iou
    assert data["num_images"] == 20 and coverage["fg_iou"] == configured  # the config's matcher
    assert coverage["all"]["num_boxes"] == sum(b["num_boxes"] for b in coverage["buckets"].values()) \
        == sum(level["num_boxes"] for level in coverage["levels"].values()) > 0
    low = [b for b in coverage["buckets"].values() if b["coverage"] is not None and b["coverage"] < 0.9]
    if low:  # the shapes config's 8 px anchors at stride 8 leave many small boxes below 0.5
        suggestion = data["suggestion"]
        assert "suggested" in stdout and " ".join(suggestion["overrides"]) in stdout
        assert suggestion["coverage"]["all"]["coverage"] >= coverage["all"]["coverage"]
    else:
        assert data["suggestion"] is None and "no change suggested" in stdout
    stdout, stderr = missing.communicate(timeout=300)
    assert missing.returncode == 2
    assert stderr.strip() == \
        f"error: annotation file not found: {tmp_path / 'nope.json'} (data.val.annotations)"


def test_level_names():
    assert analysis.level_names([8, 16, 32, 64, 128]) == ["P3", "P4", "P5", "P6", "P7"]
    assert math.isclose(analysis.SIZE_BUCKETS[0][2], 32 ** 2)


def test_grid_search_in_chunks():
    generator = AnchorGenerator(sizes=[32, 64, 128, 256, 512], octave_scales=[1.0], aspect_ratios=[0.5, 1.0],
                                strides=[8, 16, 32, 64, 128])
    padded, sizes = analysis.feature_sizes(200, 300, 128, generator.strides)
    anchors = generator(sizes, torch.device("cpu"))
    corner = torch.rand(50, 2, generator=torch.Generator().manual_seed(1)) * 150
    boxes = torch.cat([corner, corner + 20 + corner.flip(1) / 2], dim=1)
    whole = analysis.grid_best_anchor_iou(anchors, sizes, boxes)
    chunked = analysis.grid_best_anchor_iou(anchors, sizes, boxes, max_boxes=7)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
