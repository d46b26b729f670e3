import math

import torch

from retinanet.boxes import BoxCoder
from retinanet.predictor import PostProcessor, merge_detections

from numerics import U32, assert_detections_agree, rounding_box_tol

LOGIT = lambda p: math.log(p / (1 - p))  # noqa: E731
# Scores of setup()'s logits: p -> logit -> sigmoid in float32. logit x is off by at most
# (1 + |x|) u (1 - p is exact for p >= 0.5, then a division and a log round), which sigmoid scales
# by p (1 - p): under u relative for these p; sigmoid's own exp, add and divide add 3 u: within 8 u.
ROUND_TRIP = dict(rtol=8 * U32, atol=0.0)


def setup(probs, anchors, **kw):
    """probs (B, A, K) -> postprocess with zero deltas (boxes = anchors), one level."""
    logits = torch.tensor(probs).logit()
    deltas = torch.zeros(*logits.shape[:2], 4)
    pp = PostProcessor(box_coder=BoxCoder(), **kw)
    return pp, logits, deltas, torch.tensor(anchors)


ANCHORS = [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]]


def test_threshold_nms_per_class_and_order():
    probs = [[[0.9, 0.01], [0.8, 0.7], [0.03, 0.6]]]
    pp, logits, deltas, anchors = setup(probs, ANCHORS, score_thresh=0.05, nms_thresh=0.5)
    (out,) = pp(logits, deltas, anchors, [3], [(100, 100)])
    # anchor 1 / class 0 is suppressed by anchor 0 / class 0 (IoU 0.82); class 1 on anchor 1 is
    # a different class and survives; 0.03 and 0.01 are below the threshold.
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.7, 0.6]), **ROUND_TRIP)
    assert out["labels"].tolist() == [0, 1, 1]
    assert torch.allclose(out["boxes"], anchors[[0, 1, 2]])  # zero deltas: float32 rounding of coordinates <= 60


def test_class_agnostic_keeps_one_box_per_object_and_image():
    probs = [[[0.9, 0.01], [0.8, 0.7], [0.03, 0.6]]] * 2  # two identical images
    pp, logits, deltas, anchors = setup(probs, ANCHORS, score_thresh=0.05, nms_thresh=0.5,
                                        class_agnostic=True)
    outs = pp(logits, deltas, anchors, [3], [(100, 100)] * 2)
    for out in outs:  # class 1 on anchor 1 (0.7) now falls to anchor 0's class 0 (IoU 0.82)
        torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.6]), **ROUND_TRIP)
        assert out["labels"].tolist() == [0, 1]
        assert torch.allclose(out["boxes"], anchors[[0, 2]])
    padded = pp.padded(list(logits.split([3], 1)), list(deltas.split([3], 1)), [anchors],
                       torch.tensor([[100.0, 100.0]] * 2))
    assert padded[3].tolist() == [2, 2]  # the exported rule agrees: per image, not across them


def test_merge_detections_class_agnostic():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    parts = [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
             {"boxes": box + 1, "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}]
    per_class = merge_detections(parts, nms_thresh=0.5, max_detections=10)
    agnostic = merge_detections(parts, nms_thresh=0.5, max_detections=10, class_agnostic=True)
    assert per_class["labels"].tolist() == [0, 1] and agnostic["labels"].tolist() == [0]
    assert torch.equal(agnostic["boxes"], box)


def test_topk_and_max_detections():
    probs = [[[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]]]
    anchors = [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]]
    pp, logits, deltas, a = setup(probs, anchors, topk_candidates=3)
    (out,) = pp(logits, deltas, a, [3], [(100, 100)])
    assert len(out["scores"]) == 3 and out["scores"].min() > 0.65
    pp.topk_candidates, pp.max_detections = 1000, 4
    (out,) = pp(logits, deltas, a, [3], [(100, 100)])
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8, 0.7, 0.6]), **ROUND_TRIP)


def test_batch_equals_per_image_clip_and_rescale():
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(40, 2, generator=g) * 80
    anchors = torch.cat([anchors, anchors + 10 + torch.rand(40, 2, generator=g) * 30], 1)
    logits = torch.randn(3, 40, 4, generator=g) * 2
    deltas = torch.randn(3, 40, 4, generator=g) * 0.2
    pp = PostProcessor(box_coder=BoxCoder(), score_thresh=0.2, topk_candidates=15, max_detections=7)
    levels, sizes, outs = [25, 15], [(100, 90), (64, 64), (80, 100)], [(200, 180), (64, 64), (40, 50)]
    batched = pp(logits, deltas, anchors, levels, sizes, outs)
    singles = []
    for i in range(3):
        (single,) = pp(logits[i:i + 1], deltas[i:i + 1], anchors, levels, sizes[i:i + 1], outs[i:i + 1])
        singles.append(single)
        # Scores and boxes: the same elementwise formulas on the same logits (in differently shaped
        # tensors: torch's scalar and vector paths may round an ulp apart). NMS compares boxes
        # shifted by per-group offsets (batched_nms), which differ between the batch and one image:
        # an IoU within rounding of nms_thresh may flip, one detection at most here.
        assert_detections_agree(batched[i], single, logit_tol=0.0, box_tol=rounding_box_tol(batched[i], single),
                                score_thresh=pp.score_thresh,
                                nms_thresh=pp.nms_thresh, max_detections=pp.max_detections,
                                max_unmatched=1, what=f"image {i}")
        assert len(single["scores"]) <= 7
        h, w = outs[i]
        boxes = batched[i]["boxes"]
        assert (boxes[:, 0::2] <= w + 1e-4).all() and (boxes[:, 1::2] <= h + 1e-4).all()
        assert (boxes >= 0).all()
    # image 0 was resized by 0.5: boxes are scaled by 2 back to the original image (exactly: x 2.0)
    (unscaled,) = pp(logits[:1], deltas[:1], anchors, levels, sizes[:1])
    assert torch.equal(singles[0]["boxes"], unscaled["boxes"] * 2)


def test_no_detections():
    pp, logits, deltas, anchors = setup([[[0.01, 0.01]] * 3, [[0.02, 0.01]] * 3], ANCHORS)
    out = pp(logits, deltas, anchors, [3], [(100, 100), (100, 100)])
    assert [len(o["scores"]) for o in out] == [0, 0] and out[0]["boxes"].shape == (0, 4)


def test_batched_topk_equals_torch_topk():
    from retinanet.predictor import batched_topk
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(2, 700_003, generator=g),                       # ragged last block
             torch.randn(3, 512_000, generator=g) * 4 - 6,                # one block size apart
             torch.cat([torch.full((1, 600_000), -9.0), torch.randn(1, 600_000, generator=g)], 1)]
    spiky = torch.full((2, 800_000), -5.0)
    spiky[0, ::997] = torch.rand(803, generator=g)  # every winner in its own block
    spiky[1, -37:] = 3.0 + torch.arange(37.0)       # all winners in the tail
    for values in cases + [spiky]:
        top, idx = batched_topk(values, 1000)
        ref_top, _ = values.topk(1000, dim=1)
        assert torch.equal(top, ref_top)
        assert torch.equal(values.gather(1, idx), top)  # the indices point at those values
        assert all(len(set(row.tolist())) == 1000 for row in idx)  # no column twice
