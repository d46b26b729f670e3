"""Data package: datasets (COCO, Pascal VOC, YOLO read into one in-memory COCO), albumentations
pipelines, batching."""
from __future__ import annotations

from ..errors import ConfigError, DataError
from .coco import CocoDetection, categories, label_mapping, load_coco
from .formats import check_dataset, load_dataset, read_dataset, resolve_format
from .loader import Batch, Collate, build_test_loader, build_train_loader, pad_images
from .transforms import DetectionTransform, EvalTransform, build_transform

__all__ = ["Batch", "CocoDetection", "Collate", "categories", "DetectionTransform", "EvalTransform",
           "build_dataset", "build_test_loader", "build_train_loader", "build_transform",
           "check_dataset", "label_mapping", "load_coco", "load_dataset", "pad_images", "read_dataset"]


# Problems of check_coco_dataset that loading copes with (see CocoDetection): anything else stops.
HANDLED_WHEN_LOADING = {"zero_size_box", "non_finite_box"}
# With data.skip_bad_images: image files that are missing (left out at load) or, for voc / yolo
# datasets, whose size cannot be read (left out when reading them).
SKIPPED_IMAGE_CHECKS = {"image_missing", "image_unreadable"}


def build_dataset(data_cfg, *, train: bool, check: bool = False, log=None) -> CocoDetection:
    """The train or val split of the config, in its data.<split>.format (see
    retinanet.data.formats). `check` runs the dataset checker (files checked to exist, not
    decoded) first: problems loading copes with are logged through `log`; the others (and
    missing files unless data.skip_bad_images) are a DataError listing them, on one line.
    Without `check`, a voc or yolo file that cannot be read as given is a DataError naming its
    file and line. With data.skip_bad_images an unreadable image is replaced by the next one in
    training and left out (reported, not scored) in evaluation (see CocoDetection)."""
    split = data_cfg.train if train else data_cfg.val
    key = "data.train" if train else "data.val"
    if not split.images or not split.annotations:
        raise ConfigError(f"{key}.images and {key}.annotations must be set in the config")
    classes = data_cfg.classes
    tolerated = SKIPPED_IMAGE_CHECKS if data_cfg.skip_bad_images else set()
    form = resolve_format(split.format, split.annotations, classes)
    if check:
        report = check_dataset(split.images, split.annotations, format=form, classes=classes,
                               read_images=False)
        dataset = report.dataset
        fatal = [i for i in report.errors if i.check not in HANDLED_WHEN_LOADING | tolerated]
        if fatal:
            options = "" if form == "coco" else f" --format {form}" + \
                (" --classes " + " ".join(classes) if classes else "")
            raise DataError(f"{key}: {split.annotations} cannot be used as it is (full report: "
                            f"python tools/check_dataset.py --images {split.images} --annotations "
                            f"{split.annotations}{options}): " + "; ".join(str(i) for i in fatal))
        for issue in report.errors + report.warnings:
            (log or print)(f"{key}: {issue}")
    else:
        dataset = load_dataset(split.images, split.annotations, form, classes, tolerate=tolerated,
                               log=log)
    return CocoDetection(split.images, split.annotations, transform=build_transform(data_cfg, train=train),
                         label_map=data_cfg.label_map, skip_bad_images=data_cfg.skip_bad_images,
                         dataset=dataset, replace_bad_images=train)
