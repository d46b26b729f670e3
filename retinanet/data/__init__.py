"""Data package: datasets (COCO, Pascal VOC, YOLO read into one in-memory COCO), albumentations
pipelines, batching."""
from __future__ import annotations

from ..errors import ConfigError, DataError
from .coco import CocoDetection, categories, label_mapping, load_coco
from .formats import check_dataset, load_dataset, read_dataset, resolve_format
from .loader import Batch, Collate, build_test_loader, build_train_loader, pad_images
from .policy import CHECKS, outcome
from .transforms import DetectionTransform, EvalTransform, build_transform

__all__ = ["Batch", "CocoDetection", "Collate", "categories", "DetectionTransform", "EvalTransform",
           "build_dataset", "build_test_loader", "build_train_loader", "build_transform",
           "check_dataset", "label_mapping", "load_coco", "load_dataset", "pad_images", "read_dataset"]


def build_dataset(data_cfg, *, train: bool, check: bool = False, log=None) -> CocoDetection:
    """The train or val split of the config, in its data.<split>.format (see
    retinanet.data.formats), with what retinanet.data.policy.CHECKS says training does with bad
    input. `check` runs the dataset checker first (files checked to exist, not decoded): the
    problems that stop training (for the data.skip_bad_images setting) are one DataError naming
    each check; the others are logged through `log`, one counted line per check. Without
    `check`, a voc or yolo problem that stops training is a DataError naming its file and line.
    Boxes are dropped or clipped by CocoDetection; missing 'info', 'area' and 'iscrowd' are
    filled in here (see fill_missing_fields); skipped images are left out or replaced by
    CocoDetection (skip_bad_images)."""
    split = data_cfg.train if train else data_cfg.val
    key = "data.train" if train else "data.val"
    if not split.images or not split.annotations:
        raise ConfigError(f"{key}.images and {key}.annotations must be set in the config")
    classes, skip = data_cfg.classes, data_cfg.skip_bad_images
    form = resolve_format(split.format, split.annotations, classes)
    if check:
        report = check_dataset(split.images, split.annotations, format=form, classes=classes,
                               read_images=False).with_skip_bad_images(skip)
        if report.errors:
            options = ("" if form == "coco" else f" --format {form}" +
                       (" --classes " + " ".join(classes) if classes else "")) + \
                (" --skip-bad-images" if skip else "")
            raise DataError(f"{key}: {split.annotations} cannot be used as it is (full report: "
                            f"python tools/check_dataset.py --images {split.images} --annotations "
                            f"{split.annotations}{options}): " + "; ".join(map(str, report.errors)))
        for issue in report.warnings:
            (log or print)(f"{key}: {issue}")
        dataset = report.dataset
    else:
        tolerated = {c for c in CHECKS if outcome(c, skip) != "stops"}
        dataset = load_dataset(split.images, split.annotations, form, classes, tolerate=tolerated,
                               log=log)
        if dataset is None:  # a COCO json: read here, so that missing fields can be filled in
            dataset = read_dataset(split.images, split.annotations, form)[0]
    fill_missing_fields(dataset)
    return CocoDetection(split.images, split.annotations, transform=build_transform(data_cfg, train=train),
                         label_map=data_cfg.label_map, skip_bad_images=skip, dataset=dataset,
                         replace_bad_images=train)


def fill_missing_fields(dataset: dict) -> None:
    """The repairs of missing_info, missing_area and missing_iscrowd (retinanet.data.policy), in
    place: "info" {}, "area" w * h of the bbox (0 when it is not 4 numbers), "iscrowd" 0, which
    pycocotools' evaluation needs. Entries that are not dicts are left to the checks."""
    dataset.setdefault("info", {})
    for ann in dataset.get("annotations", ()):
        if not isinstance(ann, dict):
            continue
        if "area" not in ann:
            bbox = ann.get("bbox")
            numbers = isinstance(bbox, list) and len(bbox) == 4 and \
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            ann["area"] = float(bbox[2] * bbox[3]) if numbers else 0.0
        ann.setdefault("iscrowd", 0)
