"""The classification-loss family of the focal-loss literature, behind one interface.

Every loss is a module called as

    loss(logits (B, A, K), classes (B, A) long, anchor_weights (B, A) or None) -> scalar sum

with `classes[b, a]` = k in 0..K-1 for a positive of class k, K for background and -1 for an
ignored anchor (never scored). `anchor_weights` multiplies each anchor's loss (class-balanced
weighting uses it). The criterion divides the sum by the number of positives unless the loss
says `normalized_by_num_fg = False` (GHM, which is already a mean over its elements).

All of them compute in float32 whatever the input dtype, and none builds a one-hot tensor unless
its definition needs dense targets (GHM, softmax focal).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .focal import FocalKernel, sigmoid_focal_loss_with_classes, upcast

IGNORE_CLASS = -1


class ClassificationLoss(nn.Module):
    normalized_by_num_fg = True

    @staticmethod
    def _weighted_sum(per_anchor: Tensor, anchor_weights: Optional[Tensor],
                      valid: Optional[Tensor] = None) -> Tensor:
        """Sum of per-anchor losses, weighted; `valid` selects the weights of the scored anchors
        when per_anchor holds only those."""
        if anchor_weights is None:
            return per_anchor.sum()
        return (per_anchor * (anchor_weights[valid] if valid is not None else anchor_weights)).sum()


class FocalLoss(ClassificationLoss):
    """Sigmoid focal loss (Lin et al., 2017), the RetinaNet default.

    Use it for dense detection: (1 - p_t)^gamma silences the flood of easy background anchors and
    alpha (0.25) then *down*-weights the rare positives, because gamma already removed most of the
    negatives' weight. `label_smoothing` eps moves binary targets towards 0.5 (1 -> 1 - eps/2,
    0 -> eps/2), which tempers over-confident scores on noisy labels. `kernel`: see
    focal.select_focal_kernel; chosen once per device and size class.
    """

    def __init__(self, *, alpha: Optional[float] = 0.25, gamma: float = 2.0, label_smoothing: float = 0.0,
                 kernel: str = "auto"):
        super().__init__()
        self.alpha, self.gamma, self.label_smoothing = alpha, gamma, label_smoothing
        self.kernel, self.fused = kernel, FocalKernel(kernel)

    def forward(self, logits: Tensor, classes: Tensor, anchor_weights: Optional[Tensor] = None) -> Tensor:
        # Ignored anchors get weight 0 rather than being gathered out: no copy of the logits.
        weights = (classes != IGNORE_CLASS).float()
        if anchor_weights is not None:
            weights = weights * anchor_weights
        width = logits.shape[-1]
        return sigmoid_focal_loss_with_classes(
            logits.reshape(-1, width), classes.reshape(-1).clamp(min=0), alpha=self.alpha,
            gamma=self.gamma, label_smoothing=self.label_smoothing, row_weights=weights.reshape(-1),
            kernel=self.fused)


class BCELoss(FocalLoss):
    """alpha-balanced binary cross-entropy: focal loss with gamma = 0.

    For ablations: it shows what the focusing term buys. Without it the easy negatives dominate the
    loss, and alpha around 0.75 (positives up-weighted) works best (the focal-loss paper, Table 1a).
    """

    def __init__(self, *, alpha: Optional[float] = 0.25, label_smoothing: float = 0.0, kernel: str = "auto"):
        super().__init__(alpha=alpha, gamma=0.0, label_smoothing=label_smoothing, kernel=kernel)


class GHMLoss(ClassificationLoss):
    """Gradient Harmonizing Mechanism classification loss, GHM-C (Li et al., 2019).

    Each element's BCE is weighted by the inverse density of its gradient norm g = |p - t| among all
    scored elements (histogram of `bins` bins over [0, 1], smoothed over iterations with
    `momentum`). Use it when focal loss over-emphasises outliers (mislabelled or ambiguous boxes
    with g near 1): GHM damps both the easy flood (g near 0) and those outliers. Returns a mean over
    the scored elements, not a sum: with one bin it is exactly the mean BCE.
    """

    normalized_by_num_fg = False

    def __init__(self, *, bins: int = 30, momentum: float = 0.75):
        super().__init__()
        if bins < 1 or not 0 <= momentum < 1:
            raise ValueError(f"GHM needs bins >= 1 and 0 <= momentum < 1, got {bins}, {momentum}")
        self.bins, self.momentum = bins, momentum
        self.register_buffer("acc_count", torch.zeros(bins))

    def forward(self, logits: Tensor, classes: Tensor, anchor_weights: Optional[Tensor] = None) -> Tensor:
        valid = classes != IGNORE_CLASS
        logits = upcast(logits[valid])
        num_classes = logits.shape[-1]
        targets = F.one_hot(classes[valid], num_classes + 1)[:, :num_classes].to(logits.dtype)
        grad_norm = (logits.detach().sigmoid() - targets).abs()
        bin_idx = (grad_norm * self.bins).long().clamp(max=self.bins - 1)
        counts = torch.bincount(bin_idx.flatten(), minlength=self.bins).float()
        total = counts.sum().clamp(min=1)
        density = counts
        if self.momentum > 0 and self.training:
            updated = self.momentum * self.acc_count + (1 - self.momentum) * counts
            self.acc_count.copy_(torch.where(counts > 0, updated, self.acc_count))
            density = self.acc_count
        occupied = counts > 0
        bin_weight = torch.where(occupied, total / density.clamp(min=1e-12), torch.zeros_like(counts))
        bin_weight = bin_weight / occupied.sum().clamp(min=1)
        elementwise = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * bin_weight[bin_idx]
        per_anchor = elementwise.sum(dim=-1)
        return self._weighted_sum(per_anchor, anchor_weights, valid) / total


class OHEMLoss(ClassificationLoss):
    """Online hard example mining on plain BCE (as in SSD): per image, all positives plus the
    `neg_pos_ratio` x #positives background anchors with the highest loss (at least
    `min_negatives`, so images without boxes still teach background). Use it as the classic
    sampling alternative to focal loss's soft re-weighting; it ignores easy negatives entirely.
    Unlike the OHEM of the focal-loss paper it applies no NMS before mining, so the hardest
    negatives are often near-duplicates of positives (see the loss comparison in docs/training.md).
    """

    def __init__(self, *, neg_pos_ratio: float = 3.0, min_negatives: int = 16):
        super().__init__()
        if neg_pos_ratio <= 0 or min_negatives < 0:
            raise ValueError(f"OHEM needs neg_pos_ratio > 0 and min_negatives >= 0, got "
                             f"{neg_pos_ratio}, {min_negatives}")
        self.neg_pos_ratio, self.min_negatives = neg_pos_ratio, min_negatives

    def forward(self, logits: Tensor, classes: Tensor, anchor_weights: Optional[Tensor] = None) -> Tensor:
        logits = upcast(logits)
        num_classes = logits.shape[-1]
        positive = (classes >= 0) & (classes < num_classes)
        background = classes == num_classes
        # BCE summed over classes: softplus(x) for every (negative) entry, corrected at the target.
        per_anchor = F.softplus(logits).sum(dim=-1)
        target_logit = logits.gather(-1, classes.clamp(0, num_classes - 1)[..., None]).squeeze(-1)
        per_anchor = per_anchor + torch.where(
            positive, F.softplus(-target_logit) - F.softplus(target_logit), torch.zeros_like(per_anchor))
        hard_negatives = self.select_hard_negatives(per_anchor.detach(), positive, background)
        selected = (positive | hard_negatives).float()
        weights = selected if anchor_weights is None else selected * anchor_weights
        return (per_anchor * weights).sum()

    def select_hard_negatives(self, per_anchor: Tensor, positive: Tensor, background: Tensor) -> Tensor:
        """(B, A) losses and masks -> (B, A) bool: each image's hardest background anchors."""
        num_keep = (positive.sum(dim=1).float() * self.neg_pos_ratio).long().clamp(min=self.min_negatives)
        score = per_anchor.masked_fill(~background, float("-inf"))
        order = score.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return background & (rank < num_keep[:, None])


class SoftmaxFocalLoss(ClassificationLoss):
    """Multi-class focal loss over K + 1 classes, background included.

    The head keeps K outputs; the background logit is fixed at 0 (softmax is shift-invariant, so
    this loses nothing) and scores become softmax probabilities of the K object classes, which
    the postprocessor uses when this loss is selected. Use it when classes are mutually exclusive
    and calibrated, competing scores matter more than independent per-class detections. alpha
    weights the object classes, 1 - alpha the background; `label_smoothing` eps mixes the target
    with the uniform distribution over the K + 1 classes (towards 1 / (K + 1)).
    """

    def __init__(self, *, alpha: Optional[float] = 0.25, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha, self.gamma, self.label_smoothing = alpha, gamma, label_smoothing

    def forward(self, logits: Tensor, classes: Tensor, anchor_weights: Optional[Tensor] = None) -> Tensor:
        valid = classes != IGNORE_CLASS
        logits = upcast(logits[valid])
        num_classes = logits.shape[-1]
        log_prob = torch.cat([logits, logits.new_zeros(len(logits), 1)], dim=1).log_softmax(dim=1)
        target = F.one_hot(classes[valid], num_classes + 1).to(logits.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / (num_classes + 1)
        terms = -target * log_prob
        if self.gamma:
            terms = terms * (1 - log_prob.exp()).pow(self.gamma)
        if self.alpha is not None and self.alpha >= 0:
            class_alpha = torch.full((num_classes + 1,), self.alpha, device=logits.device, dtype=logits.dtype)
            class_alpha[-1] = 1 - self.alpha
            terms = terms * class_alpha
        per_anchor = terms.sum(dim=1)
        return self._weighted_sum(per_anchor, anchor_weights, valid)


def class_balanced_weights(counts: Tensor, beta: float) -> Tensor:
    """Cui et al. (2019): weight_k proportional to (1 - beta) / (1 - beta^n_k), the inverse
    "effective number" of the n_k samples of class k, normalised to sum to K. beta = 0 gives equal
    weights; beta -> 1 approaches inverse frequency. Classes without samples count as one."""
    if not 0 <= beta < 1:
        raise ValueError(f"class-balance beta must be in [0, 1), got {beta}")
    counts = counts.double().clamp(min=1)
    weights = (1 - beta) / (1 - beta ** counts)
    return (weights * len(counts) / weights.sum()).float()


def anchor_class_weights(classes: Tensor, class_weights: Tensor) -> Tensor:
    """Per-anchor weights: a positive of class k gets class_weights[k]; background and ignored 1."""
    num_classes = len(class_weights)
    positive = (classes >= 0) & (classes < num_classes)
    return torch.where(positive, class_weights[classes.clamp(0, num_classes - 1)],
                       torch.ones_like(classes, dtype=class_weights.dtype))


def build_classification_loss(cfg) -> ClassificationLoss:
    """loss.cls section of the config -> the selected loss module."""
    if cfg.type == "focal":
        return FocalLoss(alpha=cfg.alpha, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing,
                         kernel=cfg.kernel)
    if cfg.type == "bce":
        return BCELoss(alpha=cfg.alpha, label_smoothing=cfg.label_smoothing, kernel=cfg.kernel)
    if cfg.type == "ghm":
        return GHMLoss(bins=cfg.ghm_bins, momentum=cfg.ghm_momentum)
    if cfg.type == "ohem":
        return OHEMLoss(neg_pos_ratio=cfg.ohem_neg_pos_ratio, min_negatives=cfg.ohem_min_negatives)
    if cfg.type == "softmax_focal":
        return SoftmaxFocalLoss(alpha=cfg.alpha, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)
    raise ValueError(f"loss.cls.type: unknown classification loss {cfg.type!r}")
