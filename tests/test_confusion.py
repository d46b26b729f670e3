"""The evaluation's confusion matrix, counted on a hand-made case, and its files."""
from __future__ import annotations

import json

import numpy as np
import torch

from retinanet.engine.confusion import confusion_matrix
from retinanet.engine.plots import confusion_figure, figure_array, per_class_ap_figure


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def test_confusion_matrix_counts_a_hand_made_case():
    # 3 classes, background index 3; rows = true class, columns = detected as
    targets = {
        1: (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32), np.array([0, 1, 2])),
        2: (np.array([[0, 0, 10, 10]], np.float32), np.array([1])),
        3: (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
    }
    detections = {
        # right (0 as 0); wrong class (1 as 2); a duplicate of object 0 (a false positive of class 0);
        # an object 2 found only below the score threshold (a miss); a box on nothing (false positive)
        1: _det([[0, 0, 10, 10], [20, 20, 30, 31], [1, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]],
                [0.9, 0.8, 0.7, 0.1, 0.5], [0, 2, 0, 2, 1]),
        # IoU 0.25 with its object: not a match (a miss and a false positive)
        2: _det([[0, 0, 5, 5]], [0.9], [1]),
        3: _det([[0, 0, 5, 5]], [0.95], [2]),  # no objects at all
    }
    counts = confusion_matrix(detections, targets, 3, iou_thresh=0.5, score_thresh=0.3)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 1  # object 0 detected as 0
    expected[1, 2] = 1  # object 1 detected as 2
    expected[2, 3] = 1  # object 2 missed (its detection scores 0.1)
    expected[1, 3] = 1  # image 2's object missed
    expected[3, 0] = 1  # the duplicate
    expected[3, 1] = 2  # the box on nothing, image 2's poor box
    expected[3, 2] = 1  # image 3's detection
    np.testing.assert_array_equal(counts, expected)
    # every object is in its row once, every kept detection in its column once
    assert counts[:3].sum() == 4 and counts[:, :3].sum() == 6


def test_higher_iou_pairs_match_first():
    targets = {1: (np.array([[0, 0, 10, 10], [4, 0, 14, 10]], np.float32), np.array([0, 1]))}
    # one detection overlaps both objects, the other only the first: the better pair wins
    detections = {1: _det([[4, 0, 14, 10], [1, 0, 11, 10]], [0.9, 0.8], [1, 0])}
    counts = confusion_matrix(detections, targets, 2, score_thresh=0.0)
    assert counts[0, 0] == 1 and counts[1, 1] == 1 and counts[2].sum() == 0 and counts[:, 2].sum() == 0


def test_figures_render():
    counts = np.array([[5, 1, 0], [0, 3, 2], [1, 0, 0]])
    image = figure_array(confusion_figure(counts, ["a", "b"], 0.3))
    bars = figure_array(per_class_ap_figure({"a": 0.5, "b": float("nan"), "c": 0.2}))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and image.std() > 0
    assert bars.shape[2] == 3 and bars.std() > 0


def test_evaluation_writes_the_confusion_matrix(shapes_dir, tmp_path):
    from types import SimpleNamespace

    from retinanet.data import CocoDetection
    from retinanet.engine.evaluator import Evaluator
    dataset = CocoDetection(shapes_dir / "val", shapes_dir / "annotations" / "instances_val.json")
    ids = dataset.image_ids
    loader = [SimpleNamespace(image_ids=ids[i:i + 4]) for i in range(0, len(ids), 4)]  # what predict reads
    truth = {}

    def predict(batch):  # the ground truth itself, labels shifted by one class for class 0
        out = []
        for image_id in batch.image_ids:
            boxes, labels = dataset.targets(image_id)
            labels = torch.as_tensor(labels)
            truth[image_id] = labels
            out.append({"boxes": torch.as_tensor(boxes), "scores": torch.ones(len(labels)),
                        "labels": torch.where(labels == 0, torch.ones_like(labels), labels)})
        return out

    result = Evaluator(dataset, loader, output_dir=tmp_path)(predict, log=lambda _: None)
    saved = json.loads((tmp_path / "confusion_matrix.json").read_text())
    counts = np.array(saved["counts"])
    assert saved["class_names"][-1] == "background" and saved["score_thresh"] == 0.3
    labels = torch.cat(list(truth.values()))
    num_classes = len(dataset.class_names)
    assert counts[0, 1] == int((labels == 0).sum()) and counts[0, 0] == 0
    for k in range(1, num_classes):
        assert counts[k, k] == int((labels == k).sum())
    assert counts[num_classes].sum() == 0 and counts[:, num_classes].sum() == 0
    assert result["confusion"]["counts"] == saved["counts"]
    for name in ("confusion_matrix", "per_class_ap", "pr_curve_iou50"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
