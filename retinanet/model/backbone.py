"""ResNet backbone (torchvision's implementation) returning C3, C4, C5."""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier (weights: retinanet.weights.load_imagenet_weights).

    forward(images: (B, 3, H, W)) -> [C3 (B, c3, H/8, W/8), C4 (B, c4, H/16, W/16), C5 (B, c5, H/32, W/32)]
    """

    def __init__(self, *, depth: int = 50, norm: str = "frozen_bn", norm_eps: float = 1e-5,
                 freeze_at: int = 2):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        norm_layer = {
            "frozen_bn": partial(FrozenBatchNorm2d, eps=norm_eps),
            "bn": partial(nn.BatchNorm2d, eps=norm_eps),
            "gn": lambda channels: nn.GroupNorm(32, channels, eps=norm_eps),
        }[norm]
        net = _RESNETS[depth](weights=None, norm_layer=norm_layer)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = (128 * expansion, 256 * expansion, 512 * expansion)
        self.freeze_at = freeze_at
        self._freeze()

    def _freeze(self) -> None:
        stages = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        for stage in stages[: self.freeze_at]:
            for param in stage.parameters():
                param.requires_grad_(False)
            # Trainable BatchNorm in a frozen stage must not update its running statistics either.
            for module in stage.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze()  # .train() would otherwise switch frozen BatchNorm back to batch statistics
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        c2 = self.layer1(self.stem(images))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]
