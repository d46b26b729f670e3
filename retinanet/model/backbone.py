"""ResNet backbone (torchvision's implementation) returning C3, C4, C5."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from ..errors import CheckpointError, MissingFileError

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier.

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

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Loads a torchvision ImageNet ResNet state dict (e.g. resnet50-0676ba61.pth) from disk.

        Accepts a bare state dict or one under "state_dict" / "model". The classifier ("fc.*") is
        ignored; any other missing or unexpected key or shape is an error naming the file.
        """
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"backbone weights not found: {path} (model.backbone.weights "
                                   "takes a local torchvision ResNet checkpoint; nothing is downloaded)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        renamed = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            for prefix in ("conv1.", "bn1."):
                if key.startswith(prefix):
                    key = "stem." + ("0." if prefix == "conv1." else "1.") + key[len(prefix):]
            renamed[key] = value
        own = self.state_dict()
        missing = sorted(k for k in own if k not in renamed and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in renamed if k not in own and not k.endswith("num_batches_tracked"))
        if missing or unexpected:
            raise CheckpointError(f"{path}: not a torchvision ResNet-{self._depth_name()} state dict: "
                                  f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                  f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for key, value in renamed.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(f"{path}: shape of {key} is {tuple(value.shape)}, "
                                      f"expected {tuple(own[key].shape)}")
        self.load_state_dict(renamed, strict=False)

    def _depth_name(self) -> str:
        blocks = [len(layer) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]
        bottleneck = isinstance(self.layer1[0], resnet.Bottleneck)
        return {(2, 2, 2, 2): "18", (3, 4, 6, 3): "50" if bottleneck else "34",
                (3, 4, 23, 3): "101"}.get(tuple(blocks), "?")
