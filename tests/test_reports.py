"""What a run reports: tensorboard tags and images, validation loss, precision-recall curves,
the faster-coco-eval backend, and quiet progress output when not at a terminal."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retinanet.data import CocoDetection
from retinanet.engine import reporting as trainer_module
from retinanet.engine.evaluator import METRIC_NAMES, coco_evaluate
from retinanet.engine.trainer import Trainer


def test_tensorboard_tags_images_val_loss_and_pr_curves(tiny_config):
    tiny_config.eval.val_loss = True
    tiny_config.eval.num_vis_images = 2
    tiny_config.model.postprocess.score_thresh = 0.001  # detections exist after 4 iterations
    logs = []
    result = Trainer(tiny_config, log=logs.append).train()
    run = tiny_config.output_dir
    events = EventAccumulator(f"{run}/tensorboard", size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/loss_cls", "train/loss_box", "train/lr", "train/grad_norm",
                "train/images_per_sec", "train/data_time", "train/num_fg", "val/loss",
                "val/loss_cls", "val/loss_box"}
    expected |= {f"eval/{name}" for name in METRIC_NAMES[:6]}
    expected |= {f"eval_per_class/AP/{name}" for name in ("circle", "square", "triangle", "star", "cross")}
    assert expected <= scalars, expected - scalars
    images = events.Tags()["images"]
    assert sorted(t for t in images if not t.startswith("val_images/")) == ["eval/confusion_matrix", "eval/per_class_ap"]
    assert len([t for t in images if t.startswith("val_images/")]) == 2
    assert events.Scalars("train/lr")[-1].step == 4
    assert result["val_loss"]["loss"] == pytest.approx(events.Scalars("val/loss")[-1].value, rel=1e-6)
    assert any(line.startswith("validation loss") for line in logs)
    for name in ("pr_curve_iou50", "pr_curve_iou75", "confusion_matrix", "per_class_ap"):
        with Image.open(f"{run}/eval/{name}.png") as image:
            assert image.size[0] > 300 and image.size[1] > 200
    # not at a terminal (pytest captures output): log lines, no progress bar
    assert any(line.startswith("iter      4/4") and "data" in line for line in logs)


def test_progress_bars_only_for_a_terminal(monkeypatch):
    monkeypatch.setattr(trainer_module.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    bar = trainer_module._progress_bar(True, total=3, disable=True)
    assert bar is not None
    bar.close()
    assert trainer_module._progress_bar(False, total=3) is None  # other ranks never
    monkeypatch.setenv("CI", "true")
    assert trainer_module._progress_bar(True, total=3) is None


def _noisy_results(dataset: CocoDetection, seed: int) -> list[dict]:
    """Ground truth boxes moved a little, with random scores, plus some false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for image_id in dataset.image_ids:
        for ann in dataset.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            dx, dy = rng.normal(0, 0.15 * w), rng.normal(0, 0.15 * h)
            results.append({"image_id": image_id, "category_id": ann["category_id"],
                            "bbox": [x + dx, y + dy, w, h], "score": float(rng.uniform(0.05, 1))})
            if rng.uniform() < 0.5:
                results.append({"image_id": image_id, "category_id": int(rng.choice(dataset.cat_ids)),
                                "bbox": [float(v) for v in rng.uniform(0, 100, 4)],
                                "score": float(rng.uniform(0.05, 1))})
    return results


@pytest.mark.parametrize("max_dets", [100, 5])
def test_faster_coco_eval_gives_the_same_numbers(shapes_dir, max_dets):
    pytest.importorskip("faster_coco_eval")
    dataset = CocoDetection(shapes_dir / "val", shapes_dir / "annotations" / "instances_val.json")
    results = _noisy_results(dataset, seed=max_dets)
    reference = coco_evaluate(dataset.coco, results, max_dets=max_dets)
    faster = coco_evaluate(dataset.coco, results, max_dets=max_dets, backend="faster_coco_eval")
    assert 0.05 < reference["metrics"]["AP"] < 0.95  # a non-trivial case
    for name in METRIC_NAMES:
        assert faster["metrics"][name] == pytest.approx(reference["metrics"][name], abs=1e-4), name
    for name, ap in reference["per_class"].items():
        assert faster["per_class"][name] == pytest.approx(ap, abs=1e-4, nan_ok=True), name
    np.testing.assert_allclose(faster["precision"], reference["precision"], atol=1e-4)


def test_unknown_backend_is_a_config_error(shapes_dir, tmp_path):
    from retinanet.config import ConfigError, load_config
    from conftest import REPO_ROOT
    with pytest.raises(ConfigError, match="eval.backend"):
        load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", ["eval.backend=fast"])
