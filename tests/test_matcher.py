import pytest
import torch

from retinanet.losses import BACKGROUND, IGNORE, Matcher
from retinanet.losses.criterion import pad_targets

ANCHORS = torch.tensor([[0.0, 0.0, 10.0, 10.0],     # IoU 1 with gt0
                        [0.0, 0.0, 10.0, 11.5],     # IoU 0.87 with gt0
                        [5.0, 0.0, 15.0, 10.0],     # IoU 1/3 with gt0 -> background
                        [2.0, 0.0, 12.0, 10.0],     # IoU 0.667 -> fg
                        [3.0, 0.0, 13.0, 10.0],     # IoU 0.538 -> fg
                        [4.0, 0.0, 14.0, 10.0],     # IoU 0.4286 -> ignore (between 0.4 and 0.5)
                        [100.0, 100.0, 110.0, 110.0]])


def match(boxes_list, allow_low_quality=True):
    boxes, labels, valid = pad_targets(boxes_list, [torch.zeros(len(b), dtype=torch.long) for b in boxes_list])
    return Matcher(fg_iou=0.5, bg_iou=0.4, allow_low_quality=allow_low_quality)(ANCHORS, boxes, valid)


def test_thresholds():
    result = match([torch.tensor([[0.0, 0.0, 10.0, 10.0]])])[0]
    assert result.tolist() == [0, 0, BACKGROUND, 0, 0, IGNORE, BACKGROUND]


def test_low_quality_match_gives_every_box_a_positive():
    # gt overlapping anchor 6 with IoU 0.25 only: without low-quality matching it has no positive
    gt = torch.tensor([[100.0, 100.0, 120.0, 120.0]])
    assert (match([gt], allow_low_quality=False)[0] >= 0).sum() == 0
    result = match([gt])[0]
    assert result[6] == 0 and (result >= 0).sum() == 1


def test_degenerate_box_is_never_matched():
    # zero-width box: IoU 0 with everything; it must not make every anchor a low-quality match
    boxes = [torch.tensor([[50.0, 50.0, 50.0, 60.0], [0.0, 0.0, 10.0, 10.0]])]
    result = match(boxes)[0]
    assert not (result == 0).any()
    assert (result == 1).sum() == 4


def test_batch_with_different_box_counts_and_empty_image_equals_per_image():
    per_image = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [98.0, 100.0, 110.0, 110.0]]),
                 torch.zeros(0, 4), torch.tensor([[4.0, 0.0, 14.0, 10.0]])]
    batched = match(per_image)
    assert (batched[1] == BACKGROUND).all()
    for i, boxes in enumerate(per_image):
        assert torch.equal(batched[i], match([boxes])[0])


def test_all_images_empty():
    result = match([torch.zeros(0, 4), torch.zeros(0, 4)])
    assert result.shape == (2, len(ANCHORS)) and (result == BACKGROUND).all()


def test_low_quality_anchor_goes_to_the_box_it_is_best_for():
    # gt1's best anchor is anchor 2 (IoU 0.28), but anchor 2 overlaps gt0 more (IoU 1/3, still
    # background for gt0). Matching the low-quality anchor to its own best box (detectron2 /
    # torchvision) gave it to gt0 and left gt1 with no positive at all; it must go to gt1.
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [8.0, 0.0, 30.0, 10.0]])
    result = match([gts])[0]
    assert result.tolist() == [0, 0, 1, 0, 0, IGNORE, BACKGROUND]
    assert (result == 1).sum() == 1


def test_chunked_iou_gives_the_same_matches():
    g = torch.Generator().manual_seed(3)
    anchors = torch.rand(5000, 2, generator=g) * 200
    anchors = torch.cat([anchors, anchors + 4 + torch.rand(5000, 2, generator=g) * 60], dim=1)
    xy = torch.rand(3, 40, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 2 + torch.rand(3, 40, 2, generator=g) * 80], dim=2)
    valid = torch.rand(3, 40, generator=g) > 0.2
    for low_quality in (True, False):
        whole = Matcher(allow_low_quality=low_quality)(anchors, boxes, valid)
        chunked = Matcher(allow_low_quality=low_quality, max_iou_elements=3 * 40 * 333)(anchors, boxes, valid)
        assert torch.equal(whole, chunked)
        assert (whole >= 0).sum() > 50  # a meaningful case


def dense_reference(anchors, boxes, valid, fg=0.5, bg=0.4):
    """The matching rule on the whole (B, M, A) IoU matrix, written plainly."""
    from torchvision.ops import box_iou
    iou = torch.stack([box_iou(b, anchors) for b in boxes])  # (B, M, A)
    iou[~valid] = -1.0
    best_iou, result = iou.max(dim=1)
    result[best_iou < fg] = IGNORE
    result[best_iou < bg] = BACKGROUND
    best_per_gt = iou.max(dim=2, keepdim=True).values
    is_best = (iou == best_per_gt) & valid[..., None] & (best_per_gt > 0)
    low_quality = is_best.any(dim=1)
    best_for_gt = torch.where(is_best, iou, torch.full_like(iou, -1.0)).max(dim=1).indices
    return torch.where(low_quality, best_for_gt, result)


@pytest.mark.parametrize("chunk_elements", [7, 1000, 2 ** 18])
def test_chunked_two_pass_matcher_equals_the_dense_rule_with_ties(chunk_elements):
    # Integer coordinates on a coarse grid: many exact IoU ties, across chunks and between boxes
    g = torch.Generator().manual_seed(11)
    xy = torch.randint(0, 12, (700, 2), generator=g).float() * 4
    anchors = torch.cat([xy, xy + torch.randint(1, 6, (700, 2), generator=g).float() * 4], dim=1)
    bxy = torch.randint(0, 12, (3, 30, 2), generator=g).float() * 4
    boxes = torch.cat([bxy, bxy + torch.randint(1, 6, (3, 30, 2), generator=g).float() * 4], dim=2)
    valid = torch.rand(3, 30, generator=g) > 0.1
    ours = Matcher(max_iou_elements=chunk_elements)(anchors, boxes, valid)
    ref = dense_reference(anchors, boxes, valid)
    assert torch.equal(ours, ref)
    assert (ref >= 0).sum() > 100 and (ref == IGNORE).sum() > 0  # a meaningful case
