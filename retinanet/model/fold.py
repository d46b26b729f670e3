"""Folding frozen BatchNorm into the convolution before it.

A frozen (or eval-mode) BatchNorm is y = x * s + (beta - mean * s) with s = gamma / sqrt(var +
eps): an affine map per channel, which the preceding convolution can absorb (W' = W s,
b' = (b - mean) s + beta), saving a multiply and an add over every activation it normalised.
fold_batchnorm does it once, for inference; fuse_frozen_batchnorm, for training, recomputes W s
from the trainable W at every call (same algebra: gradients and checkpoints are unchanged). Both
return a new module (a deep copy with convolutions and norms replaced) and leave theirs alone.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d


def conv_like(conv: nn.Conv2d, cls: type[nn.Conv2d] = nn.Conv2d, **kwargs) -> nn.Conv2d:
    """A new `cls` holding the settings, mode and parameters of `conv` (built on the meta device:
    no weights initialised, the random stream left as it was)."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
              padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
              bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta", **kwargs)
    new.weight, new.bias = conv.weight, conv.bias
    return new.train(conv.training)


def _is_frozen_norm(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats \
        and module.running_mean is not None


class _PassThroughFrozenBN(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose convolution applies it: holds the buffers of `norm` (under their
    checkpoint names) but passes activations through."""

    def __init__(self, *, norm: FrozenBatchNorm2d):
        super().__init__(norm.weight.shape[0], eps=norm.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(self, name, getattr(norm, name))

    def forward(self, x: Tensor) -> Tensor:
        return x


class _ConvFrozenBN(nn.Conv2d):
    """A Conv2d that applies the FrozenBatchNorm2d after it by scaling its weights per call."""

    def __init__(self, *args, norm: _PassThroughFrozenBN, **kwargs):
        super().__init__(*args, **kwargs)
        # a reference, not a child: the norm stays in its place, and so do its checkpoint keys
        self.frozen_norm = (norm,)

    def forward(self, x: Tensor) -> Tensor:
        norm = self.frozen_norm[0]
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        bias = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            bias = bias + self.bias * scale
        return self._conv_forward(x, self.weight * scale.reshape(-1, 1, 1, 1), bias)


def fuse_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every (Conv2d, FrozenBatchNorm2d) pair (see fold_batchnorm)
    computes as one convolution with the norm folded into its weights at each call, for
    training: parameters, buffers and state-dict keys stay as they are."""
    model = copy.deepcopy(model)
    for parent, conv_name, conv, norm_name, norm in list(_conv_norm_pairs(model)):
        if type(norm) is FrozenBatchNorm2d and type(conv) is nn.Conv2d:
            norm = _PassThroughFrozenBN(norm=norm)
            setattr(parent, norm_name, norm)
            setattr(parent, conv_name, conv_like(conv, _ConvFrozenBN, norm=norm))
    return model


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
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
    return conv


def _conv_norm_pairs(model: nn.Module):
    """(parent, conv name, conv, norm name, norm) for every norm directly after a Conv2d, in
    torchvision's ResNet layout: siblings `convN` / `bnN`, or consecutive nn.Sequential entries."""
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        names = [(f"conv{name[2:]}", name) for name in children if name.startswith("bn")]
        if isinstance(parent, nn.Sequential):
            keys = list(children)
            names += list(zip(keys, keys[1:]))
        for conv_name, norm_name in names:
            conv, norm = children.get(conv_name), children.get(norm_name)
            if isinstance(conv, nn.Conv2d) and conv.groups == 1 and norm is not None and \
                    isinstance(norm, (FrozenBatchNorm2d, nn.BatchNorm2d)) and \
                    norm.weight.shape[0] == conv.out_channels:
                yield parent, conv_name, conv, norm_name, norm


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every frozen / eval-mode BatchNorm2d that directly follows a
    Conv2d (see _conv_norm_pairs) is folded into it and replaced by nn.Identity. For inference."""
    model = copy.deepcopy(model)
    for parent, conv_name, conv, norm_name, norm in list(_conv_norm_pairs(model)):
        if _is_frozen_norm(norm):  # a plain convolution (a _ConvFrozenBN too) with the norm in its weights
            setattr(parent, conv_name, _fold(conv_like(conv), norm))
            setattr(parent, norm_name, nn.Identity())
    return model
