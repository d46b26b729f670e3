"""Test-time augmentation: views made from the batch, boxes mapped back, duplicates merged."""
from __future__ import annotations

import pytest
import torch

from retinanet.data.loader import Batch, pad_images
from retinanet.errors import ConfigError
from retinanet.predictor import merge_detections
from retinanet.tta import TestTimeAugmentation, fuse_detections, mirror_boxes, predict_with_tta, view_batch


def _batch() -> Batch:
    """Two images (their resized size is their original size / 2): a bright 4 x 6 block each."""
    images = [torch.zeros(3, 32, 48), torch.zeros(3, 40, 24)]
    images[0][:, 8:12, 5:11] = 1.0
    images[1][:, 20:24, 14:20] = 1.0
    return Batch(images=pad_images(images, 16), boxes=[], labels=[], image_ids=[1, 2],
                 image_sizes=[(32, 48), (40, 24)], orig_sizes=[(64, 96), (80, 48)])


def _find_block(batch: Batch) -> list[dict[str, torch.Tensor]]:
    """A stand-in network: the bright block's box in each view, in original pixels (as a
    Detector's predict_batch returns), score by view size so that views differ."""
    out = []
    for image, (h, w), (oh, ow) in zip(batch.images, batch.image_sizes, batch.orig_sizes):
        ys, xs = torch.nonzero(image[0, :h, :w] > 0.5, as_tuple=True)
        box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        box = box * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        out.append({"boxes": box[None], "scores": torch.tensor([0.5 + h / 1000]), "labels": torch.tensor([3])})
    return out


def test_views_flip_and_scale_the_unpadded_images():
    batch = _batch()
    flipped = view_batch(batch, 1.0, True, 16)
    assert flipped.image_sizes == batch.image_sizes
    assert torch.equal(flipped.images[0, :, :32, :48], batch.images[0, :, :32, :48].flip(-1))
    assert torch.equal(flipped.images[1, :, :40, :24], batch.images[1, :, :40, :24].flip(-1))
    larger = view_batch(batch, 1.5, False, 16)
    assert larger.image_sizes == [(48, 72), (60, 36)] and larger.images.shape[-2:] == (64, 80)
    assert larger.orig_sizes == batch.orig_sizes


def test_a_flipped_duplicate_merges_into_one_detection_in_original_pixels():
    batch = _batch()
    plain = _find_block(batch)
    merged = predict_with_tta(_find_block, batch,
                              TestTimeAugmentation(scales=(1.0,), hflip=True, merge="nms"),
                              size_divisibility=16, nms_thresh=0.5, max_detections=100)
    for found, expected in zip(merged, plain):
        # the flipped view found the block on the other side; mirrored back it is the same box
        assert len(found["boxes"]) == 1 and torch.equal(found["boxes"], expected["boxes"])
    assert torch.equal(plain[0]["boxes"], torch.tensor([[10.0, 16.0, 22.0, 24.0]]))
    # at another scale the block's box is the same object within the resampling's pixel
    scaled = predict_with_tta(_find_block, batch,
                              TestTimeAugmentation(scales=(1.0, 2.0), hflip=True, merge="nms"),
                              size_divisibility=16, nms_thresh=0.5, max_detections=100)
    assert [len(s["boxes"]) for s in scaled] == [1, 1]
    assert scaled[0]["scores"].item() == pytest.approx(0.5 + 64 / 1000)  # the larger view's, kept by NMS


def _dets(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_weighted_box_fusion_averages_a_cluster_by_score_and_discounts_lone_boxes():
    views = [_dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.8, 0.6], [1, 1]),
             _dets([[2, 0, 12, 10], [0, 0, 10, 10]], [0.4, 0.9], [1, 2])]
    fused = fuse_detections(views, iou_thresh=0.55, max_detections=100)
    # class 1: the boxes at x 0 and x 2 (IoU 0.67) fuse; weights 0.8 and 0.4 -> x 2/3 further right
    # score (0.8 + 0.4) / 2, both views agree; the lone 0.6 and the class-2 box count half (1 of 2 views)
    assert fused["labels"].tolist() == [1, 2, 1]
    torch.testing.assert_close(fused["scores"], torch.tensor([0.6, 0.45, 0.3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(fused["boxes"][0], torch.tensor([2 / 3, 0, 10 + 2 / 3, 10]), rtol=0, atol=1e-5)
    assert torch.equal(fused["boxes"][1], torch.tensor([0.0, 0, 10, 10]))  # another class: not fused
    assert len(fuse_detections(views, iou_thresh=0.55, max_detections=2)["boxes"]) == 2
    empty = fuse_detections([_dets([], [], []).copy() | {"boxes": torch.zeros(0, 4)}], iou_thresh=0.55,
                            max_detections=100)
    assert empty["boxes"].shape == (0, 4) and len(empty["scores"]) == 0


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_class_agnostic_keeps_one_label_per_object_across_views(merge):
    def relabel(batch):  # the larger view calls the block class 4, the plain one class 3
        return [dict(found, labels=torch.tensor([4 if h > 40 else 3]))
                for found, (h, _) in zip(_find_block(batch), batch.image_sizes)]
    tta = TestTimeAugmentation(scales=(1.0, 2.0), hflip=False, merge=merge)
    per_class = predict_with_tta(relabel, _batch(), tta, size_divisibility=16, nms_thresh=0.5,
                                 max_detections=100)
    agnostic = predict_with_tta(relabel, _batch(), tta, size_divisibility=16, nms_thresh=0.5,
                                max_detections=100, class_agnostic=True)
    assert [sorted(found["labels"].tolist()) for found in per_class] == [[3, 4], [3, 4]]
    assert [found["labels"].tolist() for found in agnostic] == [[4], [4]]  # the better-scored view's


def test_a_flipped_duplicate_fuses_into_one_detection_with_wbf():
    batch = _batch()
    plain = _find_block(batch)
    fused = predict_with_tta(_find_block, batch, TestTimeAugmentation(scales=(1.0,), hflip=True, merge="wbf"),
                             size_divisibility=16, nms_thresh=0.5, max_detections=100)
    for found, expected in zip(fused, plain):
        assert len(found["boxes"]) == 1 and torch.equal(found["boxes"], expected["boxes"])
        assert torch.equal(found["scores"], expected["scores"])  # both views agree: the mean, undiscounted
    with pytest.raises(ConfigError, match="eval.tta.merge"):
        TestTimeAugmentation(merge="mean")


def test_merge_keeps_other_classes_and_caps_the_count():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    parts = [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
             {"boxes": box + 0.5, "scores": torch.tensor([0.8]), "labels": torch.tensor([0])},
             {"boxes": box, "scores": torch.tensor([0.7]), "labels": torch.tensor([1])}]
    merged = merge_detections(parts, nms_thresh=0.5, max_detections=100)
    assert merged["labels"].tolist() == [0, 1] and merged["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert len(merge_detections(parts, nms_thresh=0.5, max_detections=1)["labels"]) == 1


def test_mirror_and_bad_scales():
    assert mirror_boxes(torch.tensor([[1.0, 2.0, 4.0, 5.0]]), 10).tolist() == [[6.0, 2.0, 9.0, 5.0]]
    with pytest.raises(ConfigError, match="eval.tta.scales"):
        TestTimeAugmentation(scales=(0.0,))


def test_tta_does_not_lower_ap_of_a_trained_tiny_model(overfit_run):
    """Trained on four images with flips (conftest's overfit_run), scored on the same images: the
    mirrored views agree with the plain one, so merging them cannot lose an object the plain view
    finds; AP is not lowered."""
    from types import SimpleNamespace

    from retinanet.data import CocoDetection
    from retinanet.detector import Detector
    from retinanet.engine.evaluator import Evaluator

    images, annotations = overfit_run.images, overfit_run.annotations
    dataset = CocoDetection(images, annotations)
    loader = [SimpleNamespace(image_ids=dataset.image_ids)]
    detector = Detector.from_checkpoint(overfit_run.run / "model_final.pth", device="cpu")

    def predict(batch):
        return detector.predict([dataset.read_image(i) for i in batch.image_ids])

    plain = Evaluator(dataset, loader)(predict, log=lambda s: None)["metrics"]
    detector.tta = TestTimeAugmentation(scales=(1.0,), hflip=True)
    flipped = Evaluator(dataset, loader)(predict, log=lambda s: None)["metrics"]
    assert plain["AP50"] > 0.5, plain  # a model that finds the objects
    assert flipped["AP"] >= plain["AP"] and flipped["AP50"] >= plain["AP50"], (plain, flipped)
