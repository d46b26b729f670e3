"""Model package: `build_model(model_config, num_classes)` wires the parts from a config."""
from __future__ import annotations

from ..config import ModelConfig
from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .fpn import FPN
from .head import RetinaHead
from .retinanet import RetinaNet, RetinaNetOutput, use_fast_memory_format

__all__ = ["AnchorGenerator", "FPN", "ResNetBackbone", "RetinaHead", "RetinaNet",
           "RetinaNetOutput", "build_model", "use_fast_memory_format"]


def build_model(cfg: ModelConfig, num_classes: int, *, load_backbone_weights: bool = True) -> RetinaNet:
    """`load_backbone_weights=False` skips the ImageNet init (when full weights are loaded next)."""
    backbone = ResNetBackbone(depth=cfg.backbone.depth, norm=cfg.backbone.norm,
                              norm_eps=cfg.backbone.norm_eps, freeze_at=cfg.backbone.freeze_at)
    if cfg.backbone.weights and load_backbone_weights:
        backbone.load_torchvision_weights(cfg.backbone.weights)
    anchors = AnchorGenerator(sizes=cfg.anchors.sizes, octave_scales=cfg.anchors.octave_scales,
                              aspect_ratios=cfg.anchors.aspect_ratios, strides=cfg.anchors.strides,
                              offset=cfg.anchors.offset, round_base=cfg.anchors.round_base,
                              level_sizes=cfg.anchors.level_sizes,
                              stride_from_image=cfg.anchors.torchvision_strides)
    fpn = FPN(in_channels=backbone.out_channels, channels=cfg.fpn.channels, p6_from=cfg.fpn.p6_from)
    head = RetinaHead(channels=cfg.fpn.channels, num_anchors=anchors.num_anchors,
                      num_classes=num_classes, num_convs=cfg.head.num_convs, norm=cfg.head.norm,
                      gn_groups=cfg.head.gn_groups, prior_prob=cfg.head.prior_prob)
    return RetinaNet(backbone=backbone, fpn=fpn, head=head, anchor_generator=anchors)
