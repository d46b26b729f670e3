"""Winograd F(2x2, 3x3) convolution for compiled CPU inference.

A 3 x 3 convolution (stride 1, padding 1) computes each 2 x 2 output tile from a 4 x 4 input
tile. Winograd's minimal filtering does that with 16 multiplies a channel pair instead of 36:
Y = A^T [(G g G^T) * (B^T d B)] A, the sum over input channels turning the 16 element-wise
products into 16 independent matrix products (tiles x C_in) @ (C_in x C_out): 2.25x fewer
multiply-adds, for a transform of the input (4x the activations, adds only) and of the output.
oneDNN has no float32 Winograd on x86, so this is the way below the direct convolution's count.

The transforms pay only when fused into single loops, which is what inductor makes of them, so
`WinogradConv2d` computes this way only inside torch.compile; run eagerly it is the ordinary
convolution, bit for bit. Under inductor's weight freezing, the weight transform G g G^T is
folded into a constant at compile time. Results match the direct convolution to float32
rounding (the transforms' matrices have entries 0, +-1 and +-1/2).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fold import conv_like

# G: the filter transform (4 x 3). B^T and A^T are applied below as explicit adds.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _bt(a0: Tensor, a1: Tensor, a2: Tensor, a3: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """B^T applied along one axis of a 4-long tile: rows (1 0 -1 0), (0 1 1 0), (0 -1 1 0), (0 1 0 -1)."""
    return a0 - a2, a1 + a2, a2 - a1, a1 - a3


def _at(m0: Tensor, m1: Tensor, m2: Tensor, m3: Tensor) -> tuple[Tensor, Tensor]:
    """A^T applied along one axis: rows (1 1 1 0), (0 1 -1 -1)."""
    return m0 + m1 + m2, m1 - m2 - m3


def filter_transform(weight: Tensor) -> Tensor:
    """weight (K, C, 3, 3) -> U (16, C, K): G g G^T per filter, tile position-major."""
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    u = torch.einsum("ij,kcjl,ml->imck", g, weight, g)  # (4, 4, C, K)
    return u.reshape(16, weight.shape[1], weight.shape[0])


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias, stride 1, padding 1) by Winograd F(2x2, 3x3).

    x (B, C, H, W), any H and W (odd sizes padded to whole tiles, then cropped); weight
    (K, C, 3, 3); bias (K,) or None. Returns (B, K, H, W) in channels_last memory: tiles are
    gathered along contiguous channels, and the head's convolutions run channels_last on CPU.
    """
    batch, channels, height, width = x.shape
    th, tw = (height + 1) // 2, (width + 1) // 2
    # NHWC view, zero-padded by one pixel (the convolution's padding) and up to whole tiles
    xp = F.pad(x, (1, 1 + 2 * tw - width, 1, 1 + 2 * th - height)).permute(0, 2, 3, 1)
    rows = _bt(*(xp[:, r:r + 2 * th:2] for r in range(4)))  # 4 x (B, th, W + 2, C)
    tiles = [v for row in rows for v in _bt(*(row[:, :, s:s + 2 * tw:2] for s in range(4)))]
    v = torch.stack(tiles).reshape(16, batch * th * tw, channels)  # B^T d B: (16, tiles, C)
    m = torch.bmm(v, filter_transform(weight)).view(4, 4, batch, th, tw, -1)  # (4, 4, B, th, tw, K)
    # A^T m A: rows, then columns; output pixel (2i + a, 2j + b) of tile (i, j) is y[:, i, a, j, b]
    y = torch.stack([torch.stack(_at(*row), dim=3) for row in _at(*m)], dim=2)  # (B, th, 2, tw, 2, K)
    y = y.reshape(batch, 2 * th, 2 * tw, -1)[:, :height, :width]
    if bias is not None:
        y = y + bias
    return y.permute(0, 3, 1, 2)


class WinogradConv2d(nn.Conv2d):
    """An nn.Conv2d (3 x 3, stride 1, padding 1) that, inside torch.compile, computes by
    winograd_conv3x3; eagerly (and for anything traced without dynamo) it is nn.Conv2d."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)


def _eligible(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1) \
        and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 \
        and conv.padding_mode == "zeros"


def use_winograd(module: nn.Module) -> nn.Module:
    """A copy of `module` in which every 3 x 3, stride 1, padding 1 nn.Conv2d is a WinogradConv2d
    (parameters and state-dict keys unchanged)."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _eligible(child):
                setattr(parent, name, conv_like(child, WinogradConv2d))
    return module
