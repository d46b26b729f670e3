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


# Rows per chunk of the fused loss: ~0.5 M elements for K = 80, so that the dozen elementwise
# temporaries of a chunk stay in cache instead of streaming N x K tensors through memory.
_CHUNK_ELEMENTS = 1 << 19


class _FusedFocalLoss(torch.autograd.Function):
    """sum_nk w_n * FL(x_nk, t_nk) for logits (N, K), computing the loss and its closed-form
    gradient in one pass over row chunks; backward only scales the stored gradient. Targets are
    either float (N, K) `targets` or integer `classes` (N,) (t = t_pos for k == class, else t_neg:
    no one-hot tensor), with optional row weights (N,) (0 for ignored rows).

    With p = sigmoid(x), ce = softplus(x) - t x, m = 1 - p_t = p + t - 2 t p,
    alpha_t = alpha t + (1 - alpha)(1 - t): FL = alpha_t ce m^gamma and
    dFL/dx = alpha_t [(p - t) m^gamma + ce gamma m^(gamma - 1) (1 - 2t) p (1 - p)].
    Memory beyond the inputs: the gradient (N, K), which backward returns anyway, and one chunk's
    temporaries. Math in float32 for float16 / bfloat16 / float32 logits (float64 stays).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
                row_weights: Optional[Tensor], alpha: Optional[float], gamma: float,
                t_pos: float, t_neg: float) -> Tensor:
        num_rows, num_classes = logits.shape
        need_grad = ctx.needs_input_grad[0]
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        grad = torch.empty(logits.shape, dtype=dtype, device=logits.device) if need_grad else None
        total = torch.zeros((), dtype=dtype, device=logits.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, num_classes))
        class_ids = torch.arange(num_classes, device=logits.device)
        for start in range(0, num_rows, chunk):
            rows = slice(start, min(start + chunk, num_rows))
            x = logits[rows].to(dtype)
            if classes is not None:
                t = torch.where(classes[rows, None] == class_ids, t_pos, t_neg).to(dtype)
            else:
                t = targets[rows].to(dtype)
            p = torch.sigmoid(x)
            ce = F.softplus(x).sub_(t * x)
            one_minus_2t = 1.0 - 2.0 * t
            m = p * one_minus_2t + t
            if gamma == 0:
                mod, dmod = None, None
            elif gamma == 2:
                mod, dmod = m * m, 2.0 * m
            else:
                mod = m.pow(gamma)
                # m^(gamma - 1) at m = 0 is inf for gamma < 1; the term is 0 there (p(1-p) = 0)
                dmod = gamma * m.clamp(min=torch.finfo(dtype).tiny).pow(gamma - 1)
            weight = None
            if alpha is not None and alpha >= 0:
                weight = t * (2 * alpha - 1) + (1 - alpha)  # alpha_t
            if row_weights is not None:
                w = row_weights[rows, None].to(dtype)
                weight = w if weight is None else weight * w
            loss = ce if mod is None else ce * mod
            total += (loss if weight is None else loss * weight).sum()
            if need_grad:
                g = p - t
                if mod is not None:
                    g.mul_(mod).add_(ce.mul_(dmod).mul_(one_minus_2t).mul_(p * (1 - p)))
                if weight is not None:
                    g.mul_(weight)
                grad[rows] = g
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        grad_logits = None
        if grad is not None:
            grad_logits = (grad * grad_output).to(ctx.logits_dtype)
        return grad_logits, None, None, None, None, None, None, None


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "sum") -> Tensor:
    """torchvision's signature: logits and float targets in [0, 1] of the same shape (..., K).

    "sum" and "mean" run the fused loss (one pass, closed-form gradient, float32 math); "none"
    returns the elementwise terms through autograd."""
    if reduction == "none":
        return binary_focal_terms(logits, upcast(targets), alpha, gamma)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    width = logits.shape[-1] if logits.dim() else 1
    total = _FusedFocalLoss.apply(logits.reshape(-1, width), targets.reshape(-1, width), None, None,
                                  alpha, gamma, 1.0, 0.0)
    return total / max(1, logits.numel()) if reduction == "mean" else total


def sigmoid_focal_loss_with_classes(logits: Tensor, classes: Tensor, *, alpha: Optional[float] = 0.25,
                                    gamma: float = 2.0, label_smoothing: float = 0.0,
                                    row_weights: Optional[Tensor] = None) -> Tensor:
    """Summed focal loss of logits (N, K) against integer classes (N,) in 0..K (K = background;
    rows to ignore get row weight 0), each row's terms multiplied by row_weights (N,). Fused: no
    one-hot tensor, one pass, closed-form gradient."""
    t_neg, t_pos = label_smoothing / 2, 1 - label_smoothing / 2
    return _FusedFocalLoss.apply(logits, None, classes, row_weights, alpha, gamma, t_pos, t_neg)


def sigmoid_focal_loss_per_anchor(logits: Tensor, classes: Tensor, *, alpha: Optional[float] = 0.25,
                                  gamma: float = 2.0, label_smoothing: float = 0.0) -> Tensor:
    """(N, K) logits, (N,) classes in 0..K (K = background) -> (N,) focal loss summed over classes.

    Every entry is scored as a negative (target eps/2); the N_pos entries (row, class) of positives
    are then corrected by (positive term - negative term), target 1 - eps/2. No one-hot tensor.
    (The autograd reference of sigmoid_focal_loss_with_classes, for per-anchor values.)
    """
    num_classes = logits.shape[-1]
    t_neg, t_pos = label_smoothing / 2, 1 - label_smoothing / 2
    per_anchor = binary_focal_terms(logits, t_neg, alpha, gamma).sum(dim=-1)
    rows = torch.nonzero(classes < num_classes, as_tuple=True)[0]
    pos_logits = logits[rows, classes[rows]]
    correction = binary_focal_terms(pos_logits, t_pos, alpha, gamma) - \
        binary_focal_terms(pos_logits, t_neg, alpha, gamma)
    return per_anchor.index_add(0, rows, correction)
