"""Losses and matching: `build_criterion(config, num_classes)` wires them from a config."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..boxes import BoxCoder
from ..config import Config
from .classification import (BCELoss, ClassificationLoss, FocalLoss, GHMLoss, OHEMLoss,
                             SoftmaxFocalLoss, build_classification_loss, class_balanced_weights)
from .criterion import RetinaNetCriterion, pad_targets
from .focal import sigmoid_focal_loss, sigmoid_focal_loss_with_classes
from .matcher import BACKGROUND, IGNORE, Matcher, sync_free

__all__ = ["BACKGROUND", "BCELoss", "ClassificationLoss", "FocalLoss", "GHMLoss", "IGNORE",
           "Matcher", "OHEMLoss", "RetinaNetCriterion", "SoftmaxFocalLoss", "build_criterion",
           "class_balanced_weights", "pad_targets", "sigmoid_focal_loss",
           "sigmoid_focal_loss_with_classes"]


def build_criterion(config: Config, num_classes: int, class_counts: Sequence[int] | None = None,
                    reduce_num_fg: Callable[[Tensor], Tensor] | None = None,
                    device: torch.device | str = "cpu") -> RetinaNetCriterion:
    """`class_counts` (K,): training boxes per class, needed for loss.cls.class_balance_beta;
    `reduce_num_fg`: the positive count's mean over ranks under DDP (None: one process);
    `device` picks the matcher's and box loss's implementation (see matcher.sync_free)."""
    m, loss = config.model.matcher, config.loss
    dense = sync_free(device)
    class_weights = None
    if loss.cls.class_balance_beta is not None:
        if class_counts is None or len(class_counts) != num_classes:
            raise ValueError("loss.cls.class_balance_beta needs the training set's box count per class")
        class_weights = class_balanced_weights(torch.as_tensor(class_counts), loss.cls.class_balance_beta)
    return RetinaNetCriterion(
        num_classes=num_classes,
        matcher=Matcher(fg_iou=m.fg_iou, bg_iou=m.bg_iou, allow_low_quality=m.allow_low_quality,
                        sync_free=dense),
        box_coder=BoxCoder(config.model.box_coder.weights, config.model.box_coder.clamp),
        cls_loss=build_classification_loss(loss.cls), cls_weight=loss.cls.weight,
        class_weights=class_weights,
        box_loss=loss.box.type, smooth_l1_beta=loss.box.beta, box_weight=loss.box.weight,
        normalizer_momentum=loss.normalizer_momentum, reduce_num_fg=reduce_num_fg,
        sync_free=dense)
