"""RetinaNet classification and box subnets, shared across pyramid levels."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _subnet(channels: int, num_convs: int, norm: str, gn_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        # No bias before GroupNorm: it would be removed by the normalisation (torchvision v2 too).
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm != "gn"))
        if norm == "gn":
            layers.append(nn.GroupNorm(gn_groups, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaHead(nn.Module):
    """forward([P3..P7]) -> cls_logits (B, A, K), box_deltas (B, A, 4), A = sum_l H_l * W_l * anchors_per_location.

    Anchors are ordered level by level, then row-major over (y, x), then by anchor type: the
    order of `AnchorGenerator`. Conv weights ~ N(0, 0.01); the classifier bias starts at
    -log((1 - prior) / prior) so that every anchor begins as background with probability 1 - prior,
    which keeps the focal loss from being swamped by easy negatives at the first iterations.
    """

    def __init__(self, *, channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 norm: str = "none", gn_groups: int = 32, prior_prob: float = 0.01):
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"head norm must be 'none' or 'gn', got {norm!r}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_subnet = _subnet(channels, num_convs, norm, gn_groups)
        self.box_subnet = _subnet(channels, num_convs, norm, gn_groups)
        self.cls_score = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        cls_logits, box_deltas = self.forward_levels(features)
        return torch.cat(cls_logits, dim=1), torch.cat(box_deltas, dim=1)

    def forward_levels(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The same outputs per level: [(B, A_l, K)], [(B, A_l, 4)]."""
        cls_logits, box_deltas = [], []
        for feature in features:
            cls_logits.append(self._flatten(self.cls_score(self.cls_subnet(feature)), self.num_classes))
            box_deltas.append(self._flatten(self.box_pred(self.box_subnet(feature)), 4))
        return cls_logits, box_deltas

    def _flatten(self, output: Tensor, width: int) -> Tensor:
        # (B, A*width, H, W) -> (B, H*W*A, width)
        batch, _, height, wid = output.shape
        output = output.view(batch, self.num_anchors, width, height, wid)
        return output.permute(0, 3, 4, 1, 2).reshape(batch, -1, width)
