"""Property-based tests (hypothesis) of box conventions, the box coder, the matcher's invariants and
the training augmentation pipeline, on random inputs instead of hand-picked ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.ops import box_convert, box_iou

from retinanet.boxes import BoxCoder, clip_boxes
from retinanet.data.transforms import DetectionTransform
from retinanet.losses.matcher import BACKGROUND, IGNORE, Matcher

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

coord = st.floats(-1000, 1000)
extent = st.floats(0.01, 1000)


@st.composite
def xyxy_boxes(draw, max_boxes: int = 20) -> torch.Tensor:
    """(n, 4) float32 xyxy boxes of positive width and height, n >= 1."""
    n = draw(st.integers(1, max_boxes))
    rows = [(x, y, x + w, y + h) for x, y, w, h in
            draw(st.lists(st.tuples(coord, coord, extent, extent), min_size=n, max_size=n))]
    boxes = torch.tensor(rows, dtype=torch.float32)
    # x + w can round back to x in float32 for tiny w at large |x|: keep the strictly positive ones
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep] if keep.any() else torch.tensor([[0.0, 0.0, 1.0, 1.0]])


# --------------------------------------------------------------------------- box conventions


@FAST
@given(xyxy_boxes())
def test_box_convert_round_trips(boxes):
    # there and back: at most 4 roundings (adds, halvings) of values <= 2000, u x 2000 = 1.2e-4 each
    tol = dict(rtol=1e-5, atol=1e-3)
    for fmt in ("xywh", "cxcywh"):
        converted = box_convert(boxes, "xyxy", fmt)
        assert (converted[:, 2:] > 0).all()  # widths and heights stay positive
        torch.testing.assert_close(box_convert(converted, fmt, "xyxy"), boxes, **tol)
    xywh = box_convert(boxes, "xyxy", "xywh")
    cxcywh = box_convert(xywh, "xywh", "cxcywh")
    torch.testing.assert_close(box_convert(cxcywh, "cxcywh", "xywh"), xywh, **tol)
    assert torch.equal(xywh[:, 2:], boxes[:, 2:] - boxes[:, :2])  # no "+1": the same subtraction


@FAST
@given(xyxy_boxes(), st.floats(1, 1500), st.floats(1, 1500))
def test_clip_boxes_stays_inside_and_is_idempotent(boxes, height, width):
    clipped = clip_boxes(boxes, torch.tensor(height), torch.tensor(width))
    assert (clipped >= 0).all()
    assert (clipped[:, 0::2] <= width).all() and (clipped[:, 1::2] <= height).all()
    assert (clipped[:, 2] >= clipped[:, 0]).all() and (clipped[:, 3] >= clipped[:, 1]).all()
    assert torch.equal(clip_boxes(clipped, torch.tensor(height), torch.tensor(width)), clipped)
    inside = (boxes[:, :2] >= 0).all(1) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
    assert torch.equal(clipped[inside], boxes[inside])  # boxes already inside are untouched


# --------------------------------------------------------------------------- box coder

weights = st.one_of(st.just((1.0, 1.0, 1.0, 1.0)), st.just((10.0, 10.0, 5.0, 5.0)),
                    st.tuples(*[st.floats(0.1, 20)] * 4))


@st.composite
def anchor_box_pairs(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4) anchors and (n, 4) boxes: box sizes within e^±3 of the anchor's (below the coder's
    clamp, log(1000/16) = 4.1), centres within two anchor sizes."""
    n = draw(st.integers(1, 16))
    rows = draw(st.lists(st.tuples(st.floats(-500, 500), st.floats(-500, 500),  # anchor centre
                                   st.floats(2, 512), st.floats(2, 512),          # anchor size
                                   st.floats(-2, 2), st.floats(-2, 2),            # centre offset
                                   st.floats(-3, 3), st.floats(-3, 3)),           # log size ratio
                         min_size=n, max_size=n))
    t = torch.tensor(rows, dtype=torch.float64)
    ax, ay, aw, ah = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
    bx, by, bw, bh = ax + t[:, 4] * aw, ay + t[:, 5] * ah, aw * t[:, 6].exp(), ah * t[:, 7].exp()
    anchors = torch.stack((ax - aw / 2, ay - ah / 2, ax + aw / 2, ay + ah / 2), 1)
    boxes = torch.stack((bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2), 1)
    return anchors.float(), boxes.float()


@FAST
@given(anchor_box_pairs(), weights)
def test_box_coder_decode_inverts_encode(pair, coder_weights):
    anchors, boxes = pair
    coder = BoxCoder(weights=coder_weights)
    deltas = coder.encode(anchors, boxes)
    assert deltas.dtype == torch.float32 and torch.isfinite(deltas).all()
    decoded = coder.decode(deltas, anchors)
    # float32 round-off grows with the coordinates' magnitude and the box size: encode and decode
    # are ~20 roundings, each relative to its result, and log / exp pass dw's error on at most
    # |dw| <= 3 times: ~30 u of the scale, against 1e-5 (168 u); the absolute term for tiny boxes
    scale = boxes.abs().amax(dim=1, keepdim=True) + anchors.abs().amax(dim=1, keepdim=True)
    assert ((decoded - boxes).abs() <= 1e-5 * scale + 1e-4).all(), (decoded - boxes).abs().max()


@FAST
@given(anchor_box_pairs())
def test_box_coder_broadcasts_and_clamps_huge_deltas(pair):
    anchors, _ = pair
    deltas = torch.tensor([0.0, 0.0, 1e4, -1e4]).expand_as(anchors).half()  # fp16, as under AMP
    decoded = BoxCoder().decode(deltas, anchors)
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
    widths = decoded[:, 2] - decoded[:, 0]
    # exp of the float32 clamp log(1000 / 16) (its rounding times 4.1, an ulp of exp) times the anchor
    # width, then x1 - x0 = (cx + w / 2) - (cx - w / 2), rounding u of |cx| + w / 2 <= 2 w twice: ~10 u
    torch.testing.assert_close(widths, (anchors[:, 2] - anchors[:, 0]) * 1000 / 16, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- matcher

# Integer coordinates on a small canvas: boxes overlap often and IoU ties happen, which is where
# low-quality matching goes wrong.
CANVAS, MAX_SIDE = 12, 10


@st.composite
def grid_boxes(draw, count: int) -> torch.Tensor:
    """(count, 4) xyxy boxes drawn by hypothesis (it shrinks them to small failing examples)."""
    coord, side = st.integers(0, CANVAS), st.integers(1, MAX_SIDE)
    rows = draw(st.lists(st.tuples(coord, coord, side, side), min_size=count, max_size=count))
    boxes = [(x, y, x + w, y + h) for x, y, w, h in rows]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def seeded_boxes(rng: np.random.Generator, count: int) -> torch.Tensor:
    """(count, 4) xyxy boxes, uniform on the canvas: hypothesis favours small and extreme values,
    and uniform draws hit "a box's best anchor overlaps another box more" far more often."""
    xy = rng.integers(0, CANVAS + 1, (count, 2))
    return torch.tensor(np.concatenate([xy, xy + rng.integers(1, MAX_SIDE + 1, (count, 2))], 1),
                        dtype=torch.float32)


@st.composite
def matching_problems(draw):
    """anchors (A, 4), gt_boxes (B, M, 4), gt_valid (B, M), fg_iou, bg_iou, allow_low_quality.
    Padded rows (gt_valid False) hold boxes too, so a bug that reads them shows."""
    batch, max_boxes = draw(st.integers(1, 2)), draw(st.integers(0, 6))
    num_anchors = draw(st.integers(1, 16))
    if draw(st.booleans()):
        anchors = draw(grid_boxes(num_anchors))
        gt_boxes = torch.stack([draw(grid_boxes(max_boxes)) for _ in range(batch)])
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        anchors = seeded_boxes(rng, num_anchors)
        gt_boxes = seeded_boxes(rng, batch * max_boxes).reshape(batch, max_boxes, 4)
    valid = st.sampled_from([True, True, True, False])
    gt_valid = torch.tensor([[draw(valid) for _ in range(max_boxes)] for _ in range(batch)],
                            dtype=torch.bool).reshape(batch, max_boxes)
    bg_iou = draw(st.floats(0.1, 0.6))
    fg_iou = draw(st.floats(bg_iou, 0.8))
    return anchors, gt_boxes, gt_valid, fg_iou, bg_iou, draw(st.booleans())


@settings(max_examples=100, deadline=None)
@given(matching_problems())
def test_matcher_invariants(problem):
    anchors, gt_boxes, gt_valid, fg_iou, bg_iou, low_quality = problem
    matcher = Matcher(fg_iou=fg_iou, bg_iou=bg_iou, allow_low_quality=low_quality)
    result = matcher(anchors, gt_boxes, gt_valid)
    assert result.shape == (gt_valid.shape[0], len(anchors)) and result.dtype == torch.long
    for b in range(gt_valid.shape[0]):
        valid_idx = gt_valid[b].nonzero().flatten()
        matched = result[b]
        positive = matched >= 0
        # only BACKGROUND, IGNORE or a valid row: never a padded one
        assert ((matched == BACKGROUND) | (matched == IGNORE) | positive).all()
        assert gt_valid[b][matched[positive]].all()
        if len(valid_idx) == 0:
            assert (matched == BACKGROUND).all()
            continue
        iou = box_iou(gt_boxes[b, valid_idx], anchors)  # (V, A), valid rows only
        max_iou = iou.max(dim=0).values
        best_per_gt = iou.max(dim=1, keepdim=True).values
        is_best = (iou == best_per_gt) & (best_per_gt > 0) & low_quality  # (V, A)
        lq = is_best.any(dim=0)  # low-quality anchors: a best anchor of some valid box
        # plain thresholds away from the low-quality anchors
        assert (positive[max_iou >= fg_iou]).all()
        assert (matched[~lq & (max_iou < bg_iou)] == BACKGROUND).all()
        assert (matched[~lq & (max_iou >= bg_iou) & (max_iou < fg_iou)] == IGNORE).all()
        # a positive that is not low-quality is matched to a box it overlaps most
        row = {int(m): k for k, m in enumerate(valid_idx)}
        for a in (positive & ~lq).nonzero().flatten().tolist():
            assert iou[row[int(matched[a])], a] == max_iou[a]
        # a low-quality anchor is matched to a box it is a best anchor of
        for a in lq.nonzero().flatten().tolist():
            assert positive[a] and is_best[row[int(matched[a])], a]
        # every box with any overlap keeps a positive, unless each of its best anchors is also a
        # best anchor of another box (then one of them necessarily loses it)
        for k, m in enumerate(valid_idx.tolist()):
            if not is_best[k].any():
                continue
            shared = (is_best[k] & (is_best.sum(dim=0) > 1))
            if not torch.equal(shared, is_best[k]):
                assert (matched == m).any(), f"box {m} has no positive anchor"


@settings(max_examples=50, deadline=None)
@given(matching_problems())
def test_matcher_batched_equals_per_image(problem):
    anchors, gt_boxes, gt_valid, fg_iou, bg_iou, low_quality = problem
    matcher = Matcher(fg_iou=fg_iou, bg_iou=bg_iou, allow_low_quality=low_quality)
    batched = matcher(anchors, gt_boxes, gt_valid)
    for b in range(gt_valid.shape[0]):
        assert torch.equal(batched[b], matcher(anchors, gt_boxes[b:b + 1], gt_valid[b:b + 1])[0])


# --------------------------------------------------------------------------- augmentation

# px: twice the loader's minimum (retinanet.boxes.MIN_BOX_SIDE), so that float32 rounding of the
# corners cannot take a generated box under it (thinner boxes: see the test below)
MIN_BOX_SIDE = 0.02
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}


@st.composite
def train_samples(draw) -> tuple[int, int, int, list[list[float]]]:
    """(height, width, image seed, boxes): a 16..80 px image and 0..8 boxes inside it, each side
    >= MIN_BOX_SIDE. Kept as plain numbers so that hypothesis prints a readable failing example."""
    height, width = draw(st.integers(16, 80)), draw(st.integers(16, 80))
    boxes = []
    for _ in range(draw(st.integers(0, 8))):
        x0 = draw(st.floats(0, width - MIN_BOX_SIDE))
        y0 = draw(st.floats(0, height - MIN_BOX_SIDE))
        boxes.append([x0, y0, draw(st.floats(x0 + MIN_BOX_SIDE, width)),
                      draw(st.floats(y0 + MIN_BOX_SIDE, height))])
    return height, width, draw(st.integers(0, 2**31 - 1)), boxes


def make_sample(height: int, width: int, seed: int, boxes: list) -> dict:
    """Random uint8 RGB image; the label of box i is i, so the output tells which input box each
    output box is."""
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return {"image": image, "boxes": boxes, "labels": np.arange(len(boxes)), "image_id": seed,
            "orig_size": (height, width)}


@settings(max_examples=80, deadline=None)
@given(train_samples(), st.lists(st.integers(8, 96), min_size=1, max_size=3), st.integers(0, 64),
       st.sampled_from([0.0, 0.5, 1.0]), st.integers(0, 2**31 - 1))
def test_train_transform_keeps_boxes_inside_positive_and_aligned(recipe, min_sizes, extra, jitter_prob,
                                                                 seed):
    max_size = max(min_sizes) + extra
    transform = DetectionTransform(min_sizes=min_sizes, max_size=max_size, mean=[0.485, 0.456, 0.406],
                                   std=[0.229, 0.224, 0.225], hflip_prob=0.5,
                                   color_jitter={"prob": jitter_prob, **JITTER})
    transform.set_seed(seed)
    sample = make_sample(*recipe)
    height, width = sample["orig_size"]
    out = transform(sample)
    image, boxes, labels = out["image"], out["boxes"], out["labels"]
    out_h, out_w = out["image_size"]
    assert image.dtype == torch.float32 and image.shape == (3, out_h, out_w)
    assert torch.isfinite(image).all()
    # the output size is the resize rule's for one of min_sizes (up to rounding to whole pixels)
    scales = [min(s / min(height, width), max_size / max(height, width)) for s in min_sizes]
    assert any(abs(out_h - height * s) <= 1 and abs(out_w - width * s) <= 1 for s in scales)
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert boxes.shape == (len(labels), 4)
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= out_w).all() and (boxes[:, 1::2] <= out_h).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    # nothing is cropped, so no box may be lost, and labels keep their boxes' order
    assert labels.tolist() == list(range(len(sample["boxes"])))
    # each output box is its own input box resized; flipped all together or not at all
    src = torch.as_tensor(sample["boxes"]) * torch.tensor([out_w / width, out_h / height] * 2)
    flipped = torch.stack((out_w - src[:, 2], src[:, 1], out_w - src[:, 0], src[:, 3]), dim=1)
    tol = 1e-4 * max(out_h, out_w)
    if len(boxes):
        error = min((boxes - src).abs().max(), (boxes - flipped).abs().max())
        assert error <= tol, (boxes, src, flipped)


def test_train_transform_empty_boxes():
    transform = DetectionTransform(min_sizes=[32], max_size=64, mean=[0.5] * 3, std=[0.25] * 3,
                                   hflip_prob=1.0, color_jitter={"prob": 1.0, **JITTER})
    for boxes in ([], np.zeros((0, 4), np.float32)):
        out = transform({"image": np.zeros((20, 30, 3), np.uint8), "boxes": boxes, "labels": [],
                         "image_id": 1, "orig_size": (20, 30)})
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
        assert out["image"].shape == (3, 32, 48)


def test_train_transform_rejects_sub_minimum_boxes_clearly():
    # Found by the property test above with no minimum box side: a box one float32 step wide
    # passed the transform's old x1 > x0 check, then albumentations raised "x_max is less than
    # or equal to x_min" (or dropped it silently). Such boxes are now degenerate: the transform
    # names them, and CocoDetection drops them at load with a counted warning.
    x0 = np.float32(15.108056)
    box = [x0, 10.0, np.nextafter(x0, np.float32(100)), 11.0]
    transform = DetectionTransform(min_sizes=[64], max_size=1000, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(ValueError, match=r"image 0: box .* is under 0\.01 px wide or high"):
        transform(make_sample(71, 57, 0, [box]))
