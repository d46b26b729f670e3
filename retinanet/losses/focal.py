"""Sigmoid focal loss (Lin et al., 2017): FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t).

(1 - p_t)^gamma down-weights easy examples, so the flood of easy background anchors cannot drown
the rare hard ones; alpha_t balances positives (alpha) against negatives (1 - alpha). Computed in
float32 whatever the input dtype: fp16 log() and small powers underflow.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(tensor: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 stay as they are."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def binary_focal_terms(logits: Tensor, targets: Tensor | float, alpha: Optional[float],
                       gamma: float) -> Tensor:
    """Elementwise -alpha_t (1 - p_t)^gamma log(p_t) for (soft) binary targets in [0, 1].

    With p = sigmoid(x): p_t = t p + (1 - t)(1 - p), alpha_t = t alpha + (1 - t)(1 - alpha), and
    the cross-entropy -t log p - (1 - t) log(1 - p) = t softplus(-x) + (1 - t) softplus(x), which is
    finite for any logit. `targets` may be a scalar (broadcast). alpha None (or < 0): no balancing.
    """
    logits = upcast(logits)
    prob = logits.sigmoid()
    ce = targets * F.softplus(-logits) + (1 - targets) * F.softplus(logits)
    loss = ce if gamma == 0 else ce * (1 - (targets * prob + (1 - targets) * (1 - prob))).pow(gamma)
    if alpha is not None and alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "sum") -> Tensor:
    """torchvision's signature: logits and float targets in [0, 1] of the same shape (..., K)."""
    return _reduce(binary_focal_terms(logits, upcast(targets), alpha, gamma), reduction)


def sigmoid_focal_loss_per_anchor(logits: Tensor, classes: Tensor, *, alpha: Optional[float] = 0.25,
                                  gamma: float = 2.0, label_smoothing: float = 0.0) -> Tensor:
    """(N, K) logits, (N,) classes in 0..K (K = background) -> (N,) focal loss summed over classes.

    Every entry is scored as a negative (target eps/2); the N_pos entries (row, class) of positives
    are then corrected by (positive term - negative term), target 1 - eps/2. No one-hot tensor.
    """
    num_classes = logits.shape[-1]
    t_neg, t_pos = label_smoothing / 2, 1 - label_smoothing / 2
    per_anchor = binary_focal_terms(logits, t_neg, alpha, gamma).sum(dim=-1)
    rows = torch.nonzero(classes < num_classes, as_tuple=True)[0]
    pos_logits = logits[rows, classes[rows]]
    correction = binary_focal_terms(pos_logits, t_pos, alpha, gamma) - \
        binary_focal_terms(pos_logits, t_neg, alpha, gamma)
    return per_anchor.index_add(0, rows, correction)


def sigmoid_focal_loss_with_class_targets(logits: Tensor, classes: Tensor,
                                          alpha: Optional[float] = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed focal loss from integer class targets (N,) in 0..K, K = background."""
    return sigmoid_focal_loss_per_anchor(logits, classes, alpha=alpha, gamma=gamma).sum()


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
