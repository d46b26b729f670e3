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


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "sum") -> Tensor:
    """torchvision's signature: logits and float targets in [0, 1] of the same shape (..., K)."""
    logits, targets = logits.float(), targets.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None and alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def sigmoid_focal_loss_with_class_targets(logits: Tensor, classes: Tensor,
                                          alpha: Optional[float] = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed focal loss from integer class targets, without building a one-hot tensor.

    logits: (N, K); classes: (N,) int, k in 0..K-1 for a positive of class k, K for background.
    Every entry is first scored as a negative; the N_pos entries (row, class) of positives are then
    corrected by (positive term - negative term).
    """
    logits = logits.float()
    num_classes = logits.shape[-1]
    alpha_pos = 1.0 if alpha is None or alpha < 0 else alpha
    alpha_neg = 1.0 if alpha is None or alpha < 0 else 1.0 - alpha
    # Negative term: -(1 - alpha) * p^gamma * log(1 - p), with log(1 - p) = logsigmoid(-x).
    neg = -alpha_neg * logits.sigmoid().pow(gamma) * F.logsigmoid(-logits)
    total = neg.sum()
    rows = torch.nonzero(classes < num_classes, as_tuple=True)[0]
    pos_logits = logits[rows, classes[rows]]
    pos = -alpha_pos * (1 - pos_logits.sigmoid()).pow(gamma) * F.logsigmoid(pos_logits)
    pos_as_neg = -alpha_neg * pos_logits.sigmoid().pow(gamma) * F.logsigmoid(-pos_logits)
    return total + (pos - pos_as_neg).sum()


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
