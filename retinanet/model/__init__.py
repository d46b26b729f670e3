"""Model package: `build_model(model_config, num_classes)` wires the parts from a config."""
from __future__ import annotations

from ..config import AnchorConfig, ModelConfig
from ..weights import load_imagenet_weights
from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .fold import fuse_frozen_batchnorm
from .fpn import FPN
from .head import RetinaHead
from .retinanet import RetinaNet, RetinaNetOutput, use_fast_memory_format

__all__ = ["AnchorGenerator", "FPN", "ResNetBackbone", "RetinaHead", "RetinaNet",
           "RetinaNetOutput", "build_anchor_generator", "build_model", "use_fast_memory_format"]


def build_anchor_generator(cfg: AnchorConfig) -> AnchorGenerator:
    """The anchors of the config's model.anchors section."""
    return AnchorGenerator(sizes=cfg.sizes, octave_scales=cfg.octave_scales,
                           aspect_ratios=cfg.aspect_ratios, strides=cfg.strides, offset=cfg.offset,
                           round_base=cfg.round_base, level_sizes=cfg.level_sizes,
                           stride_from_image=cfg.torchvision_strides)


def build_model(cfg: ModelConfig, num_classes: int, *, load_backbone_weights: bool = True) -> RetinaNet:
    """`load_backbone_weights=False` skips the ImageNet init (when full weights are loaded next)."""
    backbone = ResNetBackbone(depth=cfg.backbone.depth, norm=cfg.backbone.norm,
                              norm_eps=cfg.backbone.norm_eps, freeze_at=cfg.backbone.freeze_at)
    if cfg.backbone.weights and load_backbone_weights:
        load_imagenet_weights(backbone, cfg.backbone.weights, depth=cfg.backbone.depth)
    if cfg.fold_batchnorm:  # FrozenBN applied inside its convolution: same results, fewer passes
        backbone = fuse_frozen_batchnorm(backbone)
    anchors = build_anchor_generator(cfg.anchors)
    fpn = FPN(in_channels=backbone.out_channels, channels=cfg.fpn.channels, p6_from=cfg.fpn.p6_from)
    head = RetinaHead(channels=cfg.fpn.channels, num_anchors=anchors.num_anchors,
                      num_classes=num_classes, num_convs=cfg.head.num_convs, norm=cfg.head.norm,
                      gn_groups=cfg.head.gn_groups, prior_prob=cfg.head.prior_prob)
    return RetinaNet(backbone=backbone, fpn=fpn, head=head, anchor_generator=anchors)
