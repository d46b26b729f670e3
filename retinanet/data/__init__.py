"""Data package: COCO datasets, albumentations pipelines, batching."""
from __future__ import annotations

from ..errors import ConfigError, DataError
from .coco import CocoDetection, categories, label_mapping, load_coco
from .loader import Batch, Collate, build_test_loader, build_train_loader, pad_images
from .transforms import DetectionTransform, EvalTransform, build_transform

__all__ = ["Batch", "CocoDetection", "Collate", "categories", "DetectionTransform", "EvalTransform",
           "build_dataset", "build_test_loader", "build_train_loader", "build_transform",
           "label_mapping", "load_coco", "pad_images"]


# Problems of check_coco_dataset that loading copes with (see CocoDetection): anything else stops.
HANDLED_WHEN_LOADING = {"zero_size_box", "non_finite_box"}


def build_dataset(data_cfg, *, train: bool, check: bool = False, log=None) -> CocoDetection:
    """The train or val split of the config. `check` runs `check_coco_dataset` (files checked to
    exist, not decoded) first: problems loading copes with are logged through `log`; the others
    (and missing files unless data.skip_bad_images) are a DataError listing them, on one line.
    With data.skip_bad_images an unreadable image is replaced by the next one in training and left
    out (reported, not scored) in evaluation (see CocoDetection)."""
    split = data_cfg.train if train else data_cfg.val
    key = "data.train" if train else "data.val"
    if not split.images or not split.annotations:
        raise ConfigError(f"{key}.images and {key}.annotations must be set in the config")
    dataset = None
    if check:
        from .checks import check_coco_dataset

        report = check_coco_dataset(split.images, split.annotations, read_images=False)
        dataset = report.dataset
        handled = HANDLED_WHEN_LOADING | ({"image_missing"} if data_cfg.skip_bad_images else set())
        fatal = [issue for issue in report.errors if issue.check not in handled]
        if fatal:
            raise DataError(f"{key}: {split.annotations} cannot be used as it is (full report: "
                            f"python tools/check_dataset.py --images {split.images} --annotations "
                            f"{split.annotations}): " + "; ".join(str(i) for i in fatal))
        for issue in report.errors + report.warnings:
            (log or print)(f"{key}: {issue}")
    return CocoDetection(split.images, split.annotations, transform=build_transform(data_cfg, train=train),
                         label_map=data_cfg.label_map, skip_bad_images=data_cfg.skip_bad_images,
                         dataset=dataset, replace_bad_images=train)
