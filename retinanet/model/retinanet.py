"""The RetinaNet network: backbone -> FPN -> head, plus the anchors its outputs refer to.

The network knows nothing of files, configs, losses or postprocessing; `build_model` turns the
config's model section into constructor arguments.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .fpn import FPN
from .head import RetinaHead


class RetinaNetOutput(NamedTuple):
    cls_logits: Tensor  # (B, A, K)
    box_deltas: Tensor  # (B, A, 4)
    anchors: Tensor  # (A, 4) xyxy pixels of the padded input
    num_anchors_per_level: list[int]  # sums to A


def use_fast_memory_format(model: nn.Module, device: torch.device | str,
                           channels_last: bool | None = None) -> nn.Module:
    """NHWC (channels_last) weights when `channels_last`, or when None on CPU, where its
    convolutions are faster (~1.2x measured for a ResNet-18 training step); RetinaNet.forward then
    converts its input to match. False keeps torchvision's contiguous layout, whose kernels round
    identically to torchvision's model (bit-identical detections)."""
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return model


class RetinaNet(nn.Module):
    """forward(images (B, 3, H, W), normalised and padded) -> RetinaNetOutput."""

    def __init__(self, *, backbone: ResNetBackbone, fpn: FPN, head: RetinaHead,
                 anchor_generator: AnchorGenerator):
        super().__init__()
        if head.num_anchors != anchor_generator.num_anchors:
            raise ValueError(f"head predicts {head.num_anchors} anchors per location but the anchor "
                             f"generator makes {anchor_generator.num_anchors}")
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_generator = anchor_generator

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> RetinaNetOutput:
        cls_logits, box_deltas, features = self.forward_levels(images)
        sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(sizes, images.device, image_size=tuple(images.shape[-2:]))
        return RetinaNetOutput(torch.cat(cls_logits, dim=1), torch.cat(box_deltas, dim=1), anchors,
                               self.anchor_generator.num_anchors_per_level(sizes))

    def forward_levels(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The network without anchors, per level: cls_logits [(B, A_l, K)], box_deltas
        [(B, A_l, 4)] and the FPN features [(B, C, H_l, W_l)] whose shapes place the anchors."""
        if self.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.fpn(self.backbone(images))
        cls_logits, box_deltas = self.head.forward_levels(features)
        return cls_logits, box_deltas, features
