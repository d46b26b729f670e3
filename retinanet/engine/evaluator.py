"""COCO evaluation with pycocotools: predictions -> results json -> COCOeval -> AP table."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert
from tqdm import tqdm

from ..data.coco import categories
from ..errors import ConfigError, DataError
from .distributed import broadcast_from_main, gather_to_main
from .confusion import confusion_matrix
from .plots import confusion_figure, per_class_ap_figure, pr_curve_figures, save_figures

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(image_id: int, detections: dict, label_to_cat_id: dict[int, int]) -> list[dict]:
    """One image's {"boxes" (N, 4) xyxy in original pixels, "scores", "labels"} -> COCO result dicts
    with xywh boxes, the dataset's own (sparse) category ids and its image id. Labels that are no
    category of the dataset (torchvision's "N/A" outputs under data.label_map category_id) cannot
    be scored and are left out; `Evaluator` counts them."""
    boxes = box_convert(detections["boxes"].float().cpu(), "xyxy", "xywh").tolist()
    scores = detections["scores"].float().cpu().tolist()
    labels = detections["labels"].cpu().tolist()
    return [{"image_id": int(image_id), "category_id": int(label_to_cat_id[lab]),
             "bbox": [round(v, 2) for v in box], "score": round(score, 5)}
            for box, score, lab in zip(boxes, scores, labels) if lab in label_to_cat_id]


BACKENDS = ("pycocotools", "faster_coco_eval")


def _cocoeval(coco_gt: COCO, results: list[dict], backend: str):
    """A COCOeval of `backend` over `results`, before evaluate(). faster-coco-eval (C++) is a
    drop-in reimplementation; it needs its own COCO object, built from the same dataset dict."""
    if backend == "pycocotools":
        with contextlib.redirect_stdout(io.StringIO()):
            return COCOeval(coco_gt, _load_results(coco_gt, results), iouType="bbox")
    if backend != "faster_coco_eval":
        raise ValueError(f"eval.backend must be one of {BACKENDS}, got {backend!r}")
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        raise ConfigError("eval.backend faster_coco_eval needs the faster-coco-eval package: "
                          "pip install -e .[fast-eval], or set eval.backend=pycocotools") from None
    gt = FasterCOCO()
    gt.dataset = coco_gt.dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        return COCOeval_faster(gt, gt.loadRes(results), iouType="bbox", print_function=lambda *a: None)


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """pycocotools' loadRes, which fails on an empty list (it reads results[0]); no results are
    a COCO of the ground truth's images and categories without annotations, as faster-coco-eval's
    loadRes makes, so that COCOeval scores them like any other result."""
    if results:
        return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                     "categories": copy.deepcopy(coco_gt.dataset.get("categories", []))}
    empty.createIndex()
    return empty


def coco_evaluate(coco_gt: COCO, results: list[dict], *, max_dets: int = 100,
                  image_ids: Optional[Sequence[int]] = None, backend: str = "pycocotools") -> dict:
    """Scores `results` against `coco_gt` with `backend` (pycocotools or faster_coco_eval, which
    agree to 1e-4). Returns {"metrics": {name: value}, "per_class": {name: AP}, "summary": text,
    "precision": (T=10 IoUs, R=101 recall points, K classes) array of area "all" at max_dets,
    -1 where undefined, "class_names": K names}.

    maxDets for AP is `max_dets` (AR is reported at 1, 10 and max_dets). Zero detections are a valid
    result, scored like any other: 0 where there is ground truth, -1 for a size bucket without any.
    """
    class_names = dict(zip(*categories(coco_gt)))
    evaluator = _cocoeval(coco_gt, results, backend)
    evaluator.params.maxDets = [1, 10, max_dets]
    if image_ids is not None:
        evaluator.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = list(evaluator.stats)
    # summarize() computes the headline AP at a hard-coded maxDets=100 (-1 for any other value);
    # recompute it at our maxDets, as its other AP lines are.
    all_ap = evaluator.eval["precision"][:, :, :, 0, -1]
    stats[0] = float(all_ap[all_ap > -1].mean()) if (all_ap > -1).any() else -1.0
    # pycocotools reports -1 for a size bucket without ground truth; keep that meaning.
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, stats)}
    precision = np.asarray(evaluator.eval["precision"])  # (T iou, R recall, K class, A area, M maxdets)
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[class_names[cat_id]] = float(values.mean()) if values.size else float("nan")
    return {"metrics": metrics, "per_class": per_class, "summary": _summary_text(metrics, max_dets),
            "precision": precision[:, :, :, 0, -1],
            "class_names": [class_names[c] for c in evaluator.params.catIds]}


def _summary_text(metrics: dict, max_dets: int) -> str:
    """pycocotools' 12-line summary, with the maxDets actually used."""
    titles = ["Average Precision"] * 6 + ["Average Recall"] * 6
    ious = ["0.50:0.95", "0.50", "0.75"] + ["0.50:0.95"] * 9
    areas = ["all"] * 3 + ["small", "medium", "large"] + ["all"] * 3 + ["small", "medium", "large"]
    dets = [max_dets] * 6 + [1, 10] + [max_dets] * 4
    return "\n".join(f" {title:<18} ({name[:2]}) @[ IoU={iou:<9} | area={area:>6} | maxDets={det:>3} ] = "
                     f"{metrics[name]:0.3f}" for title, name, iou, area, det
                     in zip(titles, METRIC_NAMES, ious, areas, dets))


def format_report(result: dict, max_dets: int) -> str:
    """The 12-number summary and a per-class AP table, as printed after evaluation."""
    lines = [f"COCO bbox evaluation (maxDets={max_dets})",
             result["summary"].rstrip(),
             "", f"{'category':<20} {'AP':>6}"]
    lines += [f"{name:<20} {100 * ap:6.2f}" for name, ap in result["per_class"].items()]
    m = result["metrics"]
    lines.append("")
    # -1 is pycocotools' "no ground truth in this size bucket"
    lines.append(" | ".join(f"{n} {100 * m[n]:.2f}" if m[n] >= 0 else f"{n} n/a" for n in METRIC_NAMES[:6]))
    return "\n".join(lines)


def evaluation_figures(result: dict) -> dict:
    """{name: matplotlib Figure} of an evaluation's result: its precision-recall curves, per-class
    AP and confusion matrix (files eval/<name>.png, tensorboard images eval/<name>)."""
    confusion = result["confusion"]
    return {**pr_curve_figures(result["precision"], result["class_names"]),
            "per_class_ap": per_class_ap_figure(result["per_class"]),
            "confusion_matrix": confusion_figure(np.asarray(confusion["counts"]), confusion["class_names"][:-1],
                                                 confusion["score_thresh"])}


class Evaluator:
    """Runs `predict(batch) -> per-image detections in original pixels` over a loader, writes
    `coco_results.json`, `metrics.json` and `confusion_matrix.json` to output_dir (and with
    `pr_curves` the figures of `plots`), prints and returns the scores. The confusion matrix counts
    detections scoring at least `confusion_score_thresh` (see confusion.confusion_matrix).

    Distributed: each rank runs its shard of the images (build_test_loader's rank / world_size),
    rank 0 gathers every rank's results, scores them once with pycocotools, writes and prints;
    all ranks return the scores, and rank 0 alone the predictions.

    Images a batch lists in `skipped` (unreadable, with data.skip_bad_images) are left out of the
    scores and named in the log and in metrics.json; every other image must be predicted once."""

    def __init__(self, dataset, loader: Iterable, *, output_dir: str | Path | None = None,
                 max_dets: int = 100, backend: str = "pycocotools", pr_curves: bool = True,
                 confusion_score_thresh: float = 0.3, progress: bool = False):
        self.dataset, self.loader = dataset, loader
        self.output_dir = Path(output_dir) if output_dir else None
        self.max_dets, self.backend, self.pr_curves = max_dets, backend, pr_curves
        self.confusion_score_thresh, self.progress = confusion_score_thresh, progress

    @torch.no_grad()
    def __call__(self, predict: Callable, *, log: Callable[[str], None] = print) -> dict:
        results: list[dict] = []
        predictions: dict[int, dict] = {}
        predicted: list[int] = []  # image ids in loader order: each must come once
        skipped: list[tuple[int, str]] = []  # (image id, file) of unreadable images
        num_detections = 0
        batches = tqdm(self.loader, desc="evaluating", unit="batch", leave=False,
                       dynamic_ncols=True) if self.progress else self.loader
        for batch in batches:
            skipped += getattr(batch, "skipped", [])  # a plain loader's batches have no such field
            if not batch.image_ids:  # every image of this batch was unreadable
                continue
            for image_id, detections in zip(batch.image_ids, predict(batch)):
                results += to_coco_results(image_id, detections, self.dataset.label_to_cat_id)
                num_detections += len(detections["labels"])
                predictions[image_id] = {k: v.cpu() for k, v in detections.items()}
                predicted.append(image_id)
        gathered = gather_to_main((results, predictions, num_detections, predicted, skipped))
        if gathered is None:  # not rank 0: wait for its scores
            return broadcast_from_main(None)
        # Dataset order, whatever the sharding: COCOeval breaks score ties by input order, so this
        # makes distributed scores equal to single-process ones.
        order = {image_id: i for i, image_id in enumerate(self.dataset.image_ids)}
        results = sorted((r for part in gathered for r in part[0]), key=lambda r: order[r["image_id"]])
        predictions = {k: v for part in gathered for k, v in part[1].items()}
        num_detections = sum(part[2] for part in gathered)
        predicted = [image_id for part in gathered for image_id in part[3]]
        skipped = sorted(s for part in gathered for s in part[4])
        skipped_ids = {image_id for image_id, _ in skipped}
        if sorted(predicted + [image_id for image_id, _ in skipped]) != sorted(self.dataset.image_ids):
            raise RuntimeError(f"evaluation predicted {len(predicted)} images ({len(predictions)} "
                               f"distinct) and skipped {len(skipped)} of {len(self.dataset.image_ids)}: "
                               "the loader must cover the dataset, each image once")
        image_ids = [i for i in self.dataset.image_ids if i not in skipped_ids]
        if skipped:
            log(f"left out of the evaluation {len(skipped)} unreadable image(s) of "
                f"{len(self.dataset.image_ids)} (data.skip_bad_images is true): "
                + ", ".join(f"{file} (id {image_id})" for image_id, file in skipped[:10])
                + (", ..." if len(skipped) > 10 else ""))
        if not image_ids:
            raise DataError(f"none of the {len(skipped)} evaluation images can be read (first: "
                            f"{skipped[0][1]}); check the files of data.val.images")
        if num_detections > len(results):
            log(f"{num_detections - len(results)} of {num_detections} detections have a label that "
                "is no category of the dataset (\"N/A\" outputs) and are not scored")
        result = coco_evaluate(self.dataset.coco, results, max_dets=self.max_dets,
                               image_ids=image_ids, backend=self.backend)
        counts = confusion_matrix(predictions, {i: self.dataset.targets(i) for i in image_ids},
                                  len(self.dataset.class_names), score_thresh=self.confusion_score_thresh)
        result["confusion"] = {"counts": counts.tolist(), "class_names": [*self.dataset.class_names, "background"],
                               "iou": 0.5, "score_thresh": self.confusion_score_thresh,
                               "rows": "true class", "columns": "detected as"}
        if self.output_dir and self.pr_curves:
            save_figures(evaluation_figures(result), self.output_dir)
        if self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "confusion_matrix.json").write_text(json.dumps(result["confusion"], indent=1))
            (self.output_dir / "coco_results.json").write_text(json.dumps(results))
            (self.output_dir / "metrics.json").write_text(json.dumps(
                {"metrics": result["metrics"], "per_class": result["per_class"],
                 "max_dets": self.max_dets, "num_detections": len(results),
                 "backend": self.backend, "skipped_images": [file for _, file in skipped]}, indent=2))
        log(format_report(result, self.max_dets))
        broadcast_from_main(result)
        result["predictions"] = predictions
        return result
