"""Data package: COCO datasets, albumentations pipelines, batching."""
from __future__ import annotations

from .coco import CocoDetection, categories, label_mapping, load_coco
from .loader import Batch, Collate, build_test_loader, build_train_loader, pad_images
from .transforms import DetectionTransform, EvalTransform, build_transform

__all__ = ["Batch", "CocoDetection", "Collate", "categories", "DetectionTransform", "EvalTransform",
           "build_dataset", "build_test_loader", "build_train_loader", "build_transform",
           "label_mapping", "load_coco", "pad_images"]


def build_dataset(data_cfg, *, train: bool) -> CocoDetection:
    split = data_cfg.train if train else data_cfg.val
    key = "data.train" if train else "data.val"
    if not split.images or not split.annotations:
        raise ValueError(f"{key}.images and {key}.annotations must be set in the config")
    return CocoDetection(split.images, split.annotations, transform=build_transform(data_cfg, train=train),
                         label_map=data_cfg.label_map)
