"""Losses and matching: `build_criterion(config, num_classes)` wires them from a config."""
from __future__ import annotations

from ..boxes import BoxCoder
from ..config import Config
from .criterion import RetinaNetCriterion, pad_targets
from .focal import sigmoid_focal_loss, sigmoid_focal_loss_with_class_targets
from .matcher import BACKGROUND, IGNORE, Matcher

__all__ = ["BACKGROUND", "IGNORE", "Matcher", "RetinaNetCriterion", "build_criterion",
           "pad_targets", "sigmoid_focal_loss", "sigmoid_focal_loss_with_class_targets"]


def build_box_coder(config: Config) -> BoxCoder:
    return BoxCoder(config.model.box_coder.weights, config.model.box_coder.clamp)


def build_criterion(config: Config, num_classes: int) -> RetinaNetCriterion:
    m, loss = config.model.matcher, config.loss
    return RetinaNetCriterion(
        num_classes=num_classes,
        matcher=Matcher(fg_iou=m.fg_iou, bg_iou=m.bg_iou, allow_low_quality=m.allow_low_quality),
        box_coder=build_box_coder(config),
        focal_alpha=loss.cls.alpha, focal_gamma=loss.cls.gamma, cls_weight=loss.cls.weight,
        box_loss=loss.box.type, smooth_l1_beta=loss.box.beta, box_weight=loss.box.weight,
        normalizer_momentum=loss.normalizer_momentum)
