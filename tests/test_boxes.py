import math

import numpy as np
import torch

from retinanet.boxes import MIN_BOX_SIDE, BoxCoder, box_areas_valid, clip_boxes, padded_size


def random_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 190 + 10  # size ratios < 20: inside the dw/dh clamp
    return torch.cat([xy, xy + wh], dim=1)


def test_coder_round_trip_with_weights():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors, boxes = random_boxes(200, 0), random_boxes(200, 1)
    deltas = coder.encode(anchors, boxes)
    # encode then decode: ~20 roundings, each relative to its result, of coordinates <= 700
    # (u x 700 = 4e-5): well within 1e-3
    assert torch.allclose(coder.decode(deltas, anchors), boxes, atol=1e-3)


def test_coder_identity_and_no_plus_one():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert torch.allclose(coder.encode(anchor, anchor), torch.zeros(1, 4))
    # a box twice as wide: dw = log 2 exactly, width = x1 - x0 (no "+1")
    wide = torch.tensor([[-5.0, 0.0, 15.0, 20.0]])
    # 20 / 10 is exact, log rounds once: an ulp from math.log(2) rounded to float32
    assert torch.allclose(coder.encode(anchor, wide), torch.tensor([[0.0, 0.0, math.log(2), 0.0]]))


def test_decode_clamps_before_exp_and_handles_fp16():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = torch.tensor([[0.0, 0.0, 1e4, 1e4]], dtype=torch.float16)
    boxes = coder.decode(huge, anchors)
    assert boxes.dtype == torch.float32 and torch.isfinite(boxes).all()
    # exp of the float32 clamp log(1000 / 16): its rounding times 4.1 and an ulp of exp, ~6 u
    assert torch.allclose(boxes[0, 2] - boxes[0, 0], torch.tensor(1000.0), rtol=1e-4)


def test_clip_boxes_per_image_sizes():
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 50.0], [10.0, 10.0, 300.0, 300.0]])
    clipped = clip_boxes(boxes, torch.tensor([40.0, 100.0]), torch.tensor([30.0, 200.0]))
    assert clipped.tolist() == [[0.0, 0.0, 30.0, 40.0], [10.0, 10.0, 200.0, 100.0]]


def test_pairwise_iou_equals_torchvision_box_iou():
    from torchvision.ops import box_iou

    from retinanet.boxes import pairwise_iou
    g = torch.Generator().manual_seed(9)
    a = torch.rand(37, 2, generator=g) * 100
    a = torch.cat([a, a + torch.rand(37, 2, generator=g) * 50], dim=1)
    b = torch.rand(211, 2, generator=g) * 100
    b = torch.cat([b, b + torch.rand(211, 2, generator=g) * 50], dim=1)
    b[:5] = a[:5]  # identical boxes: IoU exactly 1
    assert torch.equal(pairwise_iou(a, b), box_iou(a, b))


def test_one_validity_rule_for_arrays_and_tensors():
    # MIN_BOX_SIDE is compared in float32, as boxes are stored, whatever the dtype at hand
    side = np.float32(MIN_BOX_SIDE)
    boxes = np.array([[0, 0, side, 1], [0, 0, np.nextafter(side, 0), 1], [0, 0, 1, 0],
                      [np.nan, 0, 1, 1], [0, 0, np.inf, 1]], np.float32)
    for same in (boxes, boxes.astype(np.float64), torch.from_numpy(boxes)):
        assert box_areas_valid(same, MIN_BOX_SIDE).tolist() == [True, False, False, False, False]
        assert box_areas_valid(same).tolist() == [True, True, False, False, False]
    assert box_areas_valid(boxes[0], MIN_BOX_SIDE)  # one box -> one bool


def test_padded_size():
    assert padded_size(100, 129, 128) == (128, 256)
    assert padded_size(100, 129, 1) == padded_size(100, 129, 0) == (100, 129)
