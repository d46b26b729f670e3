import json
import shutil

import pytest
import torch

from retinanet.config import load_config
from retinanet.data import CocoDetection, build_dataset, build_test_loader
from retinanet.engine.evaluator import Evaluator, coco_evaluate, to_coco_results
from retinanet.errors import MissingFileError

from conftest import REPO_ROOT, tiny_overrides


class FakeBatch:
    def __init__(self, image_ids):
        self.image_ids = image_ids


def gt_detections(dataset, image_id, score=0.9):
    boxes, labels = dataset.targets(image_id)
    return {"boxes": torch.as_tensor(boxes), "scores": torch.full((len(boxes),), score),
            "labels": torch.as_tensor(labels)}


@pytest.fixture(scope="module")
def val_set(shapes_dir):
    return CocoDetection(shapes_dir / "val", shapes_dir / "annotations" / "instances_val.json")


def test_perfect_detections_give_ap_one(val_set, tmp_path):
    loader = [FakeBatch(val_set.image_ids[:4]), FakeBatch(val_set.image_ids[4:])]
    result = Evaluator(val_set, loader, output_dir=tmp_path, max_dets=100)(
        lambda batch: [gt_detections(val_set, i) for i in batch.image_ids], log=lambda s: None)
    assert result["metrics"]["AP"] == pytest.approx(1.0)
    assert result["metrics"]["AP50"] == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for ap in result["per_class"].values())
    written = json.loads((tmp_path / "coco_results.json").read_text())
    num_boxes = sum(len(val_set.targets(i)[0]) for i in val_set.image_ids)
    assert len(written) == num_boxes
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metrics"]["AP"] == pytest.approx(1.0) and metrics["max_dets"] == 100


@pytest.mark.parametrize("max_dets", [50, 300])
def test_headline_ap_at_other_max_dets(val_set, max_dets):
    # pycocotools computes its first number at a hard-coded maxDets=100; ours follows max_dets
    results = []
    for image_id in val_set.image_ids:
        results += to_coco_results(image_id, gt_detections(val_set, image_id), val_set.label_to_cat_id)
    result = coco_evaluate(val_set.coco, results, max_dets=max_dets)
    assert result["metrics"]["AP"] == pytest.approx(1.0)
    assert f"maxDets={max_dets:>3} ] = 1.000" in result["summary"].splitlines()[0]


# pycocotools' area ranges of the size buckets, and the metrics that read each
AREA_RANGES = {"all": (0, 1e10), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2),
               "large": (96 ** 2, 1e10)}
BUCKET_METRICS = {"all": ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"), "small": ("APs", "ARs"),
                  "medium": ("APm", "ARm"), "large": ("APl", "ARl")}


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_zero_detections_score_zero_where_there_is_ground_truth_and_minus_one_elsewhere(
        val_set, tmp_path, backend):
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval")
    areas = [a["area"] for a in val_set.coco.dataset["annotations"] if not a.get("iscrowd", 0)]
    has_gt = {bucket: any(lo <= area <= hi for area in areas) for bucket, (lo, hi) in AREA_RANGES.items()}
    assert not has_gt["large"] and has_gt["small"]  # shapes at 128 px: no object is large
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    logs = []
    result = Evaluator(val_set, [FakeBatch(val_set.image_ids)], output_dir=tmp_path, backend=backend)(
        lambda batch: [empty for _ in batch.image_ids], log=logs.append)
    expected = {name: 0.0 if has_gt[bucket] else -1.0
                for bucket, names in BUCKET_METRICS.items() for name in names}
    assert result["metrics"] == expected
    assert all(ap == 0.0 for ap in result["per_class"].values())  # every class has ground truth
    assert "APl n/a" in logs[-1] and "APs 0.00" in logs[-1]
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["APl"] == -1.0
    assert json.loads((tmp_path / "coco_results.json").read_text()) == []


def test_results_use_xywh_and_original_category_ids():
    det = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([1])}
    (res,) = to_coco_results(77, det, {0: 3, 1: 90})
    assert res == {"image_id": 77, "category_id": 90, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}


def test_shifted_boxes_lower_ap(val_set):
    results = []
    for image_id in val_set.image_ids:
        det = gt_detections(val_set, image_id)
        det["boxes"] = det["boxes"] + 3.0  # small objects lose IoU quickly
        results += to_coco_results(image_id, det, val_set.label_to_cat_id)
    metrics = coco_evaluate(val_set.coco, results)["metrics"]
    assert 0 < metrics["AP"] < 0.9


@pytest.mark.parametrize("batch_size", [1, 3])  # 1: a batch of the unreadable image alone
def test_unreadable_val_image_with_skip_bad_images_is_left_out_once(shapes_dir, tmp_path, batch_size):
    images = tmp_path / "val"
    shutil.copytree(shapes_dir / "val", images)
    annotations = tmp_path / "instances_val.json"
    shutil.copy(shapes_dir / "annotations" / "instances_val.json", annotations)
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                         tiny_overrides(shapes_dir, tmp_path / "run")
                         + [f"data.val.images={images}", f"data.val.annotations={annotations}",
                            "data.skip_bad_images=true"])
    dataset = build_dataset(config.data, train=False)
    bad_id = dataset.image_ids[1]  # not the last: a replacement would duplicate the next image
    bad_file = dataset.image_path(bad_id)
    bad_file.write_bytes(b"not an image")
    assert len(dataset.targets(bad_id)[0]) > 0  # its boxes would count as missed if it were scored
    loader = build_test_loader(dataset, batch_size=batch_size, num_workers=0,
                               size_divisibility=config.data.size_divisibility)
    seen = []

    def predict(batch):  # perfect detections, in original pixels
        seen.extend(batch.image_ids)
        assert batch.images.shape[0] == len(batch.image_ids) > 0
        return [gt_detections(dataset, i) for i in batch.image_ids]

    logs = []
    result = Evaluator(dataset, loader, output_dir=tmp_path / "eval")(predict, log=logs.append)
    good = [i for i in dataset.image_ids if i != bad_id]
    assert sorted(seen) == good  # each readable image once, the unreadable one not at all
    assert sorted(result["predictions"]) == good
    # scored over the readable images only: the unreadable one's boxes are not counted as missed
    assert result["metrics"]["AP"] == pytest.approx(1.0) and result["metrics"]["AR100"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    assert {r["image_id"] for r in written} == set(good)
    assert len(written) == sum(len(dataset.targets(i)[0]) for i in good)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["skipped_images"] == [str(bad_file)]
    assert any(f"left out of the evaluation 1 unreadable image(s) of {len(dataset)}" in line
               and f"{bad_file} (id {bad_id})" in line for line in logs)


def test_unreadable_val_image_without_skip_bad_images_is_an_error_naming_it(shapes_dir, tmp_path):
    images = tmp_path / "val"
    shutil.copytree(shapes_dir / "val", images)
    dataset = CocoDetection(images, shapes_dir / "annotations" / "instances_val.json")
    bad_file = dataset.image_path(dataset.image_ids[0])
    bad_file.write_bytes(b"not an image")
    with pytest.raises(MissingFileError, match=rf"cannot read image .*{bad_file.name}.*data\.skip_bad_images=true"):
        dataset[0]
